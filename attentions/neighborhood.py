"""Neighborhood (sliding-window) attention: NAT (Hassani et al., CVPR 2023, arXiv 2204.07143) and its
dilated form DiNAT (Hassani & Shi 2022, arXiv 2209.15001).

Each query attends to a k × k neighbourhood of keys (k = ``kernel_size``, odd). Near the borders the
neighbourhood is not cut off but shifted inwards, so every query sees exactly k² keys:

    NA(X_ij) = softmax(Q_ij K_ρ(ij)ᵀ / √d + B(i,j,ρ)) V_ρ(ij),
    ρ(ij) = rows start_H(i) … start_H(i)+k-1 × columns start_W(j) … start_W(j)+k-1,
    start(i) = clamp(i - ⌊k/2⌋, 0, L - k)                                   (per axis of length L)

With dilation δ the axis is split by residue i mod δ into δ interleaved sub-axes and the rule above is
applied inside the sub-axis of i (neighbours δ apart). B is the relative position bias ``rpb`` of shape
(heads, 2k-1, 2k-1), indexed by the key's offset from the query (in steps of δ) plus k-1.

Follows SHI-Labs/NATTEN src/natten/na2d.py (``NeighborhoodAttention2D``: parameter names qkv, rpb, proj) and
the window-start rule of its reference kernels; the classification models of
SHI-Labs/Neighborhood-Attention-Transformer classification/nat.py. As NATTEN's module did, a map smaller
than k·δ along an axis is zero-padded up to it (bottom/right) and the output cropped. NAT-T (4.3 GMACs):
kernel 7, dilation 1, heads [2, 4, 8, 16], dims 64·2^i, rel_pos_bias on; DiNAT-T dilations
[[1, 8], [1, 4], [1, 2, …], [1, 1]] at 224².

This is pure PyTorch (index tensors and gathers). ``impl="natten"`` runs the same module through the
``natten`` package when it is installed (CPU forward, no rpb there): an optional extra, tested against
this path where present.

Cost (MACs, Hp × Wp padded): qkv 3·HpWp·C², out_proj HpWp·C², attn_scores HpWp·k²·C, attn_values HpWp·k²·C.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionMechanism, MacCount, check_heads
from .registry import register

BACKENDS = ("torch", "natten")


def neighborhood_index(length: int, kernel_size: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position of an axis of ``length`` (≥ kernel_size · dilation): the (length, k) key positions
    of its neighbourhood, and their (length, k) offsets into the 2k-1 relative-position-bias entries."""
    position = torch.arange(length)
    residue, step = position % dilation, position // dilation
    sub_length = (length - residue + dilation - 1) // dilation  # positions sharing this residue
    start = torch.minimum((step - kernel_size // 2).clamp(min=0), sub_length - kernel_size)
    steps = start[:, None] + torch.arange(kernel_size)  # (L, k), in sub-axis steps
    keys = residue[:, None] + dilation * steps
    bias_offset = steps - step[:, None] + kernel_size - 1
    return keys, bias_offset


@register("neighborhood")
class NeighborhoodAttention(AttentionMechanism):
    """Neighborhood attention (NAT/DiNAT): each query attends to its k × k neighbourhood, clamped at borders.

    Args:
        dim: channels C. num_heads: heads (NAT-T: 2, 4, 8, 16 by stage).
        kernel_size: neighbourhood side k, odd (NAT: 7). dilation: δ (NAT: 1; DiNAT: up to map size / k).
        rel_pos_bias: learnable (heads, 2k-1, 2k-1) bias ``rpb`` (NAT: True).
        qkv_bias: bias in qkv (NAT: True). qk_scale: softmax temperature (None: head_dim ** -0.5).
        impl: the backend, ``"torch"`` (pure PyTorch) or ``"natten"`` (the natten package, if installed); the
            same option name as ``bra``'s backends.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        kernel_size: int = 7,
        dilation: int = 1,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        impl: str = "torch",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        if impl not in BACKENDS:
            raise ValueError(f"impl must be one of {', '.join(BACKENDS)}, got {impl!r}")
        if impl == "natten" and rel_pos_bias:
            raise ValueError("impl='natten' supports no relative position bias: set rel_pos_bias=False")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.impl = impl
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        if self.impl == "natten" and importlib.util.find_spec("natten") is None:
            return ["impl='natten' needs the natten package, which is not installed"]
        return []

    def plain(self) -> NeighborhoodAttention:
        """The same module on the pure PyTorch path (the reference for the natten backend)."""
        plain = copy.deepcopy(self)
        plain.impl = "torch"
        return plain

    def keys_per_query(self, height: int, width: int) -> float:
        return float(self.kernel_size**2)

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        span = self.kernel_size * self.dilation
        return max(height, span), max(width, span)

    def _attend_torch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, heads, H, W, d) -> (B, heads, H, W, d), gathering each query's k² keys."""
        height, width = q.shape[2:4]
        rows, row_bias = neighborhood_index(height, self.kernel_size, self.dilation)
        cols, col_bias = neighborhood_index(width, self.kernel_size, self.dilation)
        rows, cols = rows.to(q.device), cols.to(q.device)
        # (B, heads, H, W, k, k, d): key (rows[i, a], cols[j, b]) for query (i, j)
        keys = k[:, :, rows[:, None, :, None], cols[None, :, None, :]]
        values = v[:, :, rows[:, None, :, None], cols[None, :, None, :]]
        scores = torch.einsum("nhijd,nhijuvd->nhijuv", q * self.scale, keys)
        if self.rpb is not None:
            row_bias, col_bias = row_bias.to(q.device), col_bias.to(q.device)
            scores = scores + self.rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
        weights = scores.flatten(-2).softmax(dim=-1).unflatten(-1, (self.kernel_size, self.kernel_size))
        return torch.einsum("nhijuv,nhijuvd->nhijd", weights, values)

    def _attend_natten(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from natten.functional import na2d  # optional extra

        layout = (0, 2, 3, 1, 4)  # natten takes (B, H, W, heads, d)
        out = na2d(*(t.permute(layout).contiguous() for t in (q, k, v)), kernel_size=self.kernel_size,
                   dilation=self.dilation, scale=self.scale)
        return out.permute(0, 3, 1, 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        height, width = x.shape[1:3]
        padded_h, padded_w = self._padded_size(height, width)
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, H, W, 3, heads, d)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        attend = self._attend_natten if self.impl == "natten" else self._attend_torch
        out = attend(q, k, v).permute(0, 2, 3, 1, 4).flatten(3)
        return self.proj(out)[:, :height, :width].contiguous()

    def macs(self, height: int, width: int) -> MacCount:
        padded_h, padded_w = self._padded_size(height, width)
        tokens, c = padded_h * padded_w, self.dim
        attended = tokens * self.kernel_size**2 * c
        return MacCount({
            "qkv": 3 * tokens * c * c,
            "out_proj": tokens * c * c,
            "attn_scores": attended,
            "attn_values": attended,
        })
