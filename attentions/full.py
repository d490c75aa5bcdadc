"""Full (global) multi-head self-attention over all H·W tokens.

    Attention(Q, K, V) = softmax(Q Kᵀ · scale) V,   Q, K, V = X W_q, X W_k, X W_v      (Vaswani et al. 2017)

computed with ``torch.nn.functional.scaled_dot_product_attention``. With ``side_dwconv > 0`` a depthwise
conv of the input is added before the output projection: this is BiFormer's last-stage attention
(``AttentionLePE`` in rayleizhu/BiFormer models/_common.py, its ``topk=-2`` blocks), whose parameter names
(qkv, proj, lepe) this module keeps.

Cost (MACs, N = H·W):  qkv 3NC² + out_proj NC² + attn_scores N²C + attn_values N²C + local_context N·C·k².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import conv_nhwc, depthwise_conv, depthwise_conv_macs
from .base import AttentionMechanism, MacCount, check_heads
from .registry import register


@register("full")
class FullAttention(AttentionMechanism):
    """Global multi-head self-attention over all tokens (SDPA), optionally with BiFormer's LePE conv.

    Args:
        dim: channels C of the input and output.
        num_heads: attention heads; dim must divide by it.
        qkv_bias: bias in the fused qkv projection (timm's ViT: True; BiFormer's last stage: False).
        qk_scale: softmax temperature; None means head_dim ** -0.5.
        side_dwconv: kernel of the depthwise conv on the attention input added to the output
            (BiFormer's ``AttentionLePE``); 0 turns it off.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        side_dwconv: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        self.scale = qk_scale or self.head_dim**-0.5
        self.side_dwconv = side_dwconv
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if side_dwconv > 0:
            self.lepe = depthwise_conv(dim, side_dwconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        self.check_input(x)
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        qkv = self.qkv(tokens).reshape(batch, height * width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        if self.side_dwconv > 0:
            out = out + conv_nhwc(self.lepe, x)
        return self.proj(out)

    def keys_per_query(self, height: int, width: int) -> float:
        return float(height * width)

    def macs(self, height: int, width: int) -> MacCount:
        tokens, c = height * width, self.dim
        parts = {
            "qkv": 3 * tokens * c * c,
            "out_proj": tokens * c * c,
            "attn_scores": tokens * tokens * c,
            "attn_values": tokens * tokens * c,
        }
        if self.side_dwconv > 0:
            parts["local_context"] = depthwise_conv_macs(height, width, c, self.side_dwconv)
        return MacCount(parts)
