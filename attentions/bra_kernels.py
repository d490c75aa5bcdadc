"""Backends of BRA's token attention (step 4–5 of attentions/bra.py), and the dispatcher that picks one.

After routing, every region r of queries attends to the key/value tokens of its k routed regions I[r]:

    O[r] = softmax(Q[r] · K[I[r]]ᵀ · scale) · V[I[r]]          (× routing weights on K, V when soft routing)

Each backend computes exactly this and declares what it can run on, as xFormers' fmha operators declare
``SUPPORTED_DEVICES`` / ``SUPPORTED_DTYPES`` (facebookresearch/xformers xformers/ops/fmha/common.py): devices,
dtypes, the devices with a backward, soft routing, whether it needs ``torch.compile`` or an optional package,
and a cap on the block-mask size. One function, ``not_supported_reasons``, reads those declarations and
returns one line per reason, empty when the backend can run. ``auto_priority`` builds the list
``impl="auto"`` walks for given inputs (the dense-vs-gather threshold lives there, as xFormers' dispatch
``_dispatch_fw_priority_list`` reorders its operators by input, not inside an operator); ``choose`` returns
the first backend with no reason, and when nothing fits, or an explicitly requested backend cannot run, the
error lists every reason.

* ``reference`` — the official code's computation (rayleizhu/BiFormer ops/bra_legacy.py): gather the routed
  K|V per query region, then matmul, softmax, matmul. The plain path every other backend is tested against.
* ``gather`` — one ``index_select`` of the routed regions on the flattened (batch · region) axis, K and V
  split once, and fused ``scaled_dot_product_attention`` over the region blocks.
* ``blocked`` — ``gather`` in chunks of region blocks whose routed K|V fit in cache (``BLOCK_BYTES``): each
  chunk is gathered and consumed by SDPA while it is still in cache (on CPU a fresh multi-MB buffer costs
  page faults that can exceed the attention's arithmetic). Its backward accumulates the K|V gradient of all
  chunks in one buffer. Since ``bra`` itself runs the batch in cache-sized groups of images, ``gather`` inside
  a group measured as fast (BiFormer-T stages 1–2, CPU), so ``auto`` keeps the simpler one; ``blocked`` is for
  single images whose routed K|V exceed the cache.
* ``dense`` — no gather at all: attention over every token with a boolean block mask built from the
  routing (query region r may see kv region s iff s ∈ I[r]). Cheapest when the routed fraction k/S² is
  large or the map small (BiFormer's stages 3 and 4), wasteful when it is small.
* ``compile`` — ``torch.compile`` of ``gather``.
* ``flex`` — FlexAttention with a ``mask_mod`` from the routing and a block mask made from the region indices
  (compiled; forward only on CPU).
* ``xformers`` — xFormers' memory-efficient attention over the gathered blocks (CUDA only).
* ``fused`` — a native CPU kernel (``attentions/csrc/bra_routed.cpp``, built on first use by
  ``attentions/bra_native.py``) that reads the routed keys and values where they lie, with no gather and no
  expanded copy, and does QKᵀ, softmax and PV per region and head in registers (float32/float64). Its backward
  is native too (``bra_native.attend``): it recomputes the probabilities from Q and K, as FlashAttention's
  backward does, and sums the key and value gradients per thread, one thread per (image, head), or per (image,
  group of heads) in the forward's (query, head) lanes where regions hold few queries. In ``bra`` itself
  it also runs over the image's own raster order and adds the LCE in the same pass
  (``BiLevelRoutingAttention._forward_raster``), so no layout copy sits between the qkv projection and ``wo``.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import bra_native
from ._common import aten_watcher

# impl="auto" tries the native kernel first on CPU when fewer than this fraction of the kv regions is routed, and
# the dense block mask first above it (measured on CPU, attentions/bra.py's impl table in README.md)
FUSED_MAX_ROUTED_FRACTION = 0.5
# impl="auto" puts the dense block mask first when at least this fraction of the kv regions is routed (measured
# on CPU: at BiFormer-T's stage 3, 16 of 49 regions, dense was faster; at stage 2, 4 of 49, the gather was).
DENSE_MIN_ROUTED_FRACTION = 0.25
DENSE_MAX_MASK_ELEMENTS = 2**31
# bytes of routed K|V one chunk of ``blocked`` gathers: well inside a core's share of last-level cache and
# below glibc's mmap threshold, so the chunk buffers are reused from the heap instead of page-faulted anew.
BLOCK_BYTES = 4 * 2**20
ALL_DTYPES = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16})
HALF_AND_SINGLE = frozenset({torch.float32, torch.bfloat16, torch.float16})


@dataclass(frozen=True)
class Request:
    """What the dispatcher reads of a call: where and in which dtype it runs, whether autograd records it, whether
    the routing is soft, and the sizes (B images, R regions, T query and n key/value tokens per region, k routed)."""

    device: torch.device
    dtype: torch.dtype
    requires_grad: bool
    soft_routing: bool
    batch: int
    regions: int
    tokens: int
    kv_tokens: int
    topk: int

    @property
    def routed_fraction(self) -> float:
        """k / R: the fraction of key/value regions each query region sees."""
        return self.topk / self.regions


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

    @property
    def request(self) -> Request:
        batch, regions, tokens = self.q.shape[:3]
        return Request(self.q.device, self.q.dtype, self.requires_grad, self.weight is not None, batch, regions,
                       tokens, self.kv.shape[2], self.index.shape[-1])

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
def _region_rows(regions: int, per_region: int) -> torch.Tensor:
    """(R, per_region) int64: the rows of region r's tokens in a region-major layout, r · per_region + t."""
    return torch.arange(regions * per_region).view(regions, per_region)


def _fused(inputs: RoutedAttention) -> torch.Tensor:
    batch, regions, tokens, heads, _ = inputs.q.shape
    n, qk = inputs.kv.shape[2], inputs.qk_dim
    layout = bra_native.RoutedLayout(_region_rows(regions, tokens), _region_rows(regions, n), inputs.index, heads, qk,
                                     inputs.kv.shape[-1] - qk, inputs.scale)
    out = bra_native.attend(inputs.q.reshape(batch, regions * tokens, qk), inputs.kv.reshape(batch, regions * n, -1),
                            layout)
    return out.view(batch, regions, tokens, heads, -1)


@functools.cache
def _compiled_gather():
    return torch.compile(_gather, dynamic=False)


def _compile(inputs: RoutedAttention) -> torch.Tensor:
    return _compiled_gather()(inputs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


FLEX_TILE = 128  # tokens per FlexAttention block-mask tile (its default BLOCK_SIZE, which its kernels' tiles divide)


def _tiles_over_regions(length: int, per_region: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For region-major tokens (``per_region`` per region, ``length`` in all), split into FLEX_TILE-token tiles:
    (tiles, regions) 0/1, which regions each tile's tokens belong to; (tiles,) bool, whether the tile is whole."""
    tiles, regions = -(-length // FLEX_TILE), length // per_region
    token = torch.arange(length, device=device)
    overlap = torch.zeros(tiles, regions, device=device, dtype=torch.float64)  # counts below stay exact
    overlap[token // FLEX_TILE, token // per_region] = 1.0
    whole = torch.arange(1, tiles + 1, device=device) * FLEX_TILE <= length
    return overlap, whole


def _routed_block_mask(inputs: RoutedAttention, allowed: torch.Tensor, mask_mod):
    """FlexAttention's BlockMask for the routing, made from the (B, R, k) region indices at region granularity, as
    ``create_block_mask(mask_mod, ...)`` would make it without evaluating ``mask_mod`` at every (query, key) pair
    (B·R·T·R·n calls: 15 GB at BiFormer-T stage 1, batch 64, on an H200). A tile pair is *full* when every region
    pair it spans is routed and both tiles are whole (no ``mask_mod`` there), *partial* when some is, else skipped."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, regions, tokens = inputs.q.shape[:3]
    n = inputs.kv.shape[2]
    q_overlap, q_whole = _tiles_over_regions(regions * tokens, tokens, inputs.q.device)
    kv_overlap, kv_whole = _tiles_over_regions(regions * n, n, inputs.q.device)
    routed = allowed.to(q_overlap.dtype)  # (B, R, R) 0/1: _block_mask(inputs)
    pairs = q_overlap @ routed @ kv_overlap.T  # (B, Q tiles, KV tiles): routed region pairs in each tile pair
    spanned = q_overlap.sum(-1)[:, None] * kv_overlap.sum(-1)[None, :]  # region pairs each tile pair spans
    full = (pairs == spanned) & q_whole[:, None] & kv_whole[None, :]
    partial = (pairs > 0) & ~full

    def listed(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 1, Q tiles) counts, (…, KV tiles)
        order = blocks.to(torch.int32).argsort(dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=FLEX_TILE, mask_mod=mask_mod,
                                    seq_lengths=(regions * tokens, regions * n))


def _flex(inputs: RoutedAttention) -> torch.Tensor:
    batch, regions, tokens, heads, _ = inputs.q.shape
    n = inputs.kv.shape[2]
    allowed = _block_mask(inputs)

    def routed(b, h, q_index, kv_index):
        return allowed[b, q_index // tokens, kv_index // n]

    block_mask = _routed_block_mask(inputs, allowed, routed)
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


def _chunk_attention(q: torch.Tensor, routed: torch.Tensor, qk_dim: int, scale: float) -> torch.Tensor:
    """SDPA of q (N, T, heads, dq) over routed (N, k·n, qk + C) -> (N, T, heads, C / heads), all views."""
    heads = q.shape[2]
    key = routed[..., :qk_dim].unflatten(-1, (heads, -1)).transpose(1, 2)
    value = routed[..., qk_dim:].unflatten(-1, (heads, -1)).transpose(1, 2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), key, value, scale=scale).transpose(1, 2)


class _BlockedAttention(torch.autograd.Function):
    """Gather + SDPA in chunks of ``step`` query regions; flat: (N, k) rows of kv, weight: (N, k) or None.

    The gathered chunks are saved for backward, which runs SDPA's backward chunk by chunk and accumulates the
    K|V gradient into one buffer (an ``index_select`` per chunk under autograd would allocate a full-size
    gradient per chunk)."""

    @staticmethod
    def forward(ctx, q, kv, flat, weight, scale: float, qk_dim: int, step: int):
        ctx.scale, ctx.qk_dim, ctx.step = scale, qk_dim, step
        chunks, gathered = [], []
        for start in range(0, q.shape[0], step):
            rows = flat[start:start + step]
            routed = kv.index_select(0, rows.reshape(-1))
            gathered.append(routed)
            weight_chunk = weight[start:start + step] if weight is not None else None
            chunks.append(_chunk_attention(q[start:start + step], _weighted(routed, rows.shape, weight_chunk),
                                           qk_dim, scale))
        ctx.save_for_backward(q, flat, weight, *gathered)
        ctx.kv_shape = kv.shape
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad_out):
        q, flat, weight, *gathered = ctx.saved_tensors
        step = ctx.step
        grad_q, grad_kv = torch.empty_like(q), q.new_zeros(ctx.kv_shape)
        grad_weight = torch.empty_like(weight) if weight is not None else None
        for chunk, start in enumerate(range(0, q.shape[0], step)):
            rows = flat[start:start + step]
            with torch.enable_grad():
                q_chunk = q[start:start + step].detach().requires_grad_()
                routed = gathered[chunk].detach().requires_grad_()
                leaves = [q_chunk, routed]
                weight_chunk = None
                if weight is not None:
                    weight_chunk = weight[start:start + step].detach().requires_grad_()
                    leaves.append(weight_chunk)
                out = _chunk_attention(q_chunk, _weighted(routed, rows.shape, weight_chunk), ctx.qk_dim, ctx.scale)
                grads = torch.autograd.grad(out, leaves, grad_out[start:start + step])
            grad_q[start:start + step] = grads[0]
            grad_kv.index_add_(0, rows.reshape(-1), grads[1])
            if weight is not None:
                grad_weight[start:start + step] = grads[2]
        return grad_q, grad_kv, None, grad_weight, None, None, None


def _weighted(routed: torch.Tensor, rows_shape: torch.Size, weight: torch.Tensor | None) -> torch.Tensor:
    """A chunk's gathered K|V rows (chunk · k, n, qk + C) as (chunk, k · n, qk + C), scaled by the chunk's
    routing weights (chunk, k) if soft."""
    chunk, n, width = rows_shape[0], routed.shape[1], routed.shape[2]
    routed = routed.view(chunk, -1, n, width)
    if weight is not None:
        routed = routed * weight[..., None, None]
    return routed.flatten(1, 2)


def _blocked(inputs: RoutedAttention) -> torch.Tensor:
    batch, regions, tokens, heads, _ = inputs.q.shape
    k, (n, width) = inputs.index.shape[-1], inputs.kv.shape[2:]
    offsets = torch.arange(batch, device=inputs.index.device).view(batch, 1, 1) * regions
    flat = (inputs.index + offsets).reshape(batch * regions, k)
    step = max(1, BLOCK_BYTES // (k * n * width * inputs.kv.element_size()))
    weight = inputs.weight.reshape(batch * regions, k) if inputs.weight is not None else None
    out = _BlockedAttention.apply(inputs.q.flatten(0, 1), inputs.kv.reshape(batch * regions, n, width), flat, weight,
                                  inputs.scale, inputs.qk_dim, step)
    return out.unflatten(0, (batch, regions))


@dataclass(frozen=True)
class Backend:
    """A backend and what it can run, declared (read by ``not_supported_reasons``).

    devices / dtypes: where it runs; backward_devices: the devices on which it has a backward (None: all of
    ``devices``); soft_routing: whether it can scale keys and values per routed region; compiled: runs
    through ``torch.compile`` (on CPU: needs a C++ compiler); package: a module that must be importable;
    max_mask_elements: the largest (query token × kv token) block mask it builds per batch, if it builds one;
    native: runs the native kernel of ``attentions/bra_native.py`` (it must build here, and ATen does not see its
    work, so it does not run where a dispatch or function mode, a tracer or a compiler watches).
    """

    name: str
    run: Callable[[RoutedAttention], torch.Tensor]
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = ALL_DTYPES
    backward_devices: frozenset[str] | None = None
    soft_routing: bool = True
    compiled: bool = False
    package: str | None = None
    install_hint: str = ""
    max_mask_elements: int | None = None
    native: bool = False


BACKENDS = {backend.name: backend for backend in (
    # the plain path also runs on the meta device: shapes only, for sizes and FLOP counts without memory
    Backend("reference", _reference, devices=frozenset({"cpu", "cuda", "meta"})),
    Backend("gather", _gather),
    Backend("blocked", _blocked),
    Backend("dense", _dense, soft_routing=False, max_mask_elements=DENSE_MAX_MASK_ELEMENTS),
    Backend("compile", _compile, compiled=True),
    # FlexAttention's CPU lowering takes float32/float16/bfloat16 only (torch 2.14: "`torch.float`,
    # `torch.float16` and `torch.bfloat16` are supported in FlexAttention for CPU device"); its CPU path has no
    # backward. Float64 on CUDA is not verified here, so it is not claimed.
    Backend("flex", _flex, dtypes=HALF_AND_SINGLE, backward_devices=frozenset({"cuda"}), soft_routing=False,
            compiled=True, package="torch.nn.attention.flex_attention"),
    Backend("xformers", _xformers, devices=frozenset({"cuda"}), dtypes=HALF_AND_SINGLE, package="xformers",
            install_hint=" (pip install 'attnbench[cuda]')"),
    Backend("fused", _fused, devices=frozenset({"cpu"}), dtypes=frozenset(bra_native.DTYPES), soft_routing=False,
            native=True),
)}
IMPLS = ("auto", *BACKENDS)


def runs_compiled(impl: str) -> bool:
    """Whether ``impl`` runs through ``torch.compile``. Such code must not run on ``attentions/by_image.py``'s
    worker threads: Dynamo's compile and guard checks are not thread-safe (two workers entering a compiled
    FlexAttention at once aborted the process, torch 2.14.1, CPU, batch 64). ``auto`` never picks one."""
    return impl in BACKENDS and BACKENDS[impl].compiled


def _has_c_compiler() -> bool:
    return bool(shutil.which("g++") or shutil.which("c++") or shutil.which("cc"))


@functools.cache
def _xformers_build_reasons(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """Why the installed xFormers cannot run attention on ``device`` in ``dtype``: it imports even where its kernels
    did not load (a wheel built for another torch, CUDA or Python), and then its dispatcher finds no operator.
    Asked once per process and device on a tiny input, as ``python -m xformers.info`` would tell."""
    if not torch.cuda.is_available():
        return ()
    try:
        from xformers.ops import memory_efficient_attention

        probe = torch.randn(1, 16, 1, 32, device=device, dtype=dtype)
        memory_efficient_attention(probe, probe, probe)
    except Exception as error:  # NotImplementedError from its dispatcher; an ImportError, a CUDA error otherwise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        because = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.endswith("because:")]
        return (f"xformers: the installed build cannot run here ({because[0] if because else lines[0]})",)
    return ()


def _native_unfit() -> str | None:
    """Why a native kernel cannot run in the current context, or None: something watches ATen calls and would miss
    its work, or the call needs what it does not do (autocast's lower precision, forward-mode tangents)."""
    if aten_watcher():
        return f"invisible to {aten_watcher()}"
    if torch.is_autocast_enabled("cpu"):
        return "not under autocast (the projections would hand it a dtype it has no code for)"
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return "no forward-mode AD (it has no tangent)"
    return None


def _request(inputs: RoutedAttention | Request) -> Request:
    return inputs.request if isinstance(inputs, RoutedAttention) else inputs


def not_supported_reasons(backend: Backend, device: torch.device | str, dtype: torch.dtype,
                          inputs: RoutedAttention | Request | None = None) -> list[str]:
    """Why ``backend`` cannot run on ``device`` in ``dtype`` (and, given ``inputs``, on those inputs: soft
    routing, autograd, mask size), read from its declared capabilities; empty when it can run."""
    device, name = torch.device(device), backend.name
    reasons = []
    if backend.package and importlib.util.find_spec(backend.package) is None:
        reasons.append(f"{name}: needs the {backend.package} module, which is not installed{backend.install_hint}")
    if device.type not in backend.devices:
        reasons.append(f"{name}: runs on {' and '.join(sorted(backend.devices))} only, not {device.type}")
    if dtype not in backend.dtypes:
        reasons.append(f"{name}: no {str(dtype).removeprefix('torch.')} kernels "
                       f"(supports {', '.join(sorted(str(d).removeprefix('torch.') for d in backend.dtypes))})")
    if name == "xformers" and not reasons:
        reasons += _xformers_build_reasons(device, dtype)
    if backend.compiled and device.type == "cpu" and not _has_c_compiler():
        reasons.append(f"{name}: torch.compile on CPU needs a C++ compiler, and none is on PATH")
    if backend.native and not reasons:
        reasons += [f"{name}: the native kernel is not usable here ({why})" for why in bra_native.build_reasons()]
        unfit = _native_unfit()
        if unfit:
            reasons.append(f"{name}: a native kernel, {unfit}")
    if inputs is None:
        return reasons
    request = _request(inputs)
    backward_devices = backend.devices if backend.backward_devices is None else backend.backward_devices
    if request.requires_grad and device.type not in backward_devices:
        reasons.append(f"{name}: no backward on {device.type}")
    if request.soft_routing and not backend.soft_routing:
        reasons.append(f"{name}: soft routing scales keys and values per routed region, which "
                       f"{'this kernel does not do' if backend.native else 'a block mask cannot express'}")
    if backend.max_mask_elements is not None:
        batch, regions, tokens = request.batch, request.regions, request.tokens
        if batch * regions * tokens * regions * request.kv_tokens > backend.max_mask_elements:
            reasons.append(f"{name}: the block mask would exceed {backend.max_mask_elements} elements at this size")
    return reasons


def device_reasons(impl: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Why ``impl`` can never run on ``device`` in ``dtype``, known before seeing any input (empty if it may).

    For ``auto``: reasons only when every backend it may pick is ruled out. Reasons that depend on the input
    (soft routing, autograd, mask size) surface from ``choose`` at run time.
    """
    if impl != "auto":
        return not_supported_reasons(BACKENDS[impl], device, dtype)
    per_backend = [not_supported_reasons(BACKENDS[name], device, dtype) for name in AUTO_CANDIDATES]
    return [] if any(not reasons for reasons in per_backend) else [r for reasons in per_backend for r in reasons]


def routed_fraction(inputs: RoutedAttention | Request) -> float:
    """k / (kv regions): the fraction of key/value regions each query region sees."""
    return _request(inputs).routed_fraction


AUTO_CANDIDATES = ("xformers", "fused", "dense", "gather")


def auto_priority(inputs: RoutedAttention | Request) -> tuple[str, ...]:
    """The backends ``impl="auto"`` tries on ``inputs``, best first: xFormers where it runs; below
    ``FUSED_MAX_ROUTED_FRACTION`` of the kv regions routed, the native kernel (CPU, inference and training); the
    dense block mask when at least ``DENSE_MIN_ROUTED_FRACTION`` is routed (its masked-out work is then small); the
    native kernel above ``FUSED_MAX_ROUTED_FRACTION``; the gather last (the fallback that runs everywhere)."""
    fraction = routed_fraction(inputs)
    dense = ("dense",) if fraction >= DENSE_MIN_ROUTED_FRACTION else ()
    if fraction < FUSED_MAX_ROUTED_FRACTION:
        return "xformers", "fused", *dense, "gather"
    return "xformers", *dense, "fused", "gather"


def choose(impl: str, inputs: RoutedAttention | Request) -> Backend:
    """The backend that runs ``inputs`` for ``impl``; NotImplementedError listing every reason if none can."""
    request = _request(inputs)
    names = auto_priority(request) if impl == "auto" else (impl,)
    tried = []
    for name in names:
        reasons = not_supported_reasons(BACKENDS[name], request.device, request.dtype, request)
        if not reasons:
            return BACKENDS[name]
        tried += reasons
    raise NotImplementedError(f"bra impl={impl!r} {'found no backend' if impl == 'auto' else 'cannot run here'}: "
                              f"{'; '.join(tried)}")
