"""Semantic FPN (Kirillov et al., 2019), the segmentation model of BiFormer's ADE20K FPN configs.

Read in rayleizhu/BiFormer ``semantic_segmentation/configs/_base_/models/fpn_r50.py`` and mmsegmentation's
``mmseg/models/necks/fpn.py`` and ``decode_heads/fpn_head.py``:

* neck (FPN): a 1×1 lateral conv per backbone stage to ``fpn_channels`` (256), a top-down pathway adding each
  coarser map upsampled ×2 (nearest) to the finer one, then a 3×3 conv per level;
* head (FPNHead): per level, ``max(1, log2(stride / 4))`` blocks of 3×3 conv (``head_channels``, 128) + BN +
  ReLU, each but a stride-4 level's followed by ×2 bilinear upsampling, so every level reaches stride 4; the
  levels are summed, dropout (0.1), a 1×1 classifier; the logits are upsampled ×4 to the input size.

The backbone is any timm model built with ``features_only=True`` (four maps at strides 4, 8, 16, 32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class FPNNeck(nn.Module):
    """Feature maps (strides 4..32, channels ``in_channels``) -> as many maps of ``channels`` channels."""

    def __init__(self, in_channels: list[int], channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral, features, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + F.interpolate(
                laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, laterals, strict=True)]


class FPNHead(nn.Module):
    """FPN maps -> class logits at stride 4."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, strides: list[int],
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            blocks = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for index in range(blocks):
                layers.append(_conv_bn_relu(in_channels if index == 0 else channels, channels))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:], strict=True):
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone (features_only) + FPN neck + FPN head. forward: (B, 3, H, W) -> logits (B, classes, H, W)."""

    def __init__(self, backbone: nn.Module, num_classes: int, fpn_channels: int = 256, head_channels: int = 128,
                 dropout: float = 0.1, output_norms: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        in_channels = backbone.feature_info.channels()
        strides = backbone.feature_info.reduction()
        # BiFormer's segmentation backbone normalises each stage's output (rayleizhu/BiFormer
        # semantic_segmentation/models_mm/biformer_mm.py ``extra_norms``: timm's LayerNorm2d per stage)
        self.output_norms = nn.ModuleList(LayerNorm2d(channels) for channels in in_channels) if output_norms \
            else None
        self.neck = FPNNeck(in_channels, fpn_channels)
        self.decode_head = FPNHead(fpn_channels, head_channels, num_classes, strides, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.output_norms is not None:
            features = [norm(feature) for norm, feature in zip(self.output_norms, features, strict=True)]
        logits = self.decode_head(self.neck(features))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
