"""BiFormer-STL, the Swin-T-layout backbone of the paper's ablations (rayleizhu/BiFormer
models/biformer_stl.py, read, not copied), with the attention of every stage swappable.

Swin-T macro design: a 4×4 stride-4 patch stem with BatchNorm, BatchNorm + 2×2 stride-2 conv between stages,
depths 2-2-6-2, dims 96-768, head_dim 32, MLP ratio 4, blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))``,
final BatchNorm. With BRA (n_win 7, topks 1/4/16, full attention + LePE in stage 4) it is the official
``biformer_stl`` (28.4 M, 4.6 GMACs, 82.7 top-1): same state-dict keys, so official weights load strictly.

``attention`` replaces BRA by any registered mechanism, stage by stage, with everything else fixed: this is
the model the attention ablation compares. ``ABLATION_ATTENTION`` gives each built-in mechanism the
per-stage options (and, for DAT, the block layout) of its own paper's Swin-T-sized model;
``ABLATION_VARIANTS`` holds further layouts (DAT++'s all-stage deformable attention). The
architecture-ablation path from STL toward BiFormer-S (``ARCHITECTURE_PATH``) changes the macro design with
BRA fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

import attentions

from ._blocks import PyramidClassifier, biformer_attention, build, init_weights, mlp

# One stage's attention: {"name": ..., "options": {...}} for every block, plus either "odd_block_options"
# (merged into the options of blocks 1, 3, ...: Swin's shifted windows) or "odd_block" (a whole other
# {"name", "options"} for blocks 1, 3, ...: DAT's local / deformable alternation; a stage of one block, as in
# scaled-down demos, runs the odd block, so that the row's own mechanism is still there).
StageAttention = Mapping[str, Any]

DAT_V1 = "LeapLabTHU/DAT configs/dat_tiny.yaml @ 566a593"  # DAT-T, the BiFormer paper's ablation row
DAT_PP = "LeapLabTHU/DAT configs/dat_tiny.yaml @ 32173fc"  # DAT++-T (main)


def _swin_stage(shift: bool) -> dict[str, Any]:
    return {"name": "swin", "options": {"window_size": 7}, "odd_block_options": {"shift_size": 3} if shift else {}}


def _dat_v1_stage(stage: int) -> dict[str, Any]:
    """DAT-T v1's stage (configs/dat_tiny.yaml @ 566a593, lines 12-20): stage_spec [[L, S], [L, S],
    [L, D, L, D, L, D], [L, D]], window 7. L is window attention without a shift; S shifts by
    ceil(7 / 2) = 4 (models/dat.py line 61); D is DAttention v1 with groups [-, -, 3, 6], stride 1,
    offset_range_factor 2, use_pe, the offset kernel ksizes[stage] of [9, 7, 5, 3] (models/dat_blocks.py
    lines 153-154) and the bias table of the stage's map (models/dat.py line 55: fmap_size; 14, 7 at 224²)."""
    local = {"name": "swin", "options": {"window_size": 7}}
    if stage < 2:
        return {**local, "odd_block_options": {"shift_size": 4}}
    deformable = {"n_groups": (3, 6)[stage - 2], "stride": 1, "ksize": (9, 7, 5, 3)[stage],
                  "offset_range_factor": 2.0, "use_pe": True, "rpe_table_size": (56, 28, 14, 7)[stage],
                  "version": "dat"}
    return {**local, "odd_block": {"name": "deformable", "options": deformable}}


def _dat_pp_stage(stage: int) -> dict[str, Any]:
    """DAT++-T's stage (configs/dat_tiny.yaml @ 32173fc, lines 12-26): stage_spec N, D alternating in stages
    1-3 and D, D in stage 4; N is 7×7 neighborhood attention (nat_ksizes 7); D is DAttention (DAT++) with
    groups [1, 2, 4, 8], strides [8, 4, 2, 1], ksizes [9, 7, 5, 3], offset_range_factor -1, use_pe, and the
    bias table of the stage's map (56, 28, 14, 7 at 224²). DAT++-T's other changes (conv stem, LPU, conv MLP,
    depths 2-4-18-2) are architecture, not attention, and are not applied: STL stays fixed."""
    deformable = {"name": "deformable", "options": {
        "n_groups": (1, 2, 4, 8)[stage], "stride": (8, 4, 2, 1)[stage], "ksize": (9, 7, 5, 3)[stage],
        "offset_range_factor": -1.0, "use_pe": True, "rpe_table_size": (56, 28, 14, 7)[stage],
        "version": "dat++"}}
    if stage == 3:
        return deformable
    return {"name": "neighborhood", "options": {"kernel_size": 7}, "odd_block": deformable}


# Per-stage attention of each mechanism in the STL backbone (224² input: maps 56, 28, 14, 7), from the
# mechanism's own ~4.5 GMAC model; None is BiFormer's BRA. "deformable" is DAT-T v1 (the BiFormer paper's
# deformable row, 82.0): local window attention in stages 1-2, local and deformable blocks alternating in 3-4.
ABLATION_ATTENTION: dict[str, list[StageAttention] | None] = {
    "bra": None,
    "full": [{"name": "full"}] * 4,
    "swin": [_swin_stage(True), _swin_stage(True), _swin_stage(True), _swin_stage(False)],
    # axial and cswin split the heads in two: stage 1's 96 channels get 2 heads of 48 instead of 3 of 32
    "axial": [{"name": "axial", "options": {"num_heads": 2}}] + [{"name": "axial"}] * 3,
    "cswin": [{"name": "cswin", "options": {"split_size": 1, "num_heads": 2}}]
             + [{"name": "cswin", "options": {"split_size": s}} for s in (2, 7)]
             + [{"name": "cswin", "options": {"split_size": 7, "last_stage": True}}],
    "neighborhood": [{"name": "neighborhood", "options": {"kernel_size": 7}}] * 4,
    "spatial_reduction": [{"name": "spatial_reduction", "options": {"sr_ratio": r}} for r in (8, 4, 2, 1)],
    "deformable": [_dat_v1_stage(stage) for stage in range(4)],
    "quadtree": [{"name": "quadtree", "options": {"levels": n}} for n in (4, 3, 2, 1)],
}
# Further named layouts of a mechanism: DAT++-T's all-stage deformable layout.
ABLATION_VARIANTS: dict[str, list[StageAttention]] = {
    "deformable_datpp": [_dat_pp_stage(stage) for stage in range(4)],
}


class STLBlock(nn.Module):
    """Attention + MLP on an NHWC map (official ``BiFormerBlock``), with an optional conv position embedding."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float, cpe: bool) -> None:
        super().__init__()
        if cpe:
            self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, mlp_ratio, dwconv_slot=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class STLStage(nn.Module):
    """Blocks on an NCHW map (official ``BasicLayer``: parameters under ``blocks``)."""

    def __init__(self, blocks: list[STLBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class BiFormerSTL(PyramidClassifier):
    """The Swin-T-layout backbone; attention per stage from the registry (BRA by default)."""

    def __init__(self, depths: Sequence[int] = (2, 2, 6, 2), embed_dims: Sequence[int] = (96, 192, 384, 768),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), head_dim: int = 32,
                 attention: str | Sequence[StageAttention] | None = None, n_wins: Sequence[int] = (7, 7, 7, 7),
                 topks: Sequence[int] = (1, 4, 16, -2), side_dwconv: int = 5, overlapping_stem: bool = False,
                 cpe: bool = False, drop_path_rate: float = 0.0, drop_rate: float = 0.0, in_chans: int = 3,
                 num_classes: int = 1000, impl: str = "auto") -> None:
        super().__init__()
        self.impl = impl
        self.depths = tuple(depths)
        if isinstance(attention, str):
            named = {**ABLATION_ATTENTION, **ABLATION_VARIANTS}
            if attention not in named:
                raise ValueError(f"attention={attention!r}: named configurations are {', '.join(named)}")
            attention = named[attention]
        if attention is not None and len(attention) != 4:
            raise ValueError(f"attention needs one entry per stage (4), got {len(attention)}")
        self.attention = [dict(stage) for stage in attention] if attention is not None else None
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        if overlapping_stem:  # BiFormer-T/S/B's stem and downsampling
            stem = nn.Sequential(
                nn.Conv2d(in_chans, embed_dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(embed_dims[0] // 2), nn.GELU(),
                nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, 2, 1), nn.BatchNorm2d(embed_dims[0]))
            downsample = [nn.Sequential(nn.Conv2d(embed_dims[i], embed_dims[i + 1], 3, 2, 1),
                                        nn.BatchNorm2d(embed_dims[i + 1])) for i in range(3)]
        else:
            stem = nn.Sequential(nn.Conv2d(in_chans, embed_dims[0], 4, 4), nn.BatchNorm2d(embed_dims[0]))
            downsample = [nn.Sequential(nn.BatchNorm2d(embed_dims[i]),
                                        nn.Conv2d(embed_dims[i], embed_dims[i + 1], 2, 2)) for i in range(3)]
        self.downsample_layers = nn.ModuleList([stem, *downsample])
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, embed_dims, strict=True)):
            blocks = [STLBlock(dim, self._attention(i, j, dim, head_dim, n_wins[i], topks[i], side_dwconv),
                               mlp_ratios[i], rates[sum(depths[:i]) + j], cpe) for j in range(depth)]
            self.stages.append(STLStage(blocks))
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}")
                             for i, dim in enumerate(embed_dims)]
        self.apply(init_weights)

    def _attention(self, stage: int, block: int, dim: int, head_dim: int, n_win: int, topk: int,
                   side_dwconv: int) -> nn.Module:
        if self.attention is None:
            bra_options = {"impl": self.impl} if topk > 0 else {}
            return biformer_attention(dim, dim // head_dim, topk, n_win, side_dwconv, **bra_options)
        spec = self.attention[stage]
        if "odd_block" in spec and (block % 2 or self.depths[stage] == 1):
            spec = spec["odd_block"]  # a one-block stage cannot alternate: it runs the row's own mechanism
        options = {**spec.get("options", {}), **(spec.get("odd_block_options", {}) if block % 2 else {})}
        heads = options.pop("num_heads", dim // head_dim)
        return attentions.create(spec["name"], dim=dim, num_heads=heads, **options)


# From STL toward BiFormer-S, BRA fixed. The last step is BiFormer-S's architecture (in STL key layout).
# The overlapping stem enters with the deeper layout; the paper's own grouping of that change is not
# confirmed here (shared/PAPER.md sources 82.7 -> 83.5 (deeper) -> 83.8 (+ conv position encoding)).
DEEPER = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), mlp_ratios=(3, 3, 3, 3), overlapping_stem=True)
ARCHITECTURE_PATH: dict[str, dict[str, Any]] = {
    "biformer_stl": {},
    "biformer_stl_deeper": DEEPER,
    "biformer_stl_deeper_cpe": {**DEEPER, "cpe": True},
}

_STL_CFG = {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "downsample_layers.0.0", "classifier": "head"}
default_cfgs = generate_default_cfgs({name: dict(_STL_CFG) for name in ARCHITECTURE_PATH})


@register_model
def biformer_stl(pretrained: bool = False, **kwargs: Any) -> BiFormerSTL:
    """BiFormer-STL: Swin-T layout with BRA (paper: 28.4 M, 4.6 GMACs, 82.7); ``attention=`` swaps it."""
    return build(BiFormerSTL, "biformer_stl", pretrained, **kwargs)


@register_model
def biformer_stl_deeper(pretrained: bool = False, **kwargs: Any) -> BiFormerSTL:
    """Architecture path, step 2: the deeper-narrower layout 4-4-18-4 × 64-512 with the overlapping stem."""
    return build(BiFormerSTL, "biformer_stl_deeper", pretrained, **{**ARCHITECTURE_PATH["biformer_stl_deeper"],
                                                                    **kwargs})


@register_model
def biformer_stl_deeper_cpe(pretrained: bool = False, **kwargs: Any) -> BiFormerSTL:
    """Architecture path, step 3: plus conv position encoding, which is BiFormer-S's architecture."""
    return build(BiFormerSTL, "biformer_stl_deeper_cpe", pretrained,
                 **{**ARCHITECTURE_PATH["biformer_stl_deeper_cpe"], **kwargs})
