"""Large CPU buffers on transparent huge pages, for the native BRA path's activations and gradients.

glibc serves an allocation above its mmap threshold (at most 32 MiB) from fresh pages that the kernel maps and
zeroes one 4 KiB page at a time on first touch, and unmaps again on free. At BiFormer-T's stage 1, batch 64, one
Q|K|V activation is 154 MB: 38k page faults in every training step. Filling such a buffer took 38 ms fresh against
2.3 ms reused (ad hoc, 2-core EPYC VM, 2 threads, 2026-12-05). Where the kernel's transparent huge pages are on
``madvise`` or ``always`` (/sys/kernel/mm/transparent_hugepage/enabled), asking for them on a fresh buffer's 2
MiB-aligned interior before it is touched makes that 75 faults of 2 MiB: 14 ms in the same timing. PyTorch's own
``THP_MEM_ALLOC_ENABLE=1`` does this for every allocation of the process (c10/core/alloc_cpu.cpp); here it is asked
only for the buffers the native path allocates, so the other code of the process, e.g. the ``reference`` backend
or the official code it is compared with, allocates as it did. Where the advice is not available (another OS, THP
``never``) the buffers are plain ones, and ``ATTENTIONS_HUGE_PAGES=0`` in the environment turns the advice off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
import torch.nn.functional as F

HUGE_PAGE_BYTES = 2 * 2**20
MADV_HUGEPAGE = 14  # <linux/mman.h>
SWITCH = "ATTENTIONS_HUGE_PAGES"  # "0" turns the advice off
# below this the allocation usually comes from malloc's reused heap, already faulted in
MIN_BYTES = 8 * 2**20


@functools.cache
def _madvise():  # -> ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def advise(buffer: torch.Tensor) -> bool:
    """Ask for huge pages on the 2 MiB-aligned interior of ``buffer``'s memory (CPU, at least ``MIN_BYTES``).

    Only pages not yet touched change, so call it on a fresh buffer before writing. Returns whether the kernel took
    the advice; a refusal leaves the buffer as it was."""
    madvise, nbytes = _madvise(), buffer.untyped_storage().nbytes()
    if madvise is None or os.environ.get(SWITCH, "1") == "0" or buffer.device.type != "cpu" or nbytes < MIN_BYTES:
        return False
    start = buffer.untyped_storage().data_ptr()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return last > first and madvise(first, last - first, MADV_HUGEPAGE) == 0


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, on huge pages where it is large enough (``advise``)."""
    buffer = torch.empty(shape, dtype=dtype)
    advise(buffer)
    return buffer


class _Linear(torch.autograd.Function):
    """``F.linear`` with its output and its input's gradient in ``empty`` buffers (CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        out = empty((rows.shape[0], weight.shape[0]), x.dtype)
        if bias is None:
            torch.mm(rows, weight.t(), out=out)
        else:
            torch.addmm(bias, rows, weight.t(), out=out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: differentiable ops, no out= buffer
                grad_x = (grad_rows @ weight).view(x.shape)
            else:
                grad_x = torch.mm(grad_rows, weight, out=empty((grad_rows.shape[0], weight.shape[1]), x.dtype))
                grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: (..., in) -> (..., out), with the output and, in backward, the input's gradient
    on huge pages where they are large (``empty``). Plain ``F.linear`` off the CPU, under autocast and while
    torch.compile traces (it cannot trace the ``madvise`` call)."""
    if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or x.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)

