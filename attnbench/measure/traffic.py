"""Memory traffic of a computation under a simple model, and the machine's copy bandwidth: the memory side of a
roofline (the compute side is the dense GEMM rate of attnbench/measure/gemm.py).

Traffic model: every ATen op reads each of its input tensors and writes each of its outputs once, from and to main
memory, with no reuse between ops through the caches. An op's bytes are its tensors' footprints (elements × element
size, at most the bytes of the storage behind them: an expanded tensor is read once). Ops that move no data are not
counted: views (an op that writes nothing and returns tensors on its inputs' storage: ``view``, ``transpose``,
``split``, a ``reshape`` that needs no copy; a ``reshape`` that copies is counted as a copy), and bare allocations
(``empty``). An op writing into an ``out=`` tensor writes it without reading it. Whether an op is decomposed (under
``inference_mode`` the dispatch sees ``linear``, under ``no_grad`` its ``addmm``) does not change the count. What an
op does inside (a GEMM re-reading its operands, SDPA's scratch blocks) is not seen, so this is a model of the traffic
between ops, which fused kernels would remove, not a measurement of DRAM bytes.

Roofline (Williams, Waterman and Patterson, CACM 2009): with I = useful FLOPs ÷ bytes moved, a computation can reach
at most min(GEMM rate, I × bandwidth) on this machine if its ops stream through memory as modelled.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# allocations that touch no memory
_NO_TRAFFIC = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
               torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
               torch.ops.aten.new_empty_strided.default}
COPY_BYTES = 256 * 2**20
COPY_TRIES = 3


def _footprint(tensor: torch.Tensor) -> int:
    """Bytes an op touches reading or writing ``tensor``: its elements, at most its storage (expanded tensors)."""
    size = tensor.numel() * tensor.element_size()
    try:
        return min(size, tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse, functional wrappers)
        return size


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


def _is_view(func: Any, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """An op that writes nothing (no written alias in its schema) and returns only tensors on its inputs' storage:
    decided on the tensors, since a schema's alias marks an op that *may* return a view (``reshape``) as one."""
    if any(ret.alias_info is not None and ret.alias_info.is_write for ret in func._schema.returns):
        return False
    sources = {_storage(t) for t in inputs}
    return bool(outputs) and all(_storage(t) in sources for t in outputs if t.numel())


class TrafficCounter(TorchDispatchMode):
    """Counts the bytes each ATen op reads and writes under the traffic model (module docstring).

    ``read`` and ``written``: totals in bytes; ``by_op``: read + written per op name. Use as a context manager
    around the computation; dispatch modes see only their own thread, so worker threads
    (attentions/by_image.py) stay off under it and the whole computation runs where it is counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.read + self.written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = {id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if func in _NO_TRAFFIC or _is_view(func, list(inputs.values()), list(outputs.values())):
            return out
        # out= arguments are written, not read (an in-place op's self is both, and is a positional argument)
        write_only = {id(kwargs[arg.name]) for arg in func._schema.arguments
                      if arg.kwarg_only and arg.alias_info is not None and arg.alias_info.is_write
                      and isinstance(kwargs.get(arg.name), torch.Tensor)}
        read = sum(_footprint(t) for key, t in inputs.items() if key not in write_only)
        written = sum(_footprint(t) for t in outputs.values())
        self.read += read
        self.written += written
        self.by_op[func.overloadpacket.__name__] += read + written
        return out


def count_traffic(fn: Callable[[], Any]) -> TrafficCounter:
    """Run ``fn()`` once under a ``TrafficCounter`` and return the counter."""
    with TrafficCounter() as counter:
        fn()
    return counter


def copy_bandwidth(size_bytes: int = COPY_BYTES, tries: int = COPY_TRIES) -> list[float]:
    """Bytes per second of ``dst.copy_(src)`` on CPU float32 tensors of ``size_bytes`` each (far beyond the caches),
    counting the bytes read and written (STREAM's convention for its Copy kernel), at the current thread count:
    one figure per try, each the best of 5 copies after one warm-up copy (which also faults the pages in)."""
    source = torch.rand(size_bytes // 4)
    target = torch.empty_like(source)
    rates = []
    for _ in range(tries):
        target.copy_(source)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - start)
        rates.append(2 * size_bytes / best)
    return rates


def attainable_fraction(flops: float, traffic_bytes: float, bandwidth: float, gemm_rate: float) -> float:
    """The roofline's ceiling as a share of the GEMM rate: min(1, (flops ÷ bytes) × bandwidth ÷ GEMM rate)."""
    return min(1.0, flops / traffic_bytes * bandwidth / gemm_rate)
