"""Axial attention: every token attends along its row and along its column.

Two compositions are in use, and both are offered (``composition``):

* ``"parallel"`` (default): the heads are split in two halves over one qkv projection; the first half
  (the first C/2 channels) attends along the column (the H axis), the second along the row (the W axis),
  and their outputs are concatenated before the output projection. This is the "axial stripe" row of the
  BiFormer ablation: cross-shaped window attention with stripes one token wide and no LePE (CSWin, Dong et
  al. CVPR 2022, microsoft/CSWin-Transformer models/cswin.py with split_size 1, whose branch 0 takes the
  first channel half in vertical stripes). The head order is CSWin's, and so are the parameter names qkv
  and proj: CSWin split-1 weights load here as the same function, less LePE.
* ``"sequential"``: height-axis attention followed by width-axis attention, each with its own qkv projection
  and all heads, then one output projection, as the axial-attention block of Axial-DeepLab (Wang et al.,
  ECCV 2020) and the axial layers of Ho et al. 2019. Axial-DeepLab's position-sensitive terms are left out:
  no mechanism here carries a position bias unless its own paper's attention row does.

    row(i, j)    = softmax(q_ij K_iᵀ / √d) V_i      (K_i, V_i: row i, W tokens)
    column(i, j) = softmax(q_ij K_jᵀ / √d) V_j      (K_j, V_j: column j, H tokens)

Any H and W work; nothing is padded. Cost (MACs): parallel — qkv 3HWC², out_proj HWC², attn_scores
HW(W+H)C/2, attn_values HW(W+H)C/2; sequential — qkv 6HWC², out_proj HWC², attn_scores HW(W+H)C,
attn_values HW(W+H)C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionMechanism, MacCount, check_heads
from .registry import register

COMPOSITIONS = ("parallel", "sequential")


def attend_along(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: str, scale: float) -> torch.Tensor:
    """Attention within rows (``axis='row'``) or columns (``'column'``); q, k, v (B, heads, H, W, d)."""
    if axis == "column":
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # batched over (B, heads, rows)
    return out.transpose(2, 3) if axis == "column" else out


@register("axial")
class AxialAttention(AttentionMechanism):
    """Axial attention along rows and columns, heads split in parallel (axial stripe) or sequential.

    Args:
        dim: channels C. num_heads: heads (even for ``parallel``: half per axis).
        composition: ``"parallel"`` or ``"sequential"`` (see the module docstring).
        qkv_bias: bias in the qkv projection(s). qk_scale: softmax temperature (None: head_dim ** -0.5).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        composition: str = "parallel",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}, got {composition!r}")
        if composition == "parallel" and num_heads % 2:
            raise ValueError(f"composition='parallel' splits the heads in two: num_heads={num_heads} must be even")
        self.composition = composition
        self.scale = qk_scale or self.head_dim**-0.5
        if composition == "parallel":
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.qkv_column = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.qkv_row = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, linear: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> q, k, v each (B, heads, H, W, head_dim)."""
        qkv = linear(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, H, W, 3, heads, d)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        if self.composition == "parallel":
            q, k, v = self._qkv(self.qkv, x)
            half = self.num_heads // 2
            out = torch.cat([
                attend_along(q[:, :half], k[:, :half], v[:, :half], "column", self.scale),  # CSWin's branch 0
                attend_along(q[:, half:], k[:, half:], v[:, half:], "row", self.scale),
            ], dim=1)
        else:
            out = attend_along(*self._qkv(self.qkv_column, x), "column", self.scale)
            out = out.permute(0, 2, 3, 1, 4).flatten(3)  # (B, H, W, C)
            out = attend_along(*self._qkv(self.qkv_row, out), "row", self.scale)
        return self.proj(out.permute(0, 2, 3, 1, 4).flatten(3))

    def keys_per_query(self, height: int, width: int) -> float:
        # parallel: half the heads see a column (H keys), half a row (W); sequential: every head sees both
        return float(width + height) / (2 if self.composition == "parallel" else 1)

    def macs(self, height: int, width: int) -> MacCount:
        tokens, c = height * width, self.dim
        passes = 1 if self.composition == "parallel" else 2  # sequential: both axes with every head
        # parallel: half the channels see H keys, half see W keys
        attended_channels = tokens * (width + height) * c * passes // 2
        return MacCount({
            "qkv": 3 * tokens * c * c * passes,
            "out_proj": tokens * c * c,
            "attn_scores": attended_channels,
            "attn_values": attended_channels,
        })
