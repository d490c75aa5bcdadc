"""Attention mechanisms for vision backbones behind one interface, built by name from one registry.

    >>> import attentions
    >>> attn = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4)
    >>> attn(torch.randn(1, 56, 56, 64)).shape   # (B, H, W, C) in, same shape out
    torch.Size([1, 56, 56, 64])

One file per mechanism; each states its paper equation and its analytic cost (``macs``) beside the code.
"""

from . import axial, bra, cswin, deformable, full, neighborhood, quadtree, spatial_reduction, swin  # noqa: F401  (importing a mechanism's module registers it)
from .base import AttentionMechanism, MacCount
from .registry import ENTRY_POINT_GROUP, available, create, get, options, register

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttentionMechanism",
    "MacCount",
    "available",
    "create",
    "get",
    "options",
    "register",
]
