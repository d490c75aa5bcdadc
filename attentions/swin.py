"""Window attention with relative position bias, and its shifted variant: Swin Transformer
(Liu et al., ICCV 2021, arXiv 2103.14030).

The map is split into non-overlapping M × M windows (M = ``window_size``); each token attends to the tokens
of its window:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d + B) V,     B = relative position bias, B̂ ∈ R^{(2M-1)×(2M-1)} per head

With ``shift_size`` s > 0 (SW-MSA) the map is cyclically rolled by (-s, -s) first; pairs of tokens in one
window that came from different sub-regions of the rolled map get -100 added to their score (the Swin
mask), and the output is rolled back. Sizes that are not multiples of M are zero-padded at the bottom and
right after the roll and cropped after the attention, as timm's ``SwinTransformerBlock`` does; padded tokens
are attended like the others there, and here.

Parameter names and shapes are those of timm's ``timm.models.swin_transformer.WindowAttention`` (qkv, proj,
relative_position_bias_table; the index is a non-persistent buffer), read in timm 1.0 and the official
microsoft/Swin-Transformer models/swin_transformer.py. Swin-T (4.5 GMACs): window 7, heads [3, 6, 12, 24]
(head_dim 32), shift_size 0 and 3 in alternate blocks, qkv_bias True. A backbone whose map fits in one
window (Swin-T's last stage at 224²) passes shift_size=0 there, as Swin does; this module shifts whenever
it is told to.

Cost (MACs, Hp × Wp the padded size): qkv 3·Hp·Wp·C², out_proj Hp·Wp·C², attn_scores Hp·Wp·M²·C,
attn_values Hp·Wp·M²·C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import merge_heads, pad_bottom_right, split_heads, window_merge, window_partition
from .base import AttentionMechanism, MacCount, check_heads
from .registry import register

SHIFT_MASK_VALUE = -100.0  # the Swin papers' and timm's value for pairs across sub-regions of a shifted window


def relative_position_index(window: int) -> torch.Tensor:
    """(M², M²) index into the (2M-1)² bias table: (Δy + M - 1) · (2M - 1) + (Δx + M - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, M², M²), each in [0, 2M-2]
    return delta[0] * (2 * window - 1) + delta[1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, M², M²) additive mask of SW-MSA for a rolled, padded (height × width) map: 0 within a
    sub-region, SHIFT_MASK_VALUE across sub-regions. Sub-regions are the 3 × 3 grid cut at -M and -s."""
    labels = torch.zeros(height, width)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        labels[rows, cols] = label
    windows = window_partition(labels[None, :, :, None], window, window).squeeze(-1)  # (nW, M²)
    different = windows[:, :, None] != windows[:, None, :]
    return different.float() * SHIFT_MASK_VALUE


@register("swin")
class ShiftedWindowAttention(AttentionMechanism):
    """Swin window attention with relative position bias; shifted windows (SW-MSA) when shift_size > 0.

    Args:
        dim: channels C. num_heads: heads (Swin-T: 3, 6, 12, 24 by stage).
        window_size: window side M (Swin-T: 7). shift_size: cyclic shift s, 0 ≤ s < M (Swin: M // 2 in
            every second block). qkv_bias: bias in the qkv projection (Swin: True).
        qk_scale: softmax temperature; None means head_dim ** -0.5.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 3,
        window_size: int = 7,
        shift_size: int = 0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        head_dim = check_heads(dim, num_heads)
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.scale = qk_scale or head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _attention_bias(self, padded_h: int, padded_w: int, x: torch.Tensor) -> torch.Tensor:
        """(nW or 1, heads, M², M²): relative position bias, plus the shift mask when shifting."""
        area = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(area, area, self.num_heads).permute(2, 0, 1)[None]
        if self.shift_size:
            mask = shifted_window_mask(padded_h, padded_w, self.window_size, self.shift_size)
            bias = bias + mask.to(device=x.device, dtype=x.dtype)[:, None]
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        batch, height, width, channels = x.shape
        shift, window = self.shift_size, self.window_size
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        x, _, _ = pad_bottom_right(x, window, window)
        padded_h, padded_w = x.shape[1:3]
        windows = window_partition(x, window, window)  # (B·nW, M², C)
        q, k, v = split_heads(self.qkv(windows), 3 * self.num_heads).chunk(3, dim=1)
        bias = self._attention_bias(padded_h, padded_w, x)  # (nW or 1, heads, M², M²)
        bias = bias.expand(batch, -1, -1, -1, -1).reshape(-1, *bias.shape[1:]) if shift else bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        out = self.proj(merge_heads(out))
        out = window_merge(out, window, window, padded_h, padded_w)[:, :height, :width]
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.contiguous()

    def keys_per_query(self, height: int, width: int) -> float:
        """M² without a shift; with one, the window's tokens of the query's own sub-region, averaged over
        the real (unpadded) queries."""
        window = self.window_size
        if not self.shift_size:
            return float(window * window)
        padded_h, padded_w = height + (-height % window), width + (-width % window)
        allowed = (shifted_window_mask(padded_h, padded_w, window, self.shift_size) == 0).sum(-1)  # (nW, M²)
        per_token = window_merge(allowed[..., None].float(), window, window, padded_h, padded_w)
        return float(per_token[0, :height, :width].mean())

    def macs(self, height: int, width: int) -> MacCount:
        window = self.window_size
        tokens = (height + (-height % window)) * (width + (-width % window))
        c = self.dim
        return MacCount({
            "qkv": 3 * tokens * c * c,
            "out_proj": tokens * c * c,
            "attn_scores": tokens * window * window * c,
            "attn_values": tokens * window * window * c,
        })
