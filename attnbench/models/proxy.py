"""The isotropic proxy backbone of the colour-pointer ablation (attnbench/data/colour_pointer.py).

A patch-2 stem (2×2 stride-2 conv + LayerNorm: 32×32 pixels -> 16×16 tokens of C = 64), ``depth`` pre-norm
blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` at that one resolution (no pyramid, so no stage becomes global
by shrinking the map), a final LayerNorm and a linear classifier on **one token: the query's**. No position
embedding: full attention is then blind to position, which the task does not need (the partner is found
by colour), and the local mechanisms keep only the positional reach of their own design.

How the query position reaches the head: the model finds it in its input, deterministically, with no
learned parameter and nothing from the data set besides the image. The colour pointer's query is the only
2×2 cell whose diagonal pixels match each other, whose anti-diagonal pixels match each other, and whose
diagonal differs from its anti-diagonal (a checker); for each cell the score

    s = Σ_channels |p00 - p01| + |p11 - p10| - |p00 - p11| - |p01 - p10|

is large for the checker and at most ~0 for the notched squares and the noisy background, and its argmax
over the cells is the query token (``locate_query``; exact on every generated image, tested). Reading one
token instead of pooling removes the pooling shortcut: what the head sees is what attention carried to
the query in ``depth`` blocks.

``attention`` names an entry of ``PROXY_ATTENTION`` (options scaled to 16×16 tokens, with the reason for
each) or any registered mechanism; ``attention_options`` overrides or extends its options.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

import attentions

from ._blocks import TimmClassifier, build, init_weights
from .biformer_stl import STLBlock

TOKENS = 16  # tokens per side at the proxy's 32×32 input and patch 2

# Mechanism -> {"options": ..., "odd_block_options": ...} at 16×16 tokens, depth 2, 2 heads of 32 channels.
# The reason for each choice is in its comment; "reach" is how far (Chebyshev, in tokens) information can
# travel to a token in the two blocks.
PROXY_ATTENTION: dict[str, dict[str, Any]] = {
    # every token attends to all 256: the upper bound on reach (global in one block)
    "full": {},
    # BRA: S = 4 regions per side (4×4 tokens each, as BiFormer-STL's S = 7 gives 8×8-token regions at 56²
    # and 4×4 at 28²); top-k 2 of 16 regions = 1/8 of the tokens per query (BiFormer's stage-2 ratio 4/49
    # is 1/12); LCE 3×3 (local reach 1 per block, less than the routed regions)
    "bra": {"options": {"n_win": 4, "topk": 2, "side_dwconv": 3}},
    # Swin: window 4 (16 keys; 7 would not tile 16), shifted by half a window in the second block as
    # Swin-T does; reach 5 in two blocks, purely local
    "swin": {"options": {"window_size": 4}, "odd_block_options": {"shift_size": 2}},
    # axial stripes (one head along rows, one along columns): reaches any token in two blocks
    "axial": {},
    # CSWin: stripes 2 wide (CSWin-T's stage-2 width, its map 28² nearest 16²): 32 keys per branch; two
    # blocks of crossing stripes reach any token
    "cswin": {"options": {"split_size": 2}},
    # NAT: kernel 5 (25 keys, near Swin's 16; NAT's 7 would reach 6 inside the map, 9 at its border); reach 4
    # in two blocks, 6 at the border (windows shift inwards there): purely local
    "neighborhood": {"options": {"kernel_size": 5}},
    # PVT: reduction 2 gives 8×8 = 64 keys, PVT-S's stage-3 map (7×7 at its 14² queries); global but coarse
    "spatial_reduction": {"options": {"sr_ratio": 2}},
    # DAT-T's deformable stage 3 (v1): stride 1 (one sampling point per token: 256 deformed keys), offset
    # range factor 2, depthwise offset kernel 5, bias table of the map's side; 2 offset groups (DAT's 3 does
    # not divide 2 heads)
    "deformable": {"options": {"n_groups": 2, "stride": 1, "ksize": 5, "offset_range_factor": 2.0,
                               "rpe_table_size": TOKENS}},
    # QuadTree-B: 2 levels, so the coarse level is 8×8 (QuadTree-B-b2's coarsest maps are 7×7); each query
    # keeps the top 8 coarse cells and attends to their 32 children
    "quadtree": {"options": {"levels": 2, "topks": (8, 8)}},
}


def locate_query(images: torch.Tensor, cell: int = 2) -> torch.Tensor:
    """(B, 3, H, W) -> (B,) index of the cell (row-major over the H/cell × W/cell grid) with the highest
    checker score (module docstring). Any per-channel positive scaling of the pixels (normalisation) keeps
    the checker's lead."""
    batch, channels, height, width = images.shape
    cells = images.reshape(batch, channels, height // cell, cell, width // cell, cell)
    p00, p01 = cells[:, :, :, 0, :, 0], cells[:, :, :, 0, :, 1]
    p10, p11 = cells[:, :, :, 1, :, 0], cells[:, :, :, 1, :, 1]
    score = ((p00 - p01).abs() + (p11 - p10).abs() - (p00 - p11).abs() - (p01 - p10).abs()).sum(1)
    return score.flatten(1).argmax(1)


class IsotropicProxy(TimmClassifier):
    """Patch-2 stem, ``depth`` blocks of one attention mechanism at one resolution, head on the query token."""

    def __init__(self, attention: str = "full", attention_options: dict[str, Any] | None = None,
                 embed_dim: int = 64, depth: int = 2, num_heads: int = 2, mlp_ratio: float = 4.0,
                 patch_size: int = 2, drop_path_rate: float = 0.0, drop_rate: float = 0.0, in_chans: int = 3,
                 num_classes: int = 4) -> None:
        super().__init__()
        preset = PROXY_ATTENTION.get(attention, {})
        options = {**preset.get("options", {}), **(attention_options or {})}
        odd_options = preset.get("odd_block_options", {})
        self.attention, self.patch_size = attention, patch_size
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dim
        self.drop_rate = drop_rate
        self.stem = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.stem_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            STLBlock(embed_dim, attentions.create(attention, dim=embed_dim, num_heads=num_heads,
                                                  **{**options, **(odd_options if i % 2 else {})}),
                     mlp_ratio, rates[i], cpe=False)  # STL's pre-norm block without a position embedding
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p, W/p, C), after the final LayerNorm."""
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, query: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) features and (B,) query token indices -> (B, classes) logits from the query token."""
        token = x.flatten(1, 2)[torch.arange(x.shape[0], device=x.device), query]
        token = nn.functional.dropout(token, self.drop_rate, self.training)
        return token if pre_logits else self.head(token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), locate_query(x, self.patch_size))


default_cfgs = generate_default_cfgs({"attnbench_isotropic_proxy": {
    "num_classes": 4, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": "stem", "classifier": "head"}})


@register_model
def attnbench_isotropic_proxy(pretrained: bool = False, **kwargs: Any) -> IsotropicProxy:
    """The colour-pointer proxy: depth 2, C 64, 2 heads, patch 2; ``attention=`` picks the mechanism."""
    return build(IsotropicProxy, "attnbench_isotropic_proxy", pretrained, **kwargs)
