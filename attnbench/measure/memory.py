"""Peak memory of one step of a case.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before
the step (the module and its inputs). CPU: torch has no public peak-memory API, so each case runs in its own
process and the peak is the rise of that process's ``ru_maxrss`` over the baseline taken after importing
torch; the module and inputs are subtracted by their byte sizes. The method is stored with the figure.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


def max_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class PeakMemory:
    peak_bytes: int  # above the baseline: state + activations + workspace
    state_bytes: int  # module parameters, buffers and inputs
    method: str

    @property
    def activation_bytes(self) -> int:
        return max(self.peak_bytes - self.state_bytes, 0)

    def summary(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "state_bytes": self.state_bytes,
                "activation_bytes": self.activation_bytes, "method": self.method}


def measure_peak_memory(step: Callable[[], object], device: torch.device, state_bytes: int,
                        process_baseline_bytes: int) -> PeakMemory:
    """Run ``step`` once and report its peak. On CPU this must be the first step the process runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return PeakMemory(peak + state_bytes, state_bytes,
                          "cuda: max_memory_allocated after reset_peak_memory_stats, above the allocations "
                          "made before the step, plus module and input bytes")
    step()
    return PeakMemory(max_rss_bytes() - process_baseline_bytes, state_bytes,
                      "cpu: rise of ru_maxrss of the case's own process over its baseline after importing torch")
