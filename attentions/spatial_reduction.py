"""Spatial-reduction attention (SRA): PVT (Wang et al., ICCV 2021, arXiv 2102.12122).

Keys and values come from a spatially reduced copy of the input: a conv of kernel and stride R
(``sr_ratio``) followed by LayerNorm, so every query attends to all (H/R)·(W/R) reduced tokens:

    SRA(Q, K, V) = Concat(head_1 … head_N) W_o,   head_j = Attention(Q W_j^Q, SR(K) W_j^K, SR(V) W_j^V)
    SR(X) = LayerNorm(Conv_{R×R, stride R}(X))

Follows whai362/PVT classification/pvt.py (``Attention``; parameter names q, kv, sr, norm, proj; the
strided conv floors, so trailing rows/columns that do not fill an R × R patch are dropped from the keys as
there). PVT-S (3.8 GMACs): dims [64, 128, 320, 512], heads [1, 2, 5, 8], sr_ratio [8, 4, 2, 1],
qkv_bias True. sr_ratio 1 is plain global attention (no conv, no norm).

Cost (MACs, h' × w' = ⌊H/R⌋ × ⌊W/R⌋): qkv H·W·C² (q) + 2·h'w'·C² (kv), kv_reduction h'w'·C²·R²,
out_proj HWC², attn_scores HW·h'w'·C, attn_values HW·h'w'·C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import conv_nhwc, merge_heads, split_heads
from .base import AttentionMechanism, MacCount, check_heads
from .registry import register


@register("spatial_reduction")
class SpatialReductionAttention(AttentionMechanism):
    """PVT spatial-reduction attention: global attention over keys/values reduced by a strided conv + LN.

    Args:
        dim: channels C. num_heads: heads (PVT-S: 1, 2, 5, 8 by stage).
        sr_ratio: reduction R, the conv's kernel and stride (PVT-S: 8, 4, 2, 1 by stage).
        qkv_bias: bias in q and kv (PVT: True). qk_scale: softmax temperature (None: head_dim ** -0.5).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        sr_ratio: int = 2,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        head_dim = check_heads(dim, num_heads)
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.sr_ratio = sr_ratio
        self.scale = qk_scale or head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _reduced_size(self, height: int, width: int) -> tuple[int, int]:
        if height < self.sr_ratio or width < self.sr_ratio:
            raise ValueError(
                f"spatial_reduction: H={height} and W={width} must be >= sr_ratio={self.sr_ratio}"
            )
        return height // self.sr_ratio, width // self.sr_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        batch, height, width, channels = x.shape
        self._reduced_size(height, width)
        reduced = self.norm(conv_nhwc(self.sr, x)) if self.sr_ratio > 1 else x
        q = split_heads(self.q(x).reshape(batch, height * width, channels), self.num_heads)
        k, v = split_heads(self.kv(reduced).flatten(1, 2), 2 * self.num_heads).chunk(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(merge_heads(out)).reshape(batch, height, width, channels)

    def keys_per_query(self, height: int, width: int) -> float:
        reduced_h, reduced_w = self._reduced_size(height, width)
        return float(reduced_h * reduced_w)

    def macs(self, height: int, width: int) -> MacCount:
        reduced_h, reduced_w = self._reduced_size(height, width)
        tokens, keys, c = height * width, reduced_h * reduced_w, self.dim
        parts = {
            "qkv": tokens * c * c + 2 * keys * c * c,
            "out_proj": tokens * c * c,
            "attn_scores": tokens * keys * c,
            "attn_values": tokens * keys * c,
        }
        if self.sr_ratio > 1:
            parts["kv_reduction"] = keys * c * c * self.sr_ratio**2
        return MacCount(parts)
