"""Our latency measure against torch.utils.benchmark's own ``blocked_autorange`` on one callable: on a quiet
machine the medians agree within 3% (a benchmark, run by ``nox -s microbench``, not in the test suite)."""

import torch
from torch.utils.benchmark import Timer

from attnbench.measure.latency import measure_latency


def test_measure_latency_agrees_with_blocked_autorange():
    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def step():
        return a @ b
    ours = measure_latency(step, torch.device("cpu"), min_samples=20, min_run_time_s=1.0, max_time_s=5.0)
    theirs = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=1.0)
    assert abs(ours.median_s / theirs.median - 1) < 0.03, (ours.median_s, theirs.median)
