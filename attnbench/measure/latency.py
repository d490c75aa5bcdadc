"""Wall-clock latency of a callable: warm-up, device synchronisation, adaptive repeats, raw samples kept (as a
torch.utils.benchmark Measurement), and the stability of the figure judged, never assumed.

On CPU each sample is one torch.utils.benchmark ``Timer.timeit(number)``; on CUDA it is the time between two
CUDA events recorded around ``number`` calls on the current stream, the device synchronised before the first
(nothing queued earlier is counted), as ``triton.testing.do_bench`` times. ``number`` is chosen so a sample
lasts at least ``MIN_SAMPLE_S``. Samples are taken until there are at least ``min_samples`` of them and
``min_run_time_s`` has been spent, and the spread is small (IQR / median below ``target_iqr``), or until
``max_time_s`` runs out. The samples' median, IQR and variance warning are recorded with them.
"""

from __future__ import annotations

import logging
import os
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
    threads: int
    variance_warning: str = ""  # torch.utils.benchmark's warning about the spread, if it gave one
    clock: str = "host"  # "host": torch.utils.benchmark.Timer's wall clock; "cuda_events": torch.cuda.Event pairs

    def measurement(self):  # -> torch.utils.benchmark.Measurement
        return _measurement(self.samples_s, self.number, self.threads)

    @property
    def median_s(self) -> float:
        return self.measurement().median

    @property
    def iqr_s(self) -> float:
        return self.measurement().iqr if len(self.samples_s) >= 2 else 0.0

    def summary(self) -> dict:
        return {
            **asdict(self),
            "median_s": self.median_s,
            "iqr_s": self.iqr_s,
            "min_s": min(self.samples_s),
            "mean_s": sum(self.samples_s) / len(self.samples_s),
            "n": len(self.samples_s),
        }


def _benchmark_module():
    """torch.utils.benchmark, imported on first use: it imports torch.utils.cpp_extension, which logs a warning
    about CUDA_HOME on every machine without a CUDA toolkit; that line says nothing about a measurement."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as benchmark

    return benchmark


def _measurement(samples_s: list[float], number: int, threads: int):  # -> torch.utils.benchmark.Measurement
    from torch.utils.benchmark.utils.common import TaskSpec

    Measurement = _benchmark_module().Measurement

    return Measurement(number_per_run=number, raw_times=[sample * number for sample in samples_s],
                       task_spec=TaskSpec(stmt="step()", setup="", num_threads=threads))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sampler(fn: Callable[[], object], device: torch.device, threads: int) -> Callable[[int], float]:
    """A function timing ``number`` calls of ``fn``, in seconds: CUDA events on CUDA, else the Timer's clock."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def events(number: int) -> float:
            with torch.cuda.device(device):  # the events go on that device's current stream
                torch.cuda.synchronize(device)
                start.record()
                for _ in range(number):
                    fn()
                end.record()
                end.synchronize()
            return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds

        return events
    timer = _benchmark_module().Timer(stmt="step()", globals={"step": fn}, num_threads=threads)
    return lambda number: timer.timeit(number).raw_times[0]


def measure_latency(fn: Callable[[], object], device: torch.device, *, warmup_iters: int = 3,
                    warmup_time_s: float = 0.2, min_samples: int = 10, max_samples: int = 100,
                    min_run_time_s: float = 0.5, max_time_s: float = 5.0, target_iqr: float = 0.10) -> Latency:
    """Time ``fn`` (which must do all its work before returning, or on ``device``'s current stream)."""
    threads = torch.get_num_threads()
    sample = _sampler(fn, device, threads)
    iterations, warm_start = 0, time.perf_counter()
    while iterations < max(warmup_iters, 1) or time.perf_counter() - warm_start < warmup_time_s:
        fn()
        _synchronize(device)
        iterations += 1
    number = 1  # calls per sample, grown until a sample lasts MIN_SAMPLE_S (as blocked_autorange sizes blocks)
    while True:
        single = min(sample(number) for _ in range(3)) / number  # min: robust to preemption
        if single * number >= MIN_SAMPLE_S or number >= 1_000_000:
            break
        number = min(1_000_000, max(number * 2, int(MIN_SAMPLE_S / max(single, 1e-9))))
    samples: list[float] = []
    converged, start = False, time.perf_counter()
    while len(samples) < max_samples:
        samples.append(sample(number) / number)
        spent, measured = time.perf_counter() - start, sum(samples) * number  # measured: as blocked_autorange counts
        if len(samples) >= min_samples and measured >= min_run_time_s:
            measurement = _measurement(samples, number, threads)
            if measurement.iqr / measurement.median < target_iqr:
                converged = True
                break
        if spent > max_time_s and len(samples) >= min_samples:
            break
    measurement = _measurement(samples, number, threads)
    warning = (f"torch.utils.benchmark: IQR is {100 * measurement.iqr / measurement.median:.1f}% of the median"
               if measurement.has_warnings else "")
    return Latency(samples, number, iterations, converged, threads, warning,
                   "cuda_events" if device.type == "cuda" else "host")


def cpu_frequency_mhz() -> float | None:
    """The mean current clock of the CPUs in MHz, where Linux says (/proc/cpuinfo); None elsewhere."""
    try:
        clocks = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except (OSError, ValueError, IndexError):
        return None
    return sum(clocks) / len(clocks) if clocks else None


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@register_measure
class LatencyMeasure(Measure):
    name = "latency"
    order = 100  # last: nothing else runs between its warm-up and its samples

    def measure(self, subject: Subject) -> dict[str, Any]:
        load_before, frequency_before = load_average(), cpu_frequency_mhz()
        latency = measure_latency(subject.step, subject.device, **subject.repeats)
        height, width = subject.spatial
        return {**latency.summary(), "images_per_s": subject.images / latency.median_s,
                "tokens_per_s": subject.images * height * width / latency.median_s,
                "load_before": load_before, "load_after": load_average(), "cpu_mhz_before": frequency_before,
                "cpu_mhz_after": cpu_frequency_mhz()}

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        timed = "median_s" in metrics
        return {"median_ms": metrics["median_s"] * 1e3 if timed else None,
                "iqr_ms": metrics["iqr_s"] * 1e3 if timed else None, "samples": metrics.get("n"),
                "converged": metrics.get("converged"), "images_per_s": metrics.get("images_per_s"),
                "load_before": metrics.get("load_before"), "load_after": metrics.get("load_after")}
