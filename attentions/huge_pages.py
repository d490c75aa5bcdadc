"""Large CPU buffers on transparent huge pages, for the native BRA path's activations and gradients.

glibc's malloc serves every request of 32 MiB or more (its largest mmap threshold, DEFAULT_MMAP_THRESHOLD_MAX on
64-bit) from a fresh mapping, which the kernel fills one 4 KiB page fault at a time on first touch and which is
unmapped again on free. At BiFormer-T's stage 1, batch 64, the Q|K|V activation is 154 MB: 38k page faults in every
training step. ``empty`` gives such a buffer a mapping of its own with transparent huge pages asked for
(``madvise(MADV_HUGEPAGE)``), unmapped when the tensor's storage is freed: 75 faults of 2 MiB instead. Allocating and
filling a fresh 154 MB buffer took 35 ms with 4 KiB pages and 6 ms this way (ad hoc, not a committed run: 2-core EPYC
VM, 2 threads, 2026-12-05).

It does so only where glibc would have mapped the buffer fresh anyway, so it replaces small pages by huge ones and
nothing else: 32 MiB or more, glibc's malloc with its default mmap settings (not where ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_MMAP_MAX_`` or a ``GLIBC_TUNABLES`` mmap setting keeps large blocks in the heap, nor under a preloaded
jemalloc / tcmalloc / mimalloc), Linux with THP on ``madvise`` or ``always``. The advice lives and dies with the
buffer's own mapping: no memory that other code of the process allocates later (the ``reference`` backend, the
official code timed beside ours) is advised. PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (c10/core/alloc_cpu.cpp) asks for
huge pages on every allocation of 2 MiB or more in the process instead.

It is off unless ``ATTENTIONS_HUGE_PAGES=1`` is in the environment; ``empty``'s buffers are ``torch.empty``'s
otherwise. On this project's VM (free pages reported to the host) it helped where ours ran alone and hurt badly where
ours ran interleaved with other code that allocates a lot: BRA stage 1's forward+backward at batch 64 took 254-271 ms
with it against 358 without in the suite (one process per case), but at batch 32, interleaved with the official code
in one process, 159-445 ms against 122-132 (ad hoc, 2026-12-05; README, *Huge pages*).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HUGE_PAGE_BYTES = 2 * 2**20
MIN_BYTES = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: every request this large is mapped fresh
SWITCH = "ATTENTIONS_HUGE_PAGES"  # "1" turns the advice on
THP_SETTINGS = Path("/sys/kernel/mm/transparent_hugepage")
# glibc settings with which large requests may come from its heap instead of a fresh mapping
_HEAP_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")
# allocators that may be preloaded in place of glibc's malloc (attnbench/env.py names them in the stamp too)
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def preloaded_allocator() -> str | None:
    """The allocator preloaded in place of the C library's malloc (``LD_PRELOAD``), one of ``PRELOADED_ALLOCATORS``,
    or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in PRELOADED_ALLOCATORS if name in preload), None)


@functools.cache
def thp_setting(name: str) -> str | None:
    """The kernel's choice for a transparent-huge-page setting, the bracketed word of
    /sys/kernel/mm/transparent_hugepage/<name> ("enabled": "always", "madvise" or "never"; "defrag": ...), None
    where there is none."""
    try:
        found = re.search(r"\[([\w+]+)\]", (THP_SETTINGS / name).read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def advised(nbytes: int) -> bool:
    """Whether ``empty`` puts a buffer of ``nbytes`` on huge pages here and now (see the module docstring)."""
    return (nbytes >= MIN_BYTES and os.environ.get(SWITCH) == "1" and sys.platform.startswith("linux")
            and hasattr(mmap, "MADV_HUGEPAGE") and thp_setting("enabled") in ("madvise", "always")
            and not any(os.environ.get(key) for key in _HEAP_SETTINGS)
            and "mmap" not in os.environ.get("GLIBC_TUNABLES", "")
            and preloaded_allocator() is None)


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device="cpu")``; where ``advised``, in an anonymous mapping of its own that
    starts on a 2 MiB boundary, with huge pages asked for, and unmapped when the tensor's storage is freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not advised(nbytes):
        return torch.empty(shape, dtype=dtype, device="cpu")
    # private and anonymous (the default, MAP_SHARED, would be shared memory, which THP on madvise leaves alone); the
    # extra 2 MiB, never touched, leaves room to align
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    storage = torch.frombuffer(region, dtype=torch.uint8).untyped_storage()  # holds ``region`` until freed
    start = -storage.data_ptr() % HUGE_PAGE_BYTES
    # ``set_`` rather than a slice: the buffer is a tensor of its own, not a view (autograd lets a custom Function's
    # output that is not a view be modified in place)
    return torch.empty(0, dtype=dtype, device="cpu").set_(storage, start // dtype.itemsize, tuple(shape))


class _Linear(torch.autograd.Function):
    """``F.linear`` with its output and, in backward, its input's gradient in ``empty`` buffers."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = empty((*x.shape[:-1], weight.shape[0]), x.dtype)
        rows, out_rows = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(rows, weight.t(), out=out_rows)
        else:
            torch.addmm(bias, rows, weight.t(), out=out_rows)
        # each operand is needed only for the other's gradient
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: differentiable ops, no out= buffer
                grad_x = (grad_rows @ weight).view(ctx.x_shape)
            else:
                grad_x = empty(ctx.x_shape, grad_out.dtype)
                torch.mm(grad_rows, weight, out=grad_x.view(-1, weight.shape[1]))
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: (..., in) -> (..., out), with the output and, in backward, the input's gradient
    in ``empty`` buffers. Plain ``F.linear`` off the CPU, under autocast, while torch.compile traces, and where
    the dtypes differ (its error)."""
    if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or x.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


def _hooked(module: nn.Module) -> bool:
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


def apply_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, computed by ``linear`` where ``module`` is a plain ``nn.Linear`` without forward hooks; any
    other module (a subclass, a quantised or adapted linear, ``nn.Identity``) or a hooked one is called as it is."""
    if type(module) is nn.Linear and not _hooked(module):
        return linear(x, module.weight, module.bias)
    return module(x)
