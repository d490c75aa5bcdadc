"""Deformable multi-head attention: DAT (Xia et al., CVPR 2022, arXiv 2201.00520), its DAttention module.

Queries come from every token; keys and values from features bilinearly sampled at a few deformed points
shared by all queries of an offset group:

    q = x W_q,   Δp = s · tanh(θ_offset(q)),   x̃ = φ(x; p + Δp),   k̃ = x̃ W_k,   ṽ = x̃ W_v
    z⁽ᵐ⁾ = softmax(q⁽ᵐ⁾ k̃⁽ᵐ⁾ᵀ / √d + φ(B̂; R)) ṽ⁽ᵐ⁾,   z = Concat(z⁽¹⁾ … z⁽ᴹ⁾) W_o

p is a uniform grid of reference points, one per cell of the map downsampled by ``stride`` (the stride of
the offset network's depthwise conv); θ_offset is depthwise conv (``ksize``) → LayerNorm → GELU → 1×1 conv to
2 offsets per group, run on the queries of each of the ``n_groups`` channel groups; s =
``offset_range_factor`` / (size - 1) bounds the offsets (a negative factor leaves them unbounded and clamps
p + Δp to the map). φ is bilinear sampling (``grid_sample``, align_corners=True, zeros outside). B̂ is a
learnable table of relative position biases of shape (heads, 2T-1, 2T-1), sampled bilinearly at the
query-to-key displacements R (``use_pe``).

Follows LeapLabTHU/DAT models/dat_blocks.py (``DAttentionBaseline``, current main: reference points
linspace(0.5, n-0.5)/(n-1)·2-1, offset range 1/(n-1), clamp for a negative factor), read, not copied.
Parameter names are DAT's (proj_q/k/v/out as 1×1 convs, conv_offset.{0,1.norm,3}, rpe_table). Deviations:
DAT sizes the bias table from the query map fixed at construction; here its side T = ``rpe_table_size``
is an option (DAT-T's stage-3 map at 224²: 14) and, as in DAT, the table is sampled continuously, so any H, W
work. Only DAT's default bias (use_pe without dwc_pe/fixed_pe/log_cpb) is offered, and use_pe=False turns
it off. DAT does not pad; maps with fewer than 2·stride rows or columns (where DAT divides by zero) are
zero-padded up to it and cropped. DAT-T (4.6 GMACs, Swin-T layout): deformable blocks in stages 3 and 4,
heads 12/24, n_groups 3/6, stride 1, offset_range_factor 2, use_pe True, ksize 5/3 (DAT v1 picks the kernel
from the map size: 56→9, 28→7, 14→5, 7→3).

Cost (MACs, N = H·W, Ns = Hk·Wk sampled points, G groups): qkv N·C² + 2·Ns·C², out_proj N·C²,
offsets Ns·C·ksize² + 2·Ns·C, attn_scores N·Ns·C, attn_values N·Ns·C; not seen by FlopCounterMode:
sampling 4·Ns·C (bilinear taps of grid_sample) and position_bias 4·heads·N·Ns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionMechanism, MacCount, check_heads
from .registry import register


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


def normalized_grid(size: int, offset: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Points ``offset, offset+1, …`` of an axis of ``size`` in grid_sample's align_corners=True scale,
    mapped as DAT does: p / (size - 1) · 2 - 1."""
    return torch.linspace(offset, size - 1 + offset, size, device=device, dtype=dtype) / (size - 1) * 2 - 1


@register("deformable")
class DeformableAttention(AttentionMechanism):
    """DAT deformable attention: keys/values bilinearly sampled at offset reference points, per offset group.

    Args:
        dim: channels C. num_heads: heads (DAT-T: 12 in stage 3, 24 in stage 4).
        n_groups: offset groups, each with its own sampling points (DAT-T: 3, 6); divides num_heads.
        stride: downsampling of the reference grid (DAT-T: 1). ksize: kernel of the offset network's
            depthwise conv (DAT-T: 5 at 14², 3 at 7²).
        offset_range_factor: offsets bounded to factor / (size - 1) in normalized units (DAT-T: 2); negative:
            unbounded, positions clamped to [-1, 1].
        use_pe: relative position bias sampled from a (heads, 2T-1, 2T-1) table, T = rpe_table_size.
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
        rpe_table_size: int = 14,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        if n_groups < 1 or num_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide num_heads={num_heads}")
        if stride < 1 or ksize < 1:
            raise ValueError(f"stride and ksize must be >= 1, got stride={stride}, ksize={ksize}")
        if rpe_table_size < 1:
            raise ValueError(f"rpe_table_size must be >= 1, got {rpe_table_size}")
        self.n_groups = n_groups
        self.group_channels = dim // n_groups
        self.stride = stride
        self.ksize = ksize
        self.offset_range_factor = offset_range_factor
        self.scale = self.head_dim**-0.5
        padding = ksize // 2 if ksize != stride else 0
        self.conv_offset = nn.Sequential(
            nn.Conv2d(self.group_channels, self.group_channels, ksize, stride, padding, groups=self.group_channels),
            ChannelsFirstLayerNorm(self.group_channels),
            nn.GELU(),
            nn.Conv2d(self.group_channels, 2, 1, bias=False),
        )
        self.proj_q, self.proj_k, self.proj_v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))
        if use_pe:
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * rpe_table_size - 1, 2 * rpe_table_size - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.register_parameter("rpe_table", None)

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        least = 2 * self.stride
        return max(height, least), max(width, least)

    def _sample_grid_size(self, height: int, width: int) -> tuple[int, int]:
        padding = self.ksize // 2 if self.ksize != self.stride else 0
        return tuple((n + 2 * padding - self.ksize) // self.stride + 1 for n in (height, width))

    def sampling_positions(self, q: torch.Tensor) -> torch.Tensor:
        """Deformed points p + Δp for queries q (B, H, W, C): (B·G, Hk, Wk, 2) as (y, x) in [-1, 1] units."""
        batch, height, width, _ = q.shape
        grouped = q.permute(0, 3, 1, 2).reshape(batch * self.n_groups, self.group_channels, height, width)
        offset = self.conv_offset(grouped)  # (B·G, 2, Hk, Wk)
        grid_h, grid_w = offset.shape[2:]
        if self.offset_range_factor >= 0:
            offset_range = offset.new_tensor([1.0 / (grid_h - 1), 1.0 / (grid_w - 1)]).view(1, 2, 1, 1)
            offset = offset.tanh() * offset_range * self.offset_range_factor
        reference = torch.stack(torch.meshgrid(
            normalized_grid(grid_h, 0.5, q.device, q.dtype), normalized_grid(grid_w, 0.5, q.device, q.dtype),
            indexing="ij"), dim=-1)
        positions = offset.permute(0, 2, 3, 1) + reference
        return positions if self.offset_range_factor >= 0 else positions.clamp(-1.0, 1.0)

    def _position_bias(self, positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, heads, H·W, Ns): the table sampled at query-to-key displacements / 2."""
        groups_batch = positions.shape[0]
        query_grid = torch.stack(torch.meshgrid(
            normalized_grid(height, 0.0, positions.device, positions.dtype),
            normalized_grid(width, 0.0, positions.device, positions.dtype), indexing="ij"), dim=-1)
        displacement = (query_grid.reshape(1, -1, 1, 2) - positions.reshape(groups_batch, 1, -1, 2)) * 0.5
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
