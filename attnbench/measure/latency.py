"""Wall-clock latency of a callable: warm-up, device synchronisation, adaptive repeats, raw samples kept.

Modelled on torch.utils.benchmark's ``blocked_autorange``: each sample times ``number`` back-to-back calls,
with ``number`` chosen so a sample lasts at least ``MIN_SAMPLE_S``; samples are taken until the spread is
small (IQR / median below ``target_iqr``, after ``min_samples``) or the time budget is spent. On CUDA every
sample is bracketed by CUDA events after a synchronisation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import Measure, Subject, register_measure

MIN_SAMPLE_S = 0.01


@dataclass(frozen=True)
class Latency:
    """Seconds per call: every sample, and the statistics the reports use."""

    samples_s: list[float]
    number: int  # calls per sample
    warmup_iters: int
    converged: bool  # the IQR target was met before the budget ran out

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def iqr_s(self) -> float:
        if len(self.samples_s) < 2:
            return 0.0
        quartiles = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return quartiles[2] - quartiles[0]

    def summary(self) -> dict:
        return {
            **asdict(self),
            "median_s": self.median_s,
            "iqr_s": self.iqr_s,
            "min_s": min(self.samples_s),
            "mean_s": statistics.fmean(self.samples_s),
            "n": len(self.samples_s),
        }


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    if device.type == "cuda":
        def cuda_time(fn, number):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0
        return cuda_time

    def cpu_time(fn, number):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - start
    return cpu_time


def measure_latency(fn: Callable[[], object], device: torch.device, *, warmup_iters: int = 3,
                    warmup_time_s: float = 0.2, min_samples: int = 5, max_samples: int = 100,
                    max_time_s: float = 5.0, target_iqr: float = 0.10) -> Latency:
    """Time ``fn`` (which must do all its work before returning, or on ``device``'s stream)."""
    timed = _timer(device)
    iterations, warm_start = 0, time.perf_counter()
    while iterations < max(warmup_iters, 1) or time.perf_counter() - warm_start < warmup_time_s:  # ≥ 1 call sizes
        single = timed(fn, 1)
        iterations += 1
    number = max(1, int(MIN_SAMPLE_S / max(single, 1e-9)))
    samples: list[float] = []
    converged, start = False, time.perf_counter()
    while len(samples) < max_samples:
        samples.append(timed(fn, number) / number)
        if len(samples) >= min_samples:
            result = Latency(samples, number, iterations, False)
            if result.iqr_s / result.median_s < target_iqr:
                converged = True
                break
        if time.perf_counter() - start > max_time_s and len(samples) >= min(2, min_samples):
            break
    return Latency(samples, number, iterations, converged)


@register_measure
class LatencyMeasure(Measure):
    name = "latency"
    order = 100  # last: nothing else runs between its warm-up and its samples

    def measure(self, subject: Subject) -> dict[str, Any]:
        latency = measure_latency(subject.step, subject.device, **subject.repeats)
        height, width = subject.spatial
        return {**latency.summary(), "images_per_s": subject.images / latency.median_s,
                "tokens_per_s": subject.images * height * width / latency.median_s}

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        timed = "median_s" in metrics
        return {"median_ms": metrics["median_s"] * 1e3 if timed else None,
                "iqr_ms": metrics["iqr_s"] * 1e3 if timed else None, "samples": metrics.get("n"),
                "converged": metrics.get("converged"), "images_per_s": metrics.get("images_per_s")}
