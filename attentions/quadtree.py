"""QuadTree attention, variant B: QuadTree Transformer (Tang et al., ICLR 2022, arXiv 2201.02767).

Queries, keys and values are built into L-level pyramids (``levels``): Q and K by 2×2 average pooling, V by
QuadTree-B's learned value branch (GroupNorm, GELU, 2×2 stride-2 conv, GroupNorm, GELU, 1×1 conv). Then,
from the coarsest level to the finest, per head:

    level L-1 (coarsest):  A = softmax(Q Kᵀ/√d) over all keys;  message m_{L-1} = A V;
                           each query keeps the top-k₀ keys by A
    level l < L-1:         each query attends only to the 4 children of the top-k keys its parent kept
                           (4k candidates):  A = softmax(q K_candᵀ/√d),  m_l = A V_cand;
                           each query keeps its top-k_l candidates for the level below
    output:                Σ_l w_l · up(m_l + LePE_l(V_l)),   w = softmax(learned weights),
                           up = nearest upsampling to the finest level, LePE = depthwise 3×3 conv

Follows Tangshitao/QuadTreeAttention QuadTreeAttention/QuadtreeAttention/modules/quadtree_attention.py
(``QTAttB``) and classification/quadtree_attention.py (``QuadtreeAttention``), read, not copied; parameter
names are theirs (q_proj, k_proj, v_proj, value_branchs, py_att.get_vs, py_att.weight, proj). The reference
scores and aggregates with CUDA kernels; here they are index gathers and batched einsums, with no loop over
tokens. Deviations: H and W are zero-padded at the bottom/right to multiples of 2^(L-1) (the reference
requires them) and the output cropped; a top-k larger than the candidates available (tiny maps) is clamped
to them, where the reference would fail. Variant A (messages of coarse levels masked, scores redistributed)
is not implemented. QuadTree-B-b2 (4.5 GMACs, PVTv2 layout): dims [64, 128, 320, 512], heads [1, 2, 5, 8],
levels [4, 3, 2, 1] by stage, topks [8, 8, 8, 8], qkv_bias True, LePE on.

Cost (MACs, N_l tokens at level l, N_0 = H·W padded): qkv 3·N_0·C², value_pyramid Σ_{l≥1} 5·N_l·C²,
attn_scores N_{L-1}²·C + Σ_{l<L-1} N_l·4k_{l+1}·C (k_{l+1} the top-k its parents kept), attn_values the
same, local_context Σ_l 9·N_l·C, out_proj N_0·C². Top-k and gather are not multiply-adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import top_k_choice
from .base import AttentionMechanism, MacCount, check_heads
from .registry import register

LEPE_KERNEL = 3


def value_branch(dim: int) -> nn.Sequential:
    """QuadTree-B's learned 2× downsampling of values."""
    return nn.Sequential(
        nn.GroupNorm(1, dim), nn.GELU(), nn.Conv2d(dim, dim, kernel_size=2, stride=2),
        nn.GroupNorm(1, dim), nn.GELU(), nn.Conv2d(dim, dim, kernel_size=1),
    )


class LevelMerge(nn.Module):
    """The per-level LePE convs and the softmax-normalised level weights (the reference's ``QTAttB``)."""

    def __init__(self, dim: int, levels: int, lepe: bool) -> None:
        super().__init__()
        if lepe:
            self.get_vs = nn.ModuleList(
                nn.Conv2d(dim, dim, LEPE_KERNEL, padding=LEPE_KERNEL // 2, groups=dim) for _ in range(levels)
            )
        self.weight = nn.Parameter(torch.randn(levels))


def _group_by_parent(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w, ·) -> (B, heads, h/2 · w/2, 4, ·): the 4 children of each parent, raster order."""
    batch, heads, h, w, last = t.shape
    t = t.reshape(batch, heads, h // 2, 2, w // 2, 2, last).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(batch, heads, (h // 2) * (w // 2), 4, last)


def _ungroup(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``_group_by_parent``: (B, heads, h/2 · w/2, 4, ·) -> (B, heads, h · w, ·)."""
    batch, heads, _, _, last = t.shape
    t = t.reshape(batch, heads, h // 2, w // 2, 2, 2, last).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(batch, heads, h * w, last)


@register("quadtree")
class QuadTreeAttention(AttentionMechanism):
    """QuadTree-B attention: full attention at the coarsest level, then top-k children refinement per level.

    Args:
        dim: channels C. num_heads: heads (b2: 1, 2, 5, 8 by stage).
        levels: pyramid levels L (b2: 4, 3, 2, 1 by stage; 1 is full attention with LePE).
        topks: top-k kept per level, coarsest first (b2: 8 at every level); needs at least L-1 entries.
        qkv_bias: bias in the q/k/v projections (b2: True). lepe: per-level depthwise conv on V (B: True).
    """

    makes_top_k_choices = True  # the kept keys per level (``top_k_choice``)

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        levels: int = 3,
        topks: Sequence[int] = (8, 8, 8, 8),
        qkv_bias: bool = True,
        lepe: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if len(topks) < levels - 1 or any(k < 1 for k in topks):
            raise ValueError(f"topks needs at least levels-1 = {levels - 1} positive entries, got {list(topks)}")
        self.levels = levels
        self.topks = tuple(topks)
        self.lepe = lepe
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Conv2d(dim, dim, 1, bias=qkv_bias) for _ in range(3))
        self.value_branchs = nn.ModuleList(value_branch(dim) for _ in range(levels - 1))
        self.py_att = LevelMerge(dim, levels, lepe)
        self.proj = nn.Linear(dim, dim)

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        multiple = 2 ** (self.levels - 1)
        return height + (-height % multiple), width + (-width % multiple)

    def kept_topks(self, height: int, width: int) -> list[int]:
        """The top-k each level keeps, coarsest first, clamped to the candidates it has."""
        padded_h, padded_w = self._padded_size(height, width)
        coarse_tokens = (padded_h * padded_w) >> (2 * (self.levels - 1))
        kept = [min(self.topks[0], coarse_tokens)] if self.levels > 1 else []
        for step in range(1, self.levels - 1):
            kept.append(min(self.topks[step], 4 * kept[-1]))
        return kept

    def pyramids(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Q, K, V pyramids of padded (B, H, W, C) input, finest first, each level (B, C, h, w)."""
        nchw = x.permute(0, 3, 1, 2)
        q, k, v = self.q_proj(nchw), self.k_proj(nchw), self.v_proj(nchw)
        queries, keys, values = [q], [k], [v]
        for branch in self.value_branchs:
            queries.append(F.avg_pool2d(queries[-1], 2))
            keys.append(F.avg_pool2d(keys[-1], 2))
            values.append(branch(values[-1]))
        return queries, keys, values

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, heads, h, w, head_dim)."""
        batch, _, h, w = t.shape
        return t.reshape(batch, self.num_heads, self.head_dim, h, w).permute(0, 1, 3, 4, 2)

    def level_messages(self, queries, keys, values, kept: list[int]) -> list[torch.Tensor]:
        """Messages m_l, coarsest first, each (B, heads, h_l, w_l, head_dim)."""
        q, k, v = (self._heads(t[-1]) for t in (queries, keys, values))
        batch, heads, h, w, d = q.shape
        weights = torch.einsum("bhqd,bhkd->bhqk", q.flatten(2, 3) * self.scale, k.flatten(2, 3)).softmax(-1)
        messages = [torch.einsum("bhqk,bhkd->bhqd", weights, v.flatten(2, 3)).reshape(q.shape)]
        if self.levels == 1:
            return messages
        selected = top_k_choice(self, weights, kept[0])[1]  # (B, heads, h·w, k): parent-level key indices
        for step, level in enumerate(range(self.levels - 2, -1, -1), start=1):
            q, k, v = (self._heads(t[level]) for t in (queries, keys, values))
            parent_w, (h, w) = w, q.shape[2:4]
            # the 4 children of every kept parent key: (B, heads, parents, 4k) indices into this level
            rows, cols = selected // parent_w, selected % parent_w
            children = torch.stack([(2 * rows + a) * w + 2 * cols + b for a in (0, 1) for b in (0, 1)], dim=-1)
            children = children.flatten(-2)
            flat_index = children.flatten(2)[..., None].expand(-1, -1, -1, d)
            k_cand = k.flatten(2, 3).gather(2, flat_index).unflatten(2, children.shape[2:])
            v_cand = v.flatten(2, 3).gather(2, flat_index).unflatten(2, children.shape[2:])
            q_children = _group_by_parent(q)  # (B, heads, parents, 4, d)
            weights = torch.einsum("bhpcd,bhpkd->bhpck", q_children * self.scale, k_cand).softmax(-1)
            message = torch.einsum("bhpck,bhpkd->bhpcd", weights, v_cand)
            messages.append(_ungroup(message, h, w).reshape(batch, heads, h, w, d))
            if level > 0:
                local = top_k_choice(self, weights, kept[step])[1]  # (B, heads, parents, 4, k)
                chosen = children[:, :, :, None, :].expand(-1, -1, -1, 4, -1).gather(-1, local)
                selected = _ungroup(chosen, h, w)
        return messages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        batch, height, width, channels = x.shape
        padded_h, padded_w = self._padded_size(height, width)
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
        queries, keys, values = self.pyramids(x)
        messages = self.level_messages(queries, keys, values, self.kept_topks(height, width))
        level_weight = self.py_att.weight.softmax(0)
        out = 0
        for step, message in enumerate(messages):  # coarsest first; upsample the running sum, then add
            message = message.permute(0, 1, 4, 2, 3).reshape(batch, channels, *message.shape[2:4])
            if self.lepe:
                message = message + self.py_att.get_vs[step](values[self.levels - 1 - step])
            if step:
                out = F.interpolate(out, scale_factor=2, mode="nearest")
            out = out + level_weight[step] * message
        out = self.proj(out.permute(0, 2, 3, 1))
        return out[:, :height, :width].contiguous()

    def keys_per_query(self, height: int, width: int) -> float:
        """All coarsest-level keys, plus the 4k children at every finer level."""
        padded_h, padded_w = self._padded_size(height, width)
        coarse = (padded_h * padded_w) >> (2 * (self.levels - 1))
        return float(coarse + sum(4 * k for k in self.kept_topks(height, width)))

    def macs(self, height: int, width: int) -> MacCount:
        padded_h, padded_w = self._padded_size(height, width)
        c = self.dim
        tokens = [(padded_h * padded_w) >> (2 * level) for level in range(self.levels)]  # finest first
        kept = self.kept_topks(height, width)
        attended = tokens[-1] ** 2 * c
        for step, level in enumerate(range(self.levels - 2, -1, -1)):
            attended += tokens[level] * 4 * kept[step] * c
        parts = {
            "qkv": 3 * tokens[0] * c * c,
            "value_pyramid": sum(5 * n * c * c for n in tokens[1:]),
            "attn_scores": attended,
            "attn_values": attended,
            "out_proj": tokens[0] * c * c,
        }
        if self.lepe:
            parts["local_context"] = sum(n * c * LEPE_KERNEL**2 for n in tokens)
        return MacCount(parts)
