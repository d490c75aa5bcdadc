"""BiFormer-T/S/B (Zhu et al., CVPR 2023) as the official code defines them (rayleizhu/BiFormer
models/biformer.py and models/_common.py, read, not copied).

Overlapping conv stem (two 3×3 stride-2 convs with BatchNorm), a 3×3 stride-2 conv + BatchNorm between
stages, and blocks of

    x = x + DWConv3×3(x)                                  (conv position embedding, ``before_attn_dwconv``)
    x = x + DropPath(Attention(LN(x)))                    (BRA with topk > 0; full attention + LePE at -2)
    x = x + DropPath(MLP(LN(x)))                          (LayerNorm eps 1e-6, pre-norm, optional layer scale)

then BatchNorm, global average pooling and a linear head. Released models: n_win 7, topks (1, 4, 16, -2),
head_dim 32, side_dwconv 5, mlp ratio 3. State-dict keys and shapes are the official ones, so official
checkpoints load with ``strict=True`` (attnbench.models.load_checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

from attentions import bra_kernels
from attentions.by_image import by_image

from ._blocks import PyramidClassifier, biformer_attention, build, init_weights, mlp

# bytes of MLP activations one group of images may take in a block's forward (see BiFormerBlock.forward). Timed ad
# hoc (not a committed run): BiFormer-T inference at batch 32 on 2 workers took 1039-1062 ms in groups of 4 MB,
# 1101-1114 in 8 MB, 1078-1090 in 2 MB (two runs, 2026-12-04, 2-core EPYC)
BLOCK_CHUNK_BYTES = 4 * 2**20


class BiFormerBlock(nn.Module):
    """One BiFormer block on an NCHW map (official ``Block``; its parameter names)."""

    def __init__(self, dim: int, num_heads: int, topk: int, n_win: int = 7, qk_dim: int | None = None,
                 mlp_ratio: float = 3.0, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 drop_path: float = 0.0, layer_scale_init_value: float = -1.0, pre_norm: bool = True,
                 mlp_dwconv: bool = False, auto_pad: bool = False, impl: str = "auto") -> None:
        super().__init__()
        if before_attn_dwconv > 0:
            self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        bra_options = {"qk_dim": qk_dim, "auto_pad": auto_pad, "impl": impl} if topk > 0 else {}
        self.attn = biformer_attention(dim, num_heads, topk, n_win, side_dwconv, **bra_options)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, mlp_ratio, dwconv_slot=True, dwconv=mlp_dwconv)
        self.mlp_ratio = mlp_ratio
        self.group_batch = impl != "reference"  # the reference path runs as the official code: one piece
        self.workers_safe = not bra_kernels.runs_compiled(impl)  # compiled code must stay off worker threads
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W).

        Every op of a block is per image (LayerNorm, not BatchNorm), so the batch runs by image
        (``attentions/by_image.py``; with impl='reference' it runs as the official code, in one piece): in
        eval-mode inference over one worker thread per intra-op thread (not with a compiled impl), each taking
        its images in groups whose MLP activations fit in ``BLOCK_CHUNK_BYTES``; single-threaded in such groups;
        otherwise whole."""
        if not self.group_batch:
            return self._forward(x)
        per_image = x[0].numel() * self.mlp_ratio * x.element_size()
        workers = not self.training and self.workers_safe
        return by_image(self._forward, x, per_image, BLOCK_CHUNK_BYTES, allow_workers=workers)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        scale1, scale2 = (self.gamma1, self.gamma2) if hasattr(self, "gamma1") else (1.0, 1.0)
        if self.pre_norm:
            x = x + self.drop_path(scale1 * self.attn(self.norm1(x)))
            x = x + self.drop_path(scale2 * self.mlp(self.norm2(x)))
        else:
            x = self.norm1(x + self.drop_path(scale1 * self.attn(x)))
            x = self.norm2(x + self.drop_path(scale2 * self.mlp(x)))
        return x.permute(0, 3, 1, 2)


class BiFormer(PyramidClassifier):
    """The BiFormer backbone and classifier (official ``BiFormer``)."""

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 mlp_ratios: Sequence[float] = (3, 3, 3, 3), head_dim: int = 32,
                 qk_dims: Sequence[int] | None = None, n_win: int = 7, topks: Sequence[int] = (1, 4, 16, -2),
                 side_dwconv: int = 5, before_attn_dwconv: int = 3, layer_scale_init_value: float = -1.0,
                 pre_norm: bool = True, mlp_dwconv: bool = False, auto_pad: bool = False,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, in_chans: int = 3,
                 num_classes: int = 1000, impl: str = "auto") -> None:
        super().__init__()
        qk_dims = list(qk_dims or embed_dims)
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(embed_dims[0] // 2), nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, 2, 1), nn.BatchNorm2d(embed_dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem, *(
            nn.Sequential(nn.Conv2d(embed_dims[i], embed_dims[i + 1], 3, 2, 1), nn.BatchNorm2d(embed_dims[i + 1]))
            for i in range(3))])
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*(
                BiFormerBlock(embed_dims[i], qk_dims[i] // head_dim, topks[i], n_win, qk_dims[i], mlp_ratios[i],
                              side_dwconv, before_attn_dwconv, rates[sum(depths[:i]) + j], layer_scale_init_value,
                              pre_norm, mlp_dwconv, auto_pad, impl)
                for j in range(depth))))
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}")
                             for i, dim in enumerate(embed_dims)]
        self.apply(init_weights)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "downsample_layers.0.0", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({"biformer_tiny": _cfg(), "biformer_small": _cfg(), "biformer_base": _cfg()})

RELEASED = dict(n_win=7, topks=(1, 4, 16, -2), side_dwconv=5, before_attn_dwconv=3, head_dim=32,
                mlp_ratios=(3, 3, 3, 3))


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T: depths 2-2-8-2, dims 64-512 (paper: 13.1 M params, 2.2 GMACs, 81.4 top-1)."""
    return build(BiFormer, "biformer_tiny", pretrained, **{**RELEASED, "depths": (2, 2, 8, 2),
                                                           "embed_dims": (64, 128, 256, 512), **kwargs})


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S: depths 4-4-18-4, dims 64-512 (paper: 25.5 M, 4.5 GMACs, 83.8)."""
    return build(BiFormer, "biformer_small", pretrained, **{**RELEASED, "depths": (4, 4, 18, 4),
                                                            "embed_dims": (64, 128, 256, 512), **kwargs})


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B: depths 4-4-18-4, dims 96-768 (paper: 56.8 M, 9.8 GMACs, 84.3)."""
    return build(BiFormer, "biformer_base", pretrained, **{**RELEASED, "depths": (4, 4, 18, 4),
                                                           "embed_dims": (96, 192, 384, 768), **kwargs})
