"""Cross-shaped window attention with LePE: CSWin Transformer (Dong et al., CVPR 2022, arXiv 2107.00652).

One qkv projection; the channels (and heads) are split in two branches. Branch 0 attends within vertical
stripes (full height, ``split_size`` columns wide), branch 1 within horizontal stripes (full width,
``split_size`` rows high); their outputs are concatenated and projected:

    CSWin-Attention(X) = W_o · Concat(head_1 … head_K),
    head_k = softmax(Q_k K_kᵀ / √d) V_k + DWConv3×3(V_k)    within the stripe of head k's branch (LePE)

The LePE depthwise conv runs inside each stripe (zero padding at stripe borders), as the official
``LePEAttention.get_lepe`` does. With ``last_stage=True`` one branch with all heads attends over the whole
map (CSWin's last stage, whose 7 × 7 map equals the stripe width).

Follows microsoft/CSWin-Transformer (commit f111ae2) models/cswin.py and, for sizes that are not multiples of
the stripe width, segmentation/backbone/cswin_transformer.py (``CSWinBlock`` / ``LePEAttention``), read, not
copied: parameter names qkv, proj, attns.{0,1}.get_v; scale head_dim ** -0.5. Padding is the segmentation
backbone's: q, k, v are projected from the unpadded map, then each branch zero-pads them only along its own
striped axis (branch 0: W, branch 1: H) up to a multiple of split_size, split between the two sides
(⌊pad/2⌋ before, the rest after). Padded tokens are exact zeros and are not masked: their keys score 0 and
their values add nothing, but they take part in the softmax, as in the official code. The output is cropped
back. The last stage never pads (one stripe covers the map). CSWin-T (4.3 GMACs): dims 64·2^i, heads
[2, 4, 8, 16], split_size [1, 2, 7, 7], qkv_bias True, last stage ``last_stage``.

Cost (MACs, sw = split_size, Wp / Hp the padded width / height): qkv 3·HW·C², out_proj HW·C²; branch 0
(C/2 channels) attn_scores H·Wp·(H·sw)·C/2, branch 1 Hp·W·(W·sw)·C/2, attn_values the same;
local_context (H·Wp + Hp·W)·C/2·9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import depthwise_conv, depthwise_conv_macs, merge_heads, split_heads, window_merge, window_partition
from .base import AttentionMechanism, MacCount, check_heads
from .registry import register

LEPE_KERNEL = 3


def pad_centred(x: torch.Tensor, axis: int, multiple: int) -> tuple[torch.Tensor, int]:
    """Zero-pad (B, H, W, C) along ``axis`` (1: H, 2: W) to a multiple of ``multiple``, ⌊pad/2⌋ before and the
    rest after (the official segmentation backbone's split). Returns the padded tensor and the pad before."""
    pad = -x.shape[axis] % multiple
    before = pad // 2
    if pad:
        widths = (0, 0, before, pad - before) if axis == 2 else (0, 0, 0, 0, before, pad - before)
        x = F.pad(x, widths)
    return x, before


class StripeBranch(nn.Module):
    """Attention within (stripe_h × stripe_w) stripes plus LePE on V; official ``LePEAttention``."""

    def __init__(self, dim: int, num_heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.get_v = depthwise_conv(dim, LEPE_KERNEL)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stripe_h: int,
                stripe_w: int) -> torch.Tensor:
        """q, k, v (B, H, W, C_branch) -> (B, H, W, C_branch); H, W multiples of the stripe size."""
        height, width = q.shape[1:3]
        q, k, v = (window_partition(t, stripe_h, stripe_w) for t in (q, k, v))  # (B·nS, stripe tokens, C)
        lepe = self.get_v(v.transpose(1, 2).unflatten(-1, (stripe_h, stripe_w))).flatten(2).transpose(1, 2)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        out = merge_heads(F.scaled_dot_product_attention(q, k, v, scale=self.scale)) + lepe
        return window_merge(out, stripe_h, stripe_w, height, width)

    def padded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: int, split: int) -> torch.Tensor:
        """Stripes ``split`` wide across ``axis`` (2: vertical stripes, 1: horizontal), q, k, v zero-padded
        centred along that axis; the output cropped back to q's size."""
        size = q.shape[axis]
        (q, before), (k, _), (v, _) = (pad_centred(t, axis, split) for t in (q, k, v))
        stripe_h, stripe_w = (q.shape[1], split) if axis == 2 else (split, q.shape[2])
        return self(q, k, v, stripe_h, stripe_w).narrow(axis, before, size)


@register("cswin")
class CrossShapedWindowAttention(AttentionMechanism):
    """CSWin cross-shaped window attention: half the heads in vertical, half in horizontal stripes, + LePE.

    Args:
        dim: channels C. num_heads: heads (even unless last_stage; CSWin-T: 2, 4, 8, 16).
        split_size: stripe width sw (CSWin-T: 1, 2, 7, 7 by stage). last_stage: one branch of full
            attention (CSWin's last stage). qkv_bias: bias in qkv (CSWin: True).
        qk_scale: softmax temperature; None means head_dim ** -0.5.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        split_size: int = 7,
        last_stage: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        head_dim = check_heads(dim, num_heads)
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        branches = 1 if last_stage else 2
        if num_heads % branches:
            raise ValueError(f"cswin splits the heads over 2 branches: num_heads={num_heads} must be even")
        self.split_size = split_size
        self.last_stage = last_stage
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attns = nn.ModuleList(
            StripeBranch(dim // branches, num_heads // branches, self.scale) for _ in range(branches)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        height, width = x.shape[1:3]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.last_stage:
            out = self.attns[0](q, k, v, height, width)
        else:
            half, sw = self.dim // 2, self.split_size
            out = torch.cat([
                self.attns[0].padded(q[..., :half], k[..., :half], v[..., :half], 2, sw),  # vertical stripes
                self.attns[1].padded(q[..., half:], k[..., half:], v[..., half:], 1, sw),  # horizontal stripes
            ], dim=-1)
        return self.proj(out)

    def _padded(self, height: int, width: int) -> tuple[int, int]:
        sw = self.split_size
        return height + (-height % sw), width + (-width % sw)

    def keys_per_query(self, height: int, width: int) -> float:
        if self.last_stage:
            return float(height * width)
        # padded keys are zeros but unmasked: a query of branch 0 scores all H·sw keys of its stripe
        return float(height * self.split_size + width * self.split_size) / 2

    def macs(self, height: int, width: int) -> MacCount:
        tokens, c = height * width, self.dim
        if self.last_stage:
            attended = tokens * tokens * c
            lepe = depthwise_conv_macs(height, width, c, LEPE_KERNEL)
        else:
            padded_h, padded_w = self._padded(height, width)
            sw = self.split_size
            attended = (height * padded_w * height * sw + padded_h * width * width * sw) * c // 2
            lepe = depthwise_conv_macs(height * padded_w + padded_h * width, 1, c // 2, LEPE_KERNEL)
        return MacCount({
            "qkv": 3 * tokens * c * c,
            "out_proj": tokens * c * c,
            "attn_scores": attended,
            "attn_values": attended,
            "local_context": lepe,
        })
