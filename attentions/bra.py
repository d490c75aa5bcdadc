"""Bi-level Routing Attention (BRA), BiFormer (Zhu et al., CVPR 2023, arXiv 2303.08810).

The input X (H × W × C) is split into S × S regions (S = ``n_win``) of h × w = (H/S) × (W/S) tokens.

1. Q, K, V = X W_q, X W_k, X W_v                                  (one fused linear, Q and K of width qk_dim)
2. Qʳ, Kʳ = mean of Q, K over each region                            (S² × qk_dim)
3. Aʳ = Qʳ (Kʳ)ᵀ · scale,   Iʳ = topkIndex(Aʳ)                      (S² × S², then S² × k; one routing
   shared by all heads, detached unless ``diff_routing``)
4. Kᵍ, Vᵍ = the tokens of the k regions in Iʳ[i], for every region i   (k · h · w tokens per region)
5. O = W_o (Attention(Q, Kᵍ, Vᵍ) + LCE(V)),   LCE = depthwise conv of kernel ``side_dwconv`` on V

This module follows the official implementation used by BiFormer-T/S/B and BiFormer-STL,
rayleizhu/BiFormer ``ops/bra_legacy.py`` (read, not copied): the softmax scale is ``qk_dim ** -0.5`` (the
full qk width, not the head width) in both the router and the token attention; region means are taken
before the optional key/value down-sampling; ``soft_routing`` multiplies the gathered keys *and* values by
softmax(top-k affinities); ``auto_pad`` zero-pads the input before the qkv projection (padded tokens carry
the projection bias and are attended like any other), always uses S × S regions, and crops the output.
Parameter names and shapes are the official ones (``qkv.qkv``, ``wo``, ``lepe``, ``router.emb``), so
official weights load with ``strict=True``.

Cost in MACs for an H × W input (the padded size when auto_pad pads), n_kv the key/value tokens per region
after down-sampling (h·w for ``identity``):

    qkv          H·W·C·(2·qk_dim + C)                      (paper: 3HWC² with qk_dim = C)
    out_proj     H·W·C²                                     (``param_attention='qkvo'`` only)
    routing      (S²)²·qk_dim  [+ 2·S²·qk_dim² with param_routing]
    attn_scores  H·W·k·n_kv·qk_dim
    attn_values  H·W·k·n_kv·C                              (paper: 2HW·k·(HW/S²)·C for both terms)
    local_context H·W·C·side_dwconv²

The paper writes the routing term as 2(S²)²C; the code spends one S² × S² × qk_dim matmul, which is
what is counted here. Region means, top-k, gather, softmax and pooling are not multiply-adds.

Step 4–5's token attention runs on one of the backends of ``attentions/bra_kernels.py`` (option ``impl``):
``reference`` is the official expand-then-gather computation, the others compute the same function faster
(``auto``, the default, picks the fastest that can run, ``bra_kernels.auto_priority``: on CPU, in inference and
training, the native ``fused`` kernel below half the regions routed, else the dense block mask; the gather where
neither can run;
``last_backend`` says which ran). With ``fused`` and no key/value down-sampling the whole layer runs in the image's
raster order (``_forward_raster``). Every backend spends the MACs above; ``dense`` additionally spends masked-out
products that are not counted as useful work.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from . import bra_kernels, bra_native, huge_pages
from ._common import conv_nhwc, depthwise_conv, depthwise_conv_macs, pad_bottom_right, top_k_choice
from .base import AttentionMechanism, MacCount, check_heads
from .by_image import by_image
from .registry import register

KV_DOWNSAMPLE_MODES = ("identity", "avgpool", "maxpool", "ada_avgpool", "ada_maxpool")
PARAM_ATTENTION_MODES = ("qkvo", "qkv")
# bytes of qkv activations one group of images may take in forward (see BiLevelRoutingAttention.forward). Timed ad
# hoc (not a committed run) with the fused backend on 2 workers, batch 32: BiFormer-T's stages 1-3 took 1017 / 780 /
# 687 µs per image in groups of 4 MB, 1128 / 811 / 736 in 8 MB, 1047 / 813 / 761 in 1 MB (2026-12-04, 2-core EPYC)
BATCH_CHUNK_BYTES = 4 * 2**20


class FusedQKV(nn.Module):
    """One linear giving Q (qk_dim) and the concatenation K|V (qk_dim + dim); official ``QKVLinear``."""

    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: torch.Tensor, split: bool = True) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """(..., dim) -> q (..., qk_dim), kv (..., qk_dim + dim); with ``split=False`` the one tensor Q|K|V of the
        native path, it and its input's gradient in ``huge_pages`` buffers (huge pages where switched on and large)."""
        if not split:
            return huge_pages.apply_linear(self.qkv, x)
        return self.qkv(x).split([self.qk_dim, self.qk_dim + x.shape[-1]], dim=-1)


class RegionRouter(nn.Module):
    """Top-k region routing (steps 2–3): affinities of region queries and keys, top-k per region.

    Official ``TopkRouting``: an optional linear ``emb`` on both sides (``param_routing``), inputs detached
    unless ``diff_routing``, and the softmax of the kept affinities returned as routing weights.
    """

    makes_top_k_choices = True  # the routed regions (``top_k_choice``)

    def __init__(self, qk_dim: int, topk: int, scale: float, param_routing: bool, diff_routing: bool) -> None:
        super().__init__()
        self.topk = topk
        self.scale = scale
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(self, region_q: torch.Tensor, region_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S², qk_dim) twice -> routing weights and region indices, each (B, S², topk)."""
        if not self.diff_routing:
            region_q, region_k = region_q.detach(), region_k.detach()
        affinity = (self.emb(region_q) * self.scale) @ self.emb(region_k).transpose(-2, -1)  # (B, S², S²)
        top_affinity, top_index = top_k_choice(self, affinity, self.topk)
        return top_affinity.softmax(dim=-1), top_index


def _kv_downsampler(mode: str, ratio: int, per_win: int) -> nn.Module:
    if mode == "identity":
        return nn.Identity()
    if mode in ("avgpool", "maxpool"):
        if ratio < 1:
            raise ValueError(f"kv_downsample_ratio must be >= 1, got {ratio}")
        if ratio == 1:
            return nn.Identity()
        return nn.AvgPool2d(ratio) if mode == "avgpool" else nn.MaxPool2d(ratio)
    if per_win < 1:
        raise ValueError(f"kv_per_win must be >= 1 for kv_downsample_mode={mode!r}, got {per_win}")
    return nn.AdaptiveAvgPool2d(per_win) if mode == "ada_avgpool" else nn.AdaptiveMaxPool2d(per_win)


@functools.cache
def _raster_rows(n_win: int, region_h: int, region_w: int) -> torch.Tensor:
    """(S², h·w) int64: the raster-order row (y · W + x) of token t of region r, regions and tokens row-major."""
    y = torch.arange(n_win).view(n_win, 1, 1, 1) * region_h + torch.arange(region_h).view(1, 1, region_h, 1)
    x = torch.arange(n_win).view(1, n_win, 1, 1) * region_w + torch.arange(region_w).view(1, 1, 1, region_w)
    return (y * n_win * region_w + x).reshape(n_win * n_win, region_h * region_w)


@register("bra")
class BiLevelRoutingAttention(AttentionMechanism):
    """Bi-level Routing Attention of BiFormer: top-k region routing, then token attention in routed regions.

    Args (official names and defaults of ops/bra_legacy.py):
        dim: channels C; num_heads: heads of the token attention (one routing shared by all).
        n_win: regions per side S (S² regions). qk_dim: width of Q and K (default dim).
        qk_scale: softmax temperature (default qk_dim ** -0.5, used by router and attention alike).
        topk: routed regions per region, 1 ≤ topk ≤ n_win².
        kv_downsample_mode: 'identity', 'avgpool'/'maxpool' (window ``kv_downsample_ratio``) or
            'ada_avgpool'/'ada_maxpool' (``kv_per_win`` × ``kv_per_win`` keys per region).
        param_attention: 'qkvo' (output projection ``wo``) or 'qkv' (none).
        param_routing: a learnable linear before routing (needs diff_routing).
        diff_routing: let gradients reach the routing; the official code supports it only together with
            soft_routing. soft_routing: scale gathered keys and values by the routing weights.
        side_dwconv: LCE kernel size (0 = off). auto_pad: pad H, W up to multiples of n_win.
        impl: backend of the token attention, one of ``bra_kernels.IMPLS`` (default 'auto'; 'reference' is
            the official computation). Not a parameter: the state_dict is the same for every impl.

    Attributes:
        last_backend: the name of the backend the last forward ran on (what ``impl='auto'`` chose for that
            input; the impl itself otherwise), or None before the first forward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        side_dwconv: int = 3,
        auto_pad: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        check_heads(self.qk_dim, num_heads, "qk_dim")
        check_heads(dim, num_heads, "dim")
        if n_win < 1:
            raise ValueError(f"n_win must be >= 1, got {n_win}")
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk must be in [1, n_win**2 = {n_win * n_win}], got topk={topk}")
        if kv_downsample_mode not in KV_DOWNSAMPLE_MODES:
            raise ValueError(
                f"kv_downsample_mode must be one of {', '.join(KV_DOWNSAMPLE_MODES)}, got {kv_downsample_mode!r}"
            )
        if param_attention not in PARAM_ATTENTION_MODES:
            raise ValueError(
                f"param_attention must be one of {', '.join(PARAM_ATTENTION_MODES)}, got {param_attention!r}"
            )
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True (as in the official code)")
        if diff_routing and not soft_routing:
            raise ValueError(
                "diff_routing=True needs soft_routing=True: the official code has no differentiable hard "
                "routing (its KVGather 'hard' mode raises NotImplementedError)"
            )
        if impl not in bra_kernels.IMPLS:
            raise ValueError(f"impl must be one of {', '.join(bra_kernels.IMPLS)}, got {impl!r}")
        self.impl = impl
        self.last_backend: str | None = None
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or self.qk_dim**-0.5
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_downsample_ratio = kv_downsample_ratio
        self.kv_per_win = kv_per_win
        self.param_attention = param_attention
        self.soft_routing = soft_routing
        self.side_dwconv = side_dwconv
        self.auto_pad = auto_pad

        self.qkv = FusedQKV(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        if side_dwconv > 0:
            self.lepe = depthwise_conv(dim, side_dwconv)
        self.router = RegionRouter(self.qk_dim, topk, self.scale, param_routing, diff_routing)
        self.kv_down = _kv_downsampler(kv_downsample_mode, kv_downsample_ratio, kv_per_win)

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        if self.auto_pad:
            return height + (-height % self.n_win), width + (-width % self.n_win)
        if height % self.n_win or width % self.n_win:
            raise ValueError(
                f"bra: H={height} and W={width} must be multiples of n_win={self.n_win} "
                "(or set auto_pad=True to pad them)"
            )
        return height, width

    def _kv_tokens_per_region(self, region_h: int, region_w: int) -> int:
        mode = self.kv_downsample_mode
        if mode in ("avgpool", "maxpool") and self.kv_downsample_ratio > 1:
            ratio = self.kv_downsample_ratio
            if region_h < ratio or region_w < ratio:
                raise ValueError(
                    f"bra: regions of {region_h}x{region_w} tokens are smaller than "
                    f"kv_downsample_ratio={ratio}"
                )
            return (region_h // ratio) * (region_w // ratio)
        if mode in ("ada_avgpool", "ada_maxpool"):
            return self.kv_per_win * self.kv_per_win
        return region_h * region_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C).

        Images are independent, so the batch runs by image (``attentions/by_image.py``): in eval-mode inference
        over one worker thread per intra-op thread (not for the compiled impls), each taking its images in groups
        whose qkv activations fit in ``BATCH_CHUNK_BYTES``; single-threaded in such groups; otherwise whole. With
        ``impl='reference'``, the official computation, it runs in one piece. The result is the same function,
        image by image."""
        self.check_input(x)
        if self.impl == "reference":
            return self._forward(x)
        padded_h, padded_w = self._padded_size(x.shape[1], x.shape[2])
        per_image = padded_h * padded_w * (2 * self.qk_dim + self.dim) * x.element_size()
        workers = not self.training and not bra_kernels.runs_compiled(self.impl)
        return by_image(self._forward, x, per_image, BATCH_CHUNK_BYTES, allow_workers=workers)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        padded_h, padded_w = self._padded_size(height, width)
        s, c, qk = self.n_win, self.dim, self.qk_dim
        region_h, region_w = padded_h // s, padded_w // s
        requires_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        backend = bra_kernels.choose(self.impl, bra_kernels.Request(
            x.device, x.dtype, requires_grad, self.soft_routing, batch, s * s, region_h * region_w,
            self._kv_tokens_per_region(region_h, region_w), self.topk))  # also validates the down-sampling window
        self.last_backend = backend.name
        x, _, _ = pad_bottom_right(x, self.n_win, self.n_win)
        if backend.name == "fused" and isinstance(self.kv_down, nn.Identity):
            return self._forward_raster(x)[:, :height, :width].contiguous()

        # (B, S, h, S, w, C) -> (B, S², h, w, C): region-major, row-major regions as in the official code
        regions = x.reshape(batch, s, region_h, s, region_w, c).permute(0, 1, 3, 2, 4, 5)
        regions = regions.reshape(batch, s * s, region_h, region_w, c)
        q, kv = self.qkv(regions)  # (B, S², h, w, qk), (B, S², h, w, qk + C)

        region_q, region_k = q.mean(dim=(2, 3)), kv[..., :qk].mean(dim=(2, 3))  # (B, S², qk)
        routing_weight, routing_index = self.router(region_q, region_k)  # (B, S², k)

        kv_tokens = self.kv_down(kv.reshape(batch * s * s, region_h, region_w, qk + c).permute(0, 3, 1, 2))
        kv_tokens = kv_tokens.flatten(2).transpose(1, 2).reshape(batch, s * s, -1, qk + c)  # (B, S², n_kv, ·)
        inputs = bra_kernels.RoutedAttention(
            q=q.reshape(batch, s * s, region_h * region_w, self.num_heads, qk // self.num_heads), kv=kv_tokens,
            index=routing_index, weight=routing_weight if self.soft_routing else None, scale=self.scale)
        out = backend.run(inputs)  # (B, S², h·w, heads, C/heads)

        out = out.reshape(batch, s, s, region_h, region_w, c).permute(0, 1, 3, 2, 4, 5)  # (B, S, h, S, w, C) view
        if self.side_dwconv > 0:
            v_map = kv[..., qk:].reshape(batch, s, s, region_h, region_w, c).permute(0, 1, 3, 2, 4, 5)
            local_context = conv_nhwc(self.lepe, v_map.reshape(batch, padded_h, padded_w, c))
            # one pass: the region-major attention output is added into the map-major LCE output in place
            out = local_context.reshape(batch, s, region_h, s, region_w, c).add_(out)
        out = self.wo(out.reshape(batch, padded_h, padded_w, c))
        return out[:, :height, :width].contiguous()

    def _forward_raster(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1–5 on the native kernels, every tensor in the image's raster order: (B, H, W, C) padded -> same.

        The qkv projection runs on the map as it is; the native kernels (attentions/bra_native.py) take the region
        means of its Q and K, read each region's tokens through a row table, write the attention output into the map
        and add the LCE there, and in training give the gradient of the whole Q|K|V projection output as one tensor.
        No permuted copy of x, q, k, v or the output is made. The large buffers this path allocates (the Q|K|V and
        output projections, the attention output, their gradients) come from attentions/huge_pages.py: on huge pages
        where ``ATTENTIONS_HUGE_PAGES=1`` and they are large.
        Hard routing only (the fused backend declares no soft routing), so the routing weights are not used, and the
        routing is detached (diff_routing needs soft)."""
        batch, height, width, c = x.shape
        s, qk = self.n_win, self.qk_dim
        region_h, region_w = height // s, width // s
        projected = self.qkv(x, split=False).flatten(1, 2)  # (B, H·W, qk | qk | C)
        rows = _raster_rows(s, region_h, region_w)
        threads = torch.get_num_threads()
        with torch.no_grad():
            _, routing_index = self.router(bra_native.region_means(projected[..., :qk], rows, threads),
                                           bra_native.region_means(projected[..., qk:2 * qk], rows, threads))
        layout = bra_native.RoutedLayout(rows, rows, routing_index, self.num_heads, qk, c, self.scale,
                                         (height, width) if self.side_dwconv > 0 else None)
        lce = (self.lepe.weight, self.lepe.bias) if self.side_dwconv > 0 else ()
        out = bra_native.attend(projected, projected, layout, *lce).view(batch, height, width, c)
        return huge_pages.apply_linear(self.wo, out)

    def plain(self) -> BiLevelRoutingAttention:
        """A copy of this module on the reference backend (the official computation)."""
        plain = copy.deepcopy(self)
        plain.impl = "reference"
        plain.last_backend = None
        return plain

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        return bra_kernels.device_reasons(self.impl, torch.device(device), dtype)

    def keys_per_query(self, height: int, width: int) -> float:
        padded_h, padded_w = self._padded_size(height, width)
        return float(self.topk * self._kv_tokens_per_region(padded_h // self.n_win, padded_w // self.n_win))

    def macs(self, height: int, width: int) -> MacCount:
        padded_h, padded_w = self._padded_size(height, width)
        tokens, regions = padded_h * padded_w, self.n_win * self.n_win
        c, qk = self.dim, self.qk_dim
        attended = self.topk * self._kv_tokens_per_region(padded_h // self.n_win, padded_w // self.n_win)
        routing = regions * regions * qk
        if isinstance(self.router.emb, nn.Linear):
            routing += 2 * regions * qk * qk
        parts = {
            "qkv": tokens * c * (2 * qk + c),
            "routing": routing,
            "attn_scores": tokens * attended * qk,
            "attn_values": tokens * attended * c,
        }
        if self.param_attention == "qkvo":
            parts["out_proj"] = tokens * c * c
        if self.side_dwconv > 0:
            parts["local_context"] = depthwise_conv_macs(padded_h, padded_w, c, self.side_dwconv)
        return MacCount(parts)
