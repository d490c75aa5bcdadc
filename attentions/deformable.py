"""Deformable multi-head attention: DAT (Xia et al., CVPR 2022, arXiv 2201.00520) and DAT++ (Xia et al.,
arXiv 2309.01430), their DAttention module, in the version each paper ran (``version``).

Queries come from every token; keys and values from features bilinearly sampled at a few deformed points
shared by all queries of an offset group:

    q = x W_q,   Δp = s · tanh(θ_offset(q)),   x̃ = φ(x; p + Δp),   k̃ = x̃ W_k,   ṽ = x̃ W_v
    z⁽ᵐ⁾ = softmax(q⁽ᵐ⁾ k̃⁽ᵐ⁾ᵀ / √d + φ(B̂; R)) ṽ⁽ᵐ⁾,   z = Concat(z⁽¹⁾ … z⁽ᴹ⁾) W_o

p is a uniform grid of reference points, one per cell of the map downsampled by ``stride`` (the stride of
the offset network's depthwise conv); θ_offset is depthwise conv (``ksize``) → LayerNorm → GELU → 1×1 conv to
2 offsets per group, run on the queries of each of the ``n_groups`` channel groups; s bounds the offsets. φ is
bilinear sampling (``grid_sample``, align_corners=True, zeros outside). B̂ is a learnable table of relative
position biases of shape (heads, 2T_h-1, 2T_w-1), sampled bilinearly at the query-to-key displacements
R = (query point - sampled point) / 2 (``use_pe``). The two versions differ in five places (Hk × Wk the
reference grid, H × W the query map, f = ``offset_range_factor``):

    =====================  ==========================================  ==========================================
                           ``"dat"`` (DAT v1, commit 566a593)           ``"dat++"`` (DAT++, main at 32173fc)
    reference points p     (i + 0.5) / Hk · 2 - 1                      (i + 0.5) / (Hk - 1) · 2 - 1
    offset bound s         f / Hk, f / Wk   (when f > 0)               f / (Hk - 1), f / (Wk - 1)   (when f >= 0)
    f < 0                  positions tanh(p + Δp)                      positions clamp(p + Δp, -1, 1)
    query points (for R)   the reference points of the H × W map       i / (H - 1) · 2 - 1
    offset conv padding    ksize // 2                                  ksize // 2, or 0 when ksize == stride
    =====================  ==========================================  ==========================================

Follows LeapLabTHU/DAT models/dat_blocks.py (``DAttentionBaseline``) at commit 566a593 (DAT v1, the paper's
DAT-T of the BiFormer ablation) and at main 32173fc (DAT++), read, not copied. Parameter names are DAT's
(proj_q/k/v/out as 1×1 convs, conv_offset.{0,1.norm,3}, rpe_table), so DAT weights load strictly. Both
versions build the bias table from the feature map the block is built for (T = ``rpe_table_size``, an int
or (T_h, T_w); DAT passes the stage's map). DAT v1 reshapes the table to the input's (2H-1, 2W-1) and so
fails at any other size; DAT++ samples it continuously, and so does this module in both versions: at the
table's own size the two agree, elsewhere v1 gets DAT++'s extension. Only DAT's default bias (use_pe without
dwc_pe/fixed_pe/log_cpb) is offered; use_pe=False turns it off. DAT does not pad; for ``"dat++"`` maps with
fewer than 2·stride rows or columns (where it divides by zero) are zero-padded up to it and cropped (v1
needs no padding).

Upstream configurations (224² input): DAT-T v1 (configs/dat_tiny.yaml @ 566a593 lines 12-20, Swin-T layout)
is deformable only in stages 3-4, alternating with local window attention, heads 12 / 24, n_groups 3 / 6,
stride 1, offset_range_factor 2, use_pe, ksize 5 / 3 (models/dat_blocks.py picks [9, 7, 5, 3] by stage),
table = the map (14, 7). DAT++-T (configs/dat_tiny.yaml @ 32173fc lines 12-26) is deformable in every stage, heads
[2, 4, 8, 16], groups [1, 2, 4, 8], strides [8, 4, 2, 1], ksizes [9, 7, 5, 3], offset_range_factor -1.

Cost (MACs, N = H·W, Ns = Hk·Wk sampled points, G groups): qkv N·C² + 2·Ns·C², out_proj N·C²,
offsets Ns·C·ksize² + 2·Ns·C, attn_scores N·Ns·C, attn_values N·Ns·C; not seen by FlopCounterMode:
sampling 4·Ns·C (bilinear taps of grid_sample) and position_bias 4·heads·N·Ns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionMechanism, MacCount, check_heads
from .registry import register

VERSIONS = ("dat", "dat++")


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (DAT's ``LayerNormProxy``; parameters under ``norm``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv applied to channels-last ``x`` as the linear map it is."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def reference_grid(size: int, version: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cell centres of an axis of ``size`` cells in grid_sample's align_corners=True scale: (i + 0.5) / size
    · 2 - 1 for DAT v1, (i + 0.5) / (size - 1) · 2 - 1 for DAT++ (``_get_ref_points`` of each version)."""
    centres = torch.linspace(0.5, size - 0.5, size, device=device, dtype=dtype)
    return centres / (size if version == "dat" else size - 1) * 2 - 1


def query_grid(size: int, version: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Query positions of an axis of ``size`` tokens for the bias displacements: the cell centres for DAT v1,
    i / (size - 1) · 2 - 1 for DAT++ (its ``_get_q_grid``)."""
    if version == "dat":
        return reference_grid(size, version, device, dtype)
    return torch.arange(size, device=device, dtype=dtype) / (size - 1) * 2 - 1


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


@register("deformable")
class DeformableAttention(AttentionMechanism):
    """DAT / DAT++ deformable attention: keys/values bilinearly sampled at offset reference points, per group.

    Args:
        dim: channels C. num_heads: heads (DAT-T v1: 12 / 24 in stages 3 / 4; DAT++-T: 2, 4, 8, 16).
        n_groups: offset groups, each with its own sampling points; divides num_heads.
        stride: downsampling of the reference grid. ksize: kernel of the offset network's depthwise conv.
        offset_range_factor: f; offsets bounded to f / Hk (v1) or f / (Hk - 1) (DAT++) in normalized units;
            negative: unbounded, positions squashed by tanh (v1) or clamped to [-1, 1] (DAT++).
        use_pe: relative position bias sampled from a (heads, 2T_h-1, 2T_w-1) table, T = rpe_table_size (an
            int or (T_h, T_w): the map the block is built for).
        version: ``"dat"`` (DAT v1, LeapLabTHU/DAT @ 566a593) or ``"dat++"`` (DAT++, main); see the module
            docstring for what differs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 12,
        n_groups: int = 3,
        stride: int = 1,
        ksize: int = 5,
        offset_range_factor: float = 2.0,
        use_pe: bool = True,
        rpe_table_size: int | Sequence[int] = 14,
        version: str = "dat++",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
        if n_groups < 1 or num_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide num_heads={num_heads}")
        if stride < 1 or ksize < 1:
            raise ValueError(f"stride and ksize must be >= 1, got stride={stride}, ksize={ksize}")
        table_h, table_w = _pair(rpe_table_size)
        if min(table_h, table_w) < 1:
            raise ValueError(f"rpe_table_size must be >= 1, got {rpe_table_size}")
        self.version = version
        self.n_groups = n_groups
        self.group_channels = dim // n_groups
        self.stride = stride
        self.ksize = ksize
        self.offset_range_factor = offset_range_factor
        self.scale = self.head_dim**-0.5
        self.offset_padding = ksize // 2 if version == "dat" or ksize != stride else 0
        self.conv_offset = nn.Sequential(
            nn.Conv2d(self.group_channels, self.group_channels, ksize, stride, self.offset_padding,
                      groups=self.group_channels),
            ChannelsFirstLayerNorm(self.group_channels),
            nn.GELU(),
            nn.Conv2d(self.group_channels, 2, 1, bias=False),
        )
        self.proj_q, self.proj_k, self.proj_v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))
        if use_pe:
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * table_h - 1, 2 * table_w - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.register_parameter("rpe_table", None)

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        if self.version == "dat":
            return height, width
        least = 2 * self.stride
        return max(height, least), max(width, least)

    def _sample_grid_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple((n + 2 * self.offset_padding - self.ksize) // self.stride + 1 for n in (height, width))

    def _offset_bound(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor | None:
        """s per axis as a (1, 2, 1, 1) tensor (before the factor), or None where offsets stay unbounded.

        Both DAT versions build 1 / cells as a tensor of torch's default dtype (float32) whatever the input's
        dtype; it is rounded the same way here, so float64 runs equal DAT's to the last bits."""
        if self.version == "dat":
            cells = (grid_h, grid_w) if self.offset_range_factor > 0 else None
        else:
            cells = (grid_h - 1, grid_w - 1) if self.offset_range_factor >= 0 else None
        if cells is None:
            return None
        return torch.tensor([1.0 / cells[0], 1.0 / cells[1]], dtype=torch.float32).to(like).view(1, 2, 1, 1)

    def sampling_positions(self, q: torch.Tensor) -> torch.Tensor:
        """Deformed points p + Δp for queries q (B, H, W, C): (B·G, Hk, Wk, 2) as (y, x) in [-1, 1] units."""
        batch, height, width, _ = q.shape
        grouped = q.permute(0, 3, 1, 2).reshape(batch * self.n_groups, self.group_channels, height, width)
        offset = self.conv_offset(grouped)  # (B·G, 2, Hk, Wk)
        grid_h, grid_w = offset.shape[2:]
        bound = self._offset_bound(grid_h, grid_w, offset)
        if bound is not None:
            offset = offset.tanh() * bound * self.offset_range_factor
        reference = torch.stack(torch.meshgrid(
            reference_grid(grid_h, self.version, q.device, q.dtype),
            reference_grid(grid_w, self.version, q.device, q.dtype), indexing="ij"), dim=-1)
        positions = offset.permute(0, 2, 3, 1) + reference
        if self.offset_range_factor >= 0:
            return positions
        return positions.tanh() if self.version == "dat" else positions.clamp(-1.0, 1.0)

    def _position_bias(self, positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, heads, H·W, Ns): the table sampled at query-to-key displacements / 2."""
        groups_batch = positions.shape[0]
        queries = torch.stack(torch.meshgrid(
            query_grid(height, self.version, positions.device, positions.dtype),
            query_grid(width, self.version, positions.device, positions.dtype), indexing="ij"), dim=-1)
        displacement = (queries.reshape(1, -1, 1, 2) - positions.reshape(groups_batch, 1, -1, 2)) * 0.5
        table = self.rpe_table.reshape(1, self.n_groups, self.num_heads // self.n_groups, *self.rpe_table.shape[1:])
        table = table.expand(groups_batch // self.n_groups, -1, -1, -1, -1).flatten(0, 1)
        bias = F.grid_sample(table, displacement.flip(-1), mode="bilinear", align_corners=True)
        return bias.reshape(-1, self.num_heads, *bias.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        batch, height_in, width_in, channels = x.shape
        height, width = self._padded_size(height_in, width_in)
        x = F.pad(x, (0, 0, 0, width - width_in, 0, height - height_in))
        q = pointwise(self.proj_q, x)
        positions = self.sampling_positions(q)  # (B·G, Hk, Wk, 2)
        grouped_x = x.permute(0, 3, 1, 2).reshape(batch * self.n_groups, self.group_channels, height, width)
        sampled = F.grid_sample(grouped_x, positions.flip(-1), mode="bilinear", align_corners=True)
        sampled = sampled.reshape(batch, channels, -1).transpose(1, 2)  # (B, Ns, C)
        heads = self.num_heads
        q = q.reshape(batch, height * width, heads, self.head_dim).transpose(1, 2)
        k = pointwise(self.proj_k, sampled).unflatten(-1, (heads, self.head_dim)).transpose(1, 2)
        v = pointwise(self.proj_v, sampled).unflatten(-1, (heads, self.head_dim)).transpose(1, 2)
        bias = self._position_bias(positions, height, width) if self.rpe_table is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = pointwise(self.proj_out, out.transpose(1, 2).reshape(batch, height, width, channels))
        return out[:, :height_in, :width_in].contiguous()

    def keys_per_query(self, height: int, width: int) -> float:
        grid_h, grid_w = self._sample_grid_size(*self._padded_size(height, width))
        return float(grid_h * grid_w)

    def macs(self, height: int, width: int) -> MacCount:
        height, width = self._padded_size(height, width)
        grid_h, grid_w = self._sample_grid_size(height, width)
        tokens, samples, c = height * width, grid_h * grid_w, self.dim
        parts = {
            "qkv": tokens * c * c + 2 * samples * c * c,
            "out_proj": tokens * c * c,
            "offsets": samples * c * self.ksize**2 + 2 * samples * c,
            "attn_scores": tokens * samples * c,
            "attn_values": tokens * samples * c,
            "sampling": 4 * samples * c,
        }
        blind = {"sampling"}
        if self.rpe_table is not None:
            parts["position_bias"] = 4 * self.num_heads * tokens * samples
            blind.add("position_bias")
        return MacCount(parts, frozenset(blind))
