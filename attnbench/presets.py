"""Named input shapes: the stages of the backbones the BiFormer paper compares (224² input, stride 4/8/16/32).

A suite may name a preset instead of writing out its height, width, channels and heads. Heads follow the
backbone's rule (BiFormer: head_dim 32; Swin-T: head_dim 32 with 3, 6, 12, 24 heads).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapePreset:
    height: int
    width: int
    dim: int
    heads: int
    note: str


PRESETS: dict[str, ShapePreset] = {
    "biformer_t.stage1": ShapePreset(56, 56, 64, 2, "BiFormer-T/S stage 1 at 224²"),
    "biformer_t.stage2": ShapePreset(28, 28, 128, 4, "BiFormer-T/S stage 2 at 224²"),
    "biformer_t.stage3": ShapePreset(14, 14, 256, 8, "BiFormer-T/S stage 3 at 224²"),
    "biformer_t.stage4": ShapePreset(7, 7, 512, 16, "BiFormer-T/S stage 4 at 224²"),
    "swin_t.stage1": ShapePreset(56, 56, 96, 3, "Swin-T / BiFormer-STL stage 1 at 224²"),
    "swin_t.stage2": ShapePreset(28, 28, 192, 6, "Swin-T / BiFormer-STL stage 2 at 224²"),
    "swin_t.stage3": ShapePreset(14, 14, 384, 12, "Swin-T / BiFormer-STL stage 3 at 224²"),
    "swin_t.stage4": ShapePreset(7, 7, 768, 24, "Swin-T / BiFormer-STL stage 4 at 224²"),
}

# BiFormer-T/S's routed regions per stage (rayleizhu/BiFormer models/biformer.py @ 1697bbb, biformer_tiny: topks
# [1, 4, 16, -2]; -2, attention over all 7² regions, is top-k 49 here, as in suites/bra_impl.yaml)
BIFORMER_T_TOPK: dict[str, int] = {"biformer_t.stage1": 1, "biformer_t.stage2": 4, "biformer_t.stage3": 16,
                                   "biformer_t.stage4": 49}
