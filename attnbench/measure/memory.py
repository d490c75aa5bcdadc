"""Peak memory of one step of a case.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above what was allocated before
the step. CPU: torch has no public peak-memory API, so a dispatch mode follows every tensor storage an ATen
op creates during the step and frees it from the count when the storage is released (the approach of
torch.distributed._tools.mem_tracker, written here without that private module); memory a kernel uses
internally without creating a tensor is not seen. Both report the peak above the state that existed
before the step (module parameters, buffers, inputs), and the method is stored with the figure.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import Measure, Subject, backends_used, dispatch_safely, register_measure
from .params import state_bytes

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created under this mode and still alive: the current and the peak value.

    Higher-order operators (FlexAttention's, for one) run as one op: their outputs are counted, the tensors
    they create and free inside are not.
    """

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@dataclass(frozen=True)
class PeakMemory:
    step_peak_bytes: int  # above the state: activations, outputs, gradients, workspace tensors
    state_bytes: int  # module parameters, buffers and inputs
    method: str

    def summary(self) -> dict:
        return {"peak_bytes": self.step_peak_bytes + self.state_bytes, "state_bytes": self.state_bytes,
                "activation_bytes": self.step_peak_bytes, "method": self.method}


def measure_peak_memory(step: Callable[[], object], device: torch.device, state_bytes: int) -> PeakMemory:
    """Run ``step`` once and report the peak of what it allocates, beside the state it started from."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device) - before, state_bytes,
                          "cuda: max_memory_allocated after reset_peak_memory_stats, above the allocations made "
                          "before the step")
    tracker = LiveTensorBytes()
    with tracker:
        step()
    return PeakMemory(tracker.peak, state_bytes,
                      "cpu: peak bytes of tensor storages alive during the step, followed per ATen op by a "
                      "dispatch mode (kernel-internal scratch not seen; a module that splits inference over "
                      "worker threads, attentions/by_image.py, runs on one thread under it: whole above one "
                      "intra-op thread, in groups at one)")


@register_measure
class Memory(Measure):
    name = "memory"
    kinds = frozenset({"attention", "model"})
    before_check = True
    order = 0

    def measure(self, subject: Subject) -> dict[str, Any]:
        metrics = dispatch_safely(lambda: measure_peak_memory(
            subject.step, subject.device, state_bytes(subject.module, subject.x)).summary())
        # on CPU a dispatch mode watches the step, and a backend ATen cannot see (BRA's native kernel) steps aside
        # for the next one: the backends that ran under it are named, as the timed step's are
        backends = backends_used(subject.module)
        if backends:
            metrics["backend"] = backends
        return metrics

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        measured = "peak_bytes" in metrics
        return {"peak_mib": metrics["peak_bytes"] / MIB if measured else None,
                "activation_mib": metrics["activation_bytes"] / MIB if measured else None}
