"""Building blocks shared by the model families: the feed-forward network, the timm registration helper,
and the per-stage attention factory (every model reaches mechanisms only through the registry)."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg
from torch import nn

import attentions

# BiFormer's last stage (topk -2): full attention with LePE on the attention input, 8 heads, no qkv bias
# (rayleizhu/BiFormer models/_common.py AttentionLePE, built with its defaults by models/biformer.py Block).
LAST_STAGE_HEADS = 8


def biformer_attention(dim: int, num_heads: int, topk: int, n_win: int, side_dwconv: int,
                       **bra_options: Any) -> attentions.AttentionMechanism:
    """The attention of a BiFormer block for its ``topk``: BRA (> 0), full + LePE (-2) or full (-1)."""
    if topk > 0:
        return attentions.create("bra", dim=dim, num_heads=num_heads, n_win=n_win, topk=topk,
                                 side_dwconv=side_dwconv, **bra_options)
    if topk in (-1, -2):
        return attentions.create("full", dim=dim, num_heads=LAST_STAGE_HEADS, qkv_bias=False,
                                 side_dwconv=side_dwconv if topk == -2 else 0)
    raise ValueError(f"topk={topk}: BiFormer blocks take topk > 0 (BRA), -1 (full) or -2 (full + LePE)")


class DWConvNHWC(nn.Module):
    """A 3×3 depthwise conv on channels-last input (the official ``DWConv`` of mlp_dwconv)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def mlp(dim: int, ratio: float, dwconv_slot: bool, dwconv: bool = False) -> nn.Sequential:
    """Linear → (depthwise conv) → GELU → Linear. BiFormer-T/S/B keep a slot for the optional conv, so their
    keys are mlp.0 / mlp.3; BiFormer-STL has none (mlp.0 / mlp.2)."""
    hidden = int(ratio * dim)
    middle = [DWConvNHWC(hidden) if dwconv else nn.Identity()] if dwconv_slot else []
    return nn.Sequential(nn.Linear(dim, hidden), *middle, nn.GELU(), nn.Linear(hidden, dim))


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linears with zero bias, unit LayerNorms: the init of both official model files."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm's builder (pretrained config, num_classes, features_only through ``forward_intermediates``)."""
    if pretrained:
        raise ValueError(f"{variant}: no weights are downloaded here; build it with pretrained=False and load a "
                         "local checkpoint with attnbench.models.load_checkpoint(model, path)")
    return build_model_with_cfg(model_cls, variant, pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


class TimmClassifier(nn.Module):
    """timm's classifier API over a linear ``head`` on ``num_features`` (every attnbench model)."""

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class PyramidClassifier(TimmClassifier):
    """timm's classifier API for a 4-stage pyramid with ``downsample_layers``, ``stages``, a final ``norm``,
    a linear ``head``, ``num_features`` and ``drop_rate`` (BiFormer and BiFormer-STL share it)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C4, H/32, W/32), after the final BatchNorm."""
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              intermediates_only: bool = False, **_: Any) -> Any:
        """The four stage maps (strides 4, 8, 16, 32) for dense-prediction heads (timm's API)."""
        take = list(range(4)) if indices is None else (
            list(range(4 - indices, 4)) if isinstance(indices, int) else list(indices))
        maps = []
        for index in range(4):
            x = self.stages[index](self.downsample_layers[index](x))
            if index in take:
                maps.append(x)
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = nn.functional.dropout(x.mean((2, 3)), self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
