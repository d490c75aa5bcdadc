"""Backends of BRA's token attention (step 4–5 of attentions/bra.py), and the dispatcher that picks one.

After routing, every region r of queries attends to the key/value tokens of its k routed regions I[r]:

    O[r] = softmax(Q[r] · K[I[r]]ᵀ · scale) · V[I[r]]          (× routing weights on K, V when soft routing)

Each backend computes exactly this and declares what it cannot do, as xFormers' fmha operators do:
``not_supported_reasons(inputs)`` returns one line per reason, empty when it can run. ``choose`` walks a
priority list for ``impl="auto"``; when nothing fits, or an explicitly requested backend cannot run, the
error lists every backend's reasons.

* ``reference`` — the official code's computation (rayleizhu/BiFormer ops/bra_legacy.py): gather the routed
  K|V per query region, then matmul, softmax, matmul. The plain path every other backend is tested against.
* ``gather`` — one ``index_select`` of the routed regions on the flattened (batch · region) axis, K and V
  split once, and fused ``scaled_dot_product_attention`` over the region blocks.
* ``dense`` — no gather at all: attention over every token with a boolean block mask built from the
  routing (query region r may see kv region s iff s ∈ I[r]). Cheapest when the routed fraction k/S² is
  large or the map small (BiFormer's stages 3 and 4), wasteful when it is small.
* ``compile`` — ``torch.compile`` of ``gather``.
* ``flex`` — FlexAttention with a ``mask_mod`` from the routing (compiled; forward only on CPU).
* ``xformers`` — xFormers' memory-efficient attention over the gathered blocks (CUDA only).
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# impl="auto" uses the dense block mask when at least this fraction of the kv regions is routed (measured on
# CPU: at BiFormer-T's stage 3, 16 of 49 regions, dense was faster; at stage 2, 4 of 49, gather was).
DENSE_MIN_ROUTED_FRACTION = 0.25
DENSE_MAX_MASK_ELEMENTS = 2**31


@dataclass(frozen=True)
class RoutedAttention:
    """Region-blocked inputs of the token attention.

    q: (B, R, T, heads, dq) queries of each of the R = S² regions; kv: (B, R, n, heads·dq + C) key|value
    tokens of each region; index: (B, R, k) routed regions; weight: (B, R, k) routing weights, or None
    without soft routing. Output of every backend: (B, R, T, heads, C / heads).
    """

    q: torch.Tensor
    kv: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor | None
    scale: float

    @property
    def heads(self) -> int:
        return self.q.shape[3]

    @property
    def qk_dim(self) -> int:
        return self.q.shape[3] * self.q.shape[4]

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.q.requires_grad or self.kv.requires_grad)

    def split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., n, qk + C) -> k (..., heads, n, dq), v (..., heads, n, C / heads)."""
        k, v = kv.split([self.qk_dim, kv.shape[-1] - self.qk_dim], dim=-1)
        return (k.unflatten(-1, (self.heads, -1)).transpose(-3, -2),
                v.unflatten(-1, (self.heads, -1)).transpose(-3, -2))

    def gathered(self) -> torch.Tensor:
        """The routed key|value tokens, (B, R, k · n, qk + C), scaled by the routing weights if soft."""
        batch, regions, n, width = self.kv.shape
        offsets = torch.arange(batch, device=self.index.device).view(batch, 1, 1) * regions
        flat = (self.index + offsets).reshape(-1)
        routed = self.kv.reshape(batch * regions, n, width).index_select(0, flat)
        routed = routed.view(batch, regions, -1, n, width)
        if self.weight is not None:
            routed = routed * self.weight[..., None, None]
        return routed.flatten(2, 3)


def _reference(inputs: RoutedAttention) -> torch.Tensor:
    batch = inputs.kv.shape[0]
    batch_index = torch.arange(batch, device=inputs.kv.device).view(batch, 1, 1)
    routed = inputs.kv[batch_index, inputs.index]  # (B, R, k, n, qk + C)
    if inputs.weight is not None:
        routed = routed * inputs.weight[..., None, None]
    k, v = inputs.split_kv(routed.flatten(2, 3))
    q = inputs.q.transpose(2, 3)  # (B, R, heads, T, dq)
    attention = ((q * inputs.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (attention @ v).transpose(2, 3)


def _gather(inputs: RoutedAttention) -> torch.Tensor:
    batch, regions = inputs.q.shape[:2]
    k, v = inputs.split_kv(inputs.gathered().flatten(0, 1))  # 4-D: (B·R, heads, k·n, ·)
    out = F.scaled_dot_product_attention(inputs.q.flatten(0, 1).transpose(1, 2), k, v, scale=inputs.scale)
    return out.transpose(1, 2).unflatten(0, (batch, regions))


def _block_mask(inputs: RoutedAttention) -> torch.Tensor:
    """(B, R, R) boolean: region r may attend to region s."""
    batch, regions = inputs.index.shape[:2]
    allowed = torch.zeros(batch, regions, regions, dtype=torch.bool, device=inputs.index.device)
    return allowed.scatter_(2, inputs.index, True)


def _dense(inputs: RoutedAttention) -> torch.Tensor:
    batch, regions, tokens, heads, _ = inputs.q.shape
    n = inputs.kv.shape[2]
    mask = _block_mask(inputs)[:, None, :, None, :, None].expand(batch, 1, regions, tokens, regions, n)
    q = inputs.q.reshape(batch, regions * tokens, heads, -1).transpose(1, 2)
    k, v = inputs.split_kv(inputs.kv.reshape(batch, regions * n, -1))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(batch, 1, regions * tokens, regions * n),
                                         scale=inputs.scale)
    return out.transpose(1, 2).reshape(batch, regions, tokens, heads, -1)


@functools.cache
def _compiled_gather():
    return torch.compile(_gather, dynamic=False)


def _compile(inputs: RoutedAttention) -> torch.Tensor:
    return _compiled_gather()(inputs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(inputs: RoutedAttention) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    batch, regions, tokens, heads, _ = inputs.q.shape
    n = inputs.kv.shape[2]
    allowed = _block_mask(inputs)

    def routed(b, h, q_index, kv_index):
        return allowed[b, q_index // tokens, kv_index // n]

    block_mask = create_block_mask(routed, batch, None, regions * tokens, regions * n, device=inputs.q.device)
    q = inputs.q.reshape(batch, regions * tokens, heads, -1).transpose(1, 2)
    k, v = inputs.split_kv(inputs.kv.reshape(batch, regions * n, -1))
    out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=inputs.scale)
    return out.transpose(1, 2).reshape(batch, regions, tokens, heads, -1)


def _xformers(inputs: RoutedAttention) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    batch, regions, tokens, heads, _ = inputs.q.shape
    routed = inputs.gathered().flatten(0, 1)  # (B·R, k·n, qk + C)
    k, v = routed.split([inputs.qk_dim, routed.shape[-1] - inputs.qk_dim], dim=-1)
    out = memory_efficient_attention(inputs.q.flatten(0, 1), k.unflatten(-1, (heads, -1)),
                                     v.unflatten(-1, (heads, -1)), scale=inputs.scale)
    return out.reshape(batch, regions, tokens, heads, -1)


def _no_soft_routing(inputs: RoutedAttention, name: str) -> list[str]:
    return [f"{name}: soft routing scales keys and values per routed region, which a block mask cannot express"
            ] if inputs.weight is not None else []


def _reasons_dense(inputs: RoutedAttention) -> list[str]:
    batch, regions, tokens = inputs.q.shape[:3]
    reasons = _no_soft_routing(inputs, "dense")
    if batch * regions * tokens * regions * inputs.kv.shape[2] > DENSE_MAX_MASK_ELEMENTS:
        reasons.append("dense: the block mask would exceed 2³¹ elements at this size")
    return reasons


def _compiler_reasons(name: str, device: torch.device) -> list[str]:
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        return [f"{name}: torch.compile on CPU needs a C++ compiler, and none is on PATH"]
    return []


def _device_reasons_flex(device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        reasons.append("flex: this torch has no torch.nn.attention.flex_attention")
    return reasons + _compiler_reasons("flex", device)


def _device_reasons_xformers(device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if importlib.util.find_spec("xformers") is None:
        reasons.append("xformers: the xformers package is not installed (pip install 'attnbench[cuda]')")
    if device.type != "cuda":
        reasons.append(f"xformers: memory-efficient attention runs on CUDA only, not {device.type}")
    if dtype == torch.float64:
        reasons.append("xformers: no float64 kernels")
    return reasons


def _reasons_compile(inputs: RoutedAttention) -> list[str]:
    return _compiler_reasons("compile", inputs.q.device)


def _reasons_flex(inputs: RoutedAttention) -> list[str]:
    reasons = _no_soft_routing(inputs, "flex") + _device_reasons_flex(inputs.q.device, inputs.q.dtype)
    if inputs.q.device.type == "cpu" and inputs.requires_grad:
        reasons.append("flex: FlexAttention has no backward on CPU")
    return reasons


def _reasons_xformers(inputs: RoutedAttention) -> list[str]:
    return _device_reasons_xformers(inputs.q.device, inputs.q.dtype)


def _always_supported(inputs: RoutedAttention) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[RoutedAttention], torch.Tensor]
    reasons: Callable[[RoutedAttention], list[str]] = _always_supported

    def not_supported_reasons(self, inputs: RoutedAttention) -> list[str]:
        return self.reasons(inputs)


BACKENDS = {backend.name: backend for backend in (
    Backend("reference", _reference), Backend("gather", _gather), Backend("dense", _dense, _reasons_dense),
    Backend("compile", _compile, _reasons_compile), Backend("flex", _flex, _reasons_flex),
    Backend("xformers", _xformers, _reasons_xformers),
)}
IMPLS = ("auto", *BACKENDS)
AUTO_PRIORITY = ("xformers", "dense", "gather")


_DEVICE_REASONS = {
    "compile": lambda device, dtype: _compiler_reasons("compile", device),
    "flex": _device_reasons_flex,
    "xformers": _device_reasons_xformers,
}


def device_reasons(impl: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why ``impl`` can never run on ``device`` in ``dtype``, known before seeing any input (empty if it may).

    Reasons that depend on the input (soft routing, autograd, mask size) surface from ``choose`` at run time.
    """
    check = _DEVICE_REASONS.get(impl)
    return check(device, dtype) if check else []


def _routed_fraction(inputs: RoutedAttention) -> float:
    return inputs.index.shape[-1] / inputs.kv.shape[1]


def choose(impl: str, inputs: RoutedAttention) -> Backend:
    """The backend that runs ``inputs`` for ``impl``; NotImplementedError listing every reason if none can."""
    if impl != "auto":
        reasons = BACKENDS[impl].not_supported_reasons(inputs)
        if reasons:
            raise NotImplementedError(f"bra impl={impl!r} cannot run here: {'; '.join(reasons)}")
        return BACKENDS[impl]
    tried = []
    for name in AUTO_PRIORITY:
        reasons = BACKENDS[name].not_supported_reasons(inputs)
        if name == "dense" and _routed_fraction(inputs) < DENSE_MIN_ROUTED_FRACTION:
            reasons = [*reasons, f"dense: auto uses it from {DENSE_MIN_ROUTED_FRACTION:.0%} of regions routed, "
                                 f"here {_routed_fraction(inputs):.0%}"]
        if not reasons:
            return BACKENDS[name]
        tried += reasons
    raise NotImplementedError(f"bra impl='auto' found no backend: {'; '.join(tried)}")
