"""The measures on their own: latency statistics, peak memory tracking, keys per query."""

import time

import pytest
import torch

import attentions
from attnbench.measure.correctness import check_against_reference
from attnbench.measure.latency import measure_latency
from attnbench.measure.memory import measure_peak_memory


def test_latency_keeps_raw_samples_and_reports_the_median():
    result = measure_latency(lambda: time.sleep(0.02), torch.device("cpu"), warmup_iters=1, warmup_time_s=0,
                             min_samples=4, max_samples=8, max_time_s=2.0)
    summary = result.summary()
    assert summary["n"] == len(summary["samples_s"]) >= 4
    assert 0.019 < summary["median_s"] < 0.05 and summary["min_s"] <= summary["median_s"]
    assert summary["iqr_s"] >= 0 and summary["number"] == 1
    assert summary["clock"] == "host"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_latency_is_timed_with_cuda_events_and_counts_the_queued_work():
    """A CUDA call returns before its kernel finishes: the events must time the kernel, not the launch (two
    8192² fp32 GEMMs take milliseconds on any GPU; launching them takes microseconds)."""
    a = torch.randn(8192, 8192, device="cuda")
    result = measure_latency(lambda: a @ a @ a, torch.device("cuda"), warmup_iters=2, warmup_time_s=0,
                             min_samples=5, max_samples=10, max_time_s=2.0)
    flops = 2 * 2 * 8192**3
    assert result.clock == "cuda_events"
    assert flops / result.median_s < 2e15, "faster than any GPU's fp32 rate: the kernels were not waited for"


def test_latency_stops_at_the_time_budget_when_it_cannot_converge():
    noisy = iter([0.02, 0.002] * 100)  # the first (sizing) call is long, so each sample is one call
    result = measure_latency(lambda: time.sleep(next(noisy)), torch.device("cpu"), warmup_iters=0,
                             warmup_time_s=0, min_samples=3, max_samples=50, max_time_s=0.3)
    assert not result.converged and len(result.samples_s) < 50


def test_cpu_peak_memory_counts_what_the_step_allocates_and_frees():
    def step():
        big = torch.ones(1024, 1024)  # 4 MiB, freed before the next one
        del big
        return torch.ones(512, 1024)  # 2 MiB

    memory = measure_peak_memory(step, torch.device("cpu"), state_bytes=100).summary()
    assert memory["activation_bytes"] == 4 * 2**20
    assert memory["peak_bytes"] == 4 * 2**20 + 100


def test_correctness_check_catches_a_wrong_module():
    module = attentions.create("full", dim=16, num_heads=2)
    x = torch.randn(1, 4, 4, 16)
    assert check_against_reference(module, x).ok

    class Wrong(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner(x) + (1e-2 if x.dtype == torch.float32 else 0.0)

    assert not check_against_reference(Wrong(), x).ok


@pytest.mark.parametrize("name,options,expected", [
    ("full", {}, 14 * 21), ("neighborhood", {"kernel_size": 5}, 25), ("swin", {"window_size": 7}, 49),
    ("bra", {"n_win": 7, "topk": 3}, 3 * 2 * 3), ("axial", {}, (14 + 21) / 2),
    ("axial", {"composition": "sequential"}, 14 + 21), ("spatial_reduction", {"sr_ratio": 7}, 2 * 3),
])
def test_keys_per_query(name, options, expected):
    module = attentions.create(name, dim=32, num_heads=4, **options)
    assert module.keys_per_query(14, 21) == pytest.approx(expected)


def test_keys_per_query_of_shifted_windows_counts_the_swin_mask():
    """Mean over the real queries of the keys the shift mask lets through, from the oracle's explicit mask."""
    from . import oracles

    module = attentions.create("swin", dim=32, num_heads=4, window_size=4, shift_size=2)
    mask = oracles.swin_allowed(12, 8, 4, 2).reshape(12, 8, -1)[:9, :7]  # rolled, padded 9 x 7 map
    assert module.keys_per_query(9, 7) == pytest.approx(mask.sum(-1).double().mean().item())


@pytest.mark.parametrize("name,options", [("bra", {"n_win": 7, "topk": 4}), ("quadtree", {"levels": 3})])
def test_half_precision_check_imposes_the_modules_top_k_choices_on_the_float64_run(name, options):
    """bfloat16 routing flips near-ties that float64 does not: with the module's choices imposed the check compares
    arithmetic (passes), counts the choices float64 would have made otherwise, and still fails a wrong module."""
    torch.manual_seed(0)
    module = attentions.create(name, dim=64, num_heads=2, **options).to(torch.bfloat16)
    x = torch.randn(2, 28, 28, 64, dtype=torch.bfloat16)
    agreement = check_against_reference(module, x)
    assert agreement.ok and agreement.choices_imposed > 0
    assert 0 <= agreement.choices_differing <= agreement.choices_imposed
    assert not hasattr(module, "recorded_choices")  # nothing left behind on the module
    if name == "quadtree":
        assert agreement.choices_differing > 0  # bfloat16 scores tie where float64's do not

    class OffInHalfPrecision(type(module)):  # right in float64 (the reference), 20% off in bfloat16
        def forward(self, t):
            out = super().forward(t)
            return out * 1.2 if t.dtype == torch.bfloat16 else out

    module.__class__ = OffInHalfPrecision
    assert not check_against_reference(module, x).ok


def test_the_check_compares_the_function_in_eval_mode_and_restores_train_mode():
    """A forward+backward case times its model in train mode; drop path and dropout draw there, so the check runs
    the module in eval mode (the deterministic function) and then gives it back in train mode."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 8)).train()
    x = torch.randn(4, 8)
    assert check_against_reference(module, x).ok
    assert all(child.training for child in module.modules())


def test_an_imposed_choice_must_be_a_near_tie_not_any_choice():
    """A router that picks the bottom-k regions in bfloat16 would pass if its choices were simply imposed (the
    arithmetic after routing agrees); the check measures how far below float64's own k-th they score and fails."""
    torch.manual_seed(0)
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4).to(torch.bfloat16)

    class BottomKInHalfPrecision(type(module.router)):
        def forward(self, region_q, region_k):
            return super().forward(-region_q if region_q.dtype == torch.bfloat16 else region_q, region_k)

    module.router.__class__ = BottomKInHalfPrecision
    agreement = check_against_reference(module, torch.randn(2, 28, 28, 64, dtype=torch.bfloat16))
    assert not agreement.ok and agreement.imposed_shortfall > agreement.tolerance
    assert "not a near-tie" in agreement.failure()


@pytest.mark.parametrize("dtype,train", [(torch.float32, True), (torch.bfloat16, False)])
def test_the_check_sees_a_bug_that_mixes_images_on_the_path_the_case_times(monkeypatch, dtype, train):
    """A backend that routes every image like the first: invisible one image at a time (the worker threads split
    an eval-mode batch), caught when the check runs the batch as the timed step does (train mode: whole) and, in
    half precision, always whole."""
    from attentions import bra_kernels

    block_mask = bra_kernels._block_mask
    monkeypatch.setattr(bra_kernels, "_block_mask", lambda inputs: block_mask(inputs)[:1].expand(
        inputs.index.shape[0], -1, -1).clone())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4, impl="dense").to(dtype)
        module.train(train)
        assert not check_against_reference(module, torch.randn(2, 28, 28, 64, dtype=dtype)).ok
    finally:
        torch.set_num_threads(threads)


def test_choices_are_imposed_below_float64_only():
    """float32 flips near-ties too (rarely: 10 of 25,284 QuadTree choices in BiFormer-STL at batch 2, 6e-4 off
    without imposing): every dtype below float64 is checked with the module's choices imposed; float64 is not."""
    torch.manual_seed(0)
    module = attentions.create("quadtree", dim=64, num_heads=2, levels=3)
    x = torch.randn(2, 28, 28, 64)
    assert check_against_reference(module, x).choices_imposed > 0
    assert check_against_reference(module.double(), x.double()).choices_imposed == 0
