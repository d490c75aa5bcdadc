"""Running a batch by image (attentions/by_image.py): worker threads in inference compute the same function as
the whole batch, BRA's and a BiFormer's, and stay out of contexts that would not see their work."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attentions
from attentions import by_image
from attnbench.models.biformer import BiFormer


@pytest.fixture
def two_threads():
    """Two intra-op threads (workers are used only above one), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class ThreadRecorder:
    """A function of a batch (x ↦ 2x + 1) that records the threads and intra-op thread counts it ran with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, bool]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((threading.current_thread().name, torch.get_num_threads(), x.shape[0],
                           torch.is_grad_enabled()))
        return x * 2 + 1


def test_inference_runs_on_one_worker_per_thread_in_groups(two_threads):
    fn, x = ThreadRecorder(), torch.randn(7, 3)
    with torch.no_grad():
        out = by_image.by_image(fn, x, bytes_per_image=10, budget=20)  # two images a group
    torch.testing.assert_close(out, x * 2 + 1, rtol=0, atol=0)
    assert {name for name, *_ in fn.calls} != {threading.current_thread().name}
    assert all(name.startswith("attentions-image") for name, *_ in fn.calls)
    assert {threads for _, threads, _, _ in fn.calls} == {1}
    assert sorted(size for _, _, size, _ in fn.calls) == [1, 2, 2, 2]  # parts of 4 and 3, groups of at most 2
    assert not any(grad for *_, grad in fn.calls)
    assert torch.get_num_threads() == 2
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [2], "the workers' one-thread setting leaked into threads started later"


def test_training_autocast_profiler_vmap_and_single_images_stay_on_the_callers_thread(two_threads):
    caller = threading.current_thread().name
    for context, x in ((torch.enable_grad(), torch.randn(4, 3)),
                       (torch.autocast("cpu", dtype=torch.bfloat16), torch.randn(4, 3)),
                       (torch.profiler.profile(), torch.randn(4, 3)),
                       (torch.no_grad(), torch.randn(1, 3))):
        fn = ThreadRecorder()
        with context:
            by_image.by_image(fn, x, bytes_per_image=10, budget=20)
        assert [name for name, *_ in fn.calls] == [caller]  # whole, at two threads: no groups either
        assert fn.calls[0][1:3] == (2, x.shape[0])
    fn = ThreadRecorder()
    with torch.no_grad():
        by_image.by_image(fn, torch.randn(4, 3), bytes_per_image=10, budget=20, allow_workers=False)
    assert [name for name, *_ in fn.calls] == [caller]
    with torch.no_grad():
        out = torch.vmap(lambda x: by_image.by_image(lambda t: t * 2, x, bytes_per_image=10, budget=20))(
            torch.ones(3, 4, 2))
    torch.testing.assert_close(out, torch.full((3, 4, 2), 2.0))


def test_a_train_mode_block_under_no_grad_is_reproducible(two_threads):
    """DropPath draws random numbers in train mode: the block keeps them in the caller's order (no workers)."""
    import attnbench.models.biformer as biformer

    block = biformer.BiFormerBlock(32, drop_path=0.5, num_heads=2, n_win=2, topk=2).train()
    x = torch.randn(6, 32, 8, 8)
    outputs = []
    for _ in range(3):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(block(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=0)


def test_work_inside_a_worker_stays_on_that_worker(two_threads):
    inner = ThreadRecorder()
    outer_threads = []

    def outer(part: torch.Tensor) -> torch.Tensor:
        outer_threads.append(threading.current_thread().name)
        torch.set_num_threads(2)  # even where fn raises its own count, by_image does not nest workers
        try:
            return by_image.by_image(inner, part, bytes_per_image=10, budget=1000)
        finally:
            torch.set_num_threads(1)

    def call() -> None:
        with torch.no_grad():
            by_image.by_image(outer, torch.randn(6, 3), bytes_per_image=10, budget=1000)

    caller = threading.Thread(target=call, daemon=True)  # nested workers would wait on their own pool forever
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "by_image inside a worker waited on its own pool"
    assert sorted(name for name, *_ in inner.calls) == sorted(outer_threads)
    assert all(name.startswith("attentions-image") for name in outer_threads)


def test_dispatch_modes_see_all_the_work(two_threads):
    """A FLOP counter (a dispatch mode, which sees its own thread only) counts a batch of six as six images."""
    module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3, impl="gather")
    counts = []
    for batch in (1, 6):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.randn(batch, 16, 16, 32))
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == 6 * counts[0]


def test_worker_errors_reach_the_caller_after_every_part_ended(two_threads):
    finished = []

    def fails_fast_or_ends_slowly(x: torch.Tensor) -> torch.Tensor:
        if x[0, 0] < 0:
            raise ValueError(f"bad batch of {x.shape[0]}")
        time.sleep(0.3)
        finished.append(x.shape[0])
        return x

    x = torch.tensor([[-1.0], [-1.0], [1.0], [1.0]])  # part 0 fails at once, part 1 takes 0.3 s
    with torch.no_grad(), pytest.raises(ValueError, match="bad batch"):
        by_image.by_image(fails_fast_or_ends_slowly, x, bytes_per_image=10, budget=100)
    assert finished == [2], "a part was still running when the error reached the caller"


def test_groups_write_their_rows_into_one_batch_output_in_order(two_threads):
    x = torch.arange(9.0).view(9, 1)
    with torch.no_grad():
        out = by_image.by_image(lambda t: torch.cat([t, t * 10], dim=1), x, bytes_per_image=10, budget=20)
    assert out.shape == (9, 2) and out.is_contiguous()
    torch.testing.assert_close(out, torch.cat([x, x * 10], dim=1), rtol=0, atol=0)


def test_a_group_whose_output_differs_in_shape_is_an_error(two_threads):
    def ragged(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros(t.shape[0], 1 + int(t[0, 0] > 0))  # the last images' groups give a wider output

    x = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not match the batch's"):
        by_image.by_image(ragged, x, bytes_per_image=10, budget=10)


def test_a_group_that_loses_or_adds_images_is_an_error(two_threads):
    x = torch.arange(9.0).view(9, 1)
    for wrong in (lambda t: t[:1], lambda t: torch.cat([t, t])):
        with torch.no_grad(), pytest.raises(RuntimeError, match="a group of 2 images gave an output of"):
            by_image.by_image(wrong, x, bytes_per_image=10, budget=20)


def test_the_batch_output_keeps_the_groups_memory_layout(two_threads):
    x = torch.randn(6, 4, 5, 3)  # NHWC
    with torch.no_grad():
        out = by_image.by_image(lambda t: (t * 2).permute(0, 3, 1, 2), x, bytes_per_image=10, budget=20)
    assert out.shape == (6, 3, 4, 5)
    assert out.permute(0, 2, 3, 1).is_contiguous()  # NCHW over NHWC memory, as each group gave it
    torch.testing.assert_close(out, (x * 2).permute(0, 3, 1, 2), rtol=0, atol=0)


def test_inference_while_the_interpreter_shuts_down_runs_on_the_caller(tmp_path):
    """concurrent.futures takes no new work at exit: an atexit handler's inference still runs."""
    script = tmp_path / "at_exit.py"
    script.write_text(
        "import atexit, torch\n"
        "from attentions.by_image import by_image\n"
        "torch.set_num_threads(2)\n"
        "def late():\n"
        "    with torch.no_grad():\n"
        "        print('late', by_image(lambda t: t + 1, torch.zeros(4, 2), 10, 20).sum().item())\n"
        "atexit.register(late)\n"
        "with torch.no_grad():\n"
        "    print('early', by_image(lambda t: t + 1, torch.zeros(4, 2), 10, 20).sum().item())\n")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["early", "8.0", "late", "8.0"]


@pytest.mark.parametrize("context", (torch.no_grad, torch.inference_mode))
def test_bra_on_workers_equals_the_reference_float64(two_threads, monkeypatch, context):
    from attentions import bra

    monkeypatch.setattr(bra, "BATCH_CHUNK_BYTES", 2 * 12 * 12 * 96 * 8)  # two images a group
    torch.manual_seed(0)
    module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3, auto_pad=True).double().eval()
    reference, threads = module.plain(), set()
    module.qkv.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    x = torch.randn(5, 10, 11, 32, dtype=torch.float64)
    with context():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-10)
    assert threads and all(name.startswith("attentions-image") for name in threads)


def test_biformer_on_workers_equals_the_reference_float64(two_threads, monkeypatch):
    import attnbench.models.biformer as biformer

    torch.manual_seed(0)
    options = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), head_dim=16, n_win=2, topks=(1, 2, 3, -2),
                   mlp_ratios=(2, 2, 2, 2), num_classes=10)
    model = BiFormer(**options).double().eval()
    plain = BiFormer(**options, impl="reference").double().eval()
    plain.load_state_dict(model.state_dict())
    monkeypatch.setattr(biformer, "BLOCK_CHUNK_BYTES", 2 * 16 * 16 * 16 * 2 * 8)  # 2 images a group, stage 1
    x = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ("compile", "flex"))
def test_compiled_impls_stay_on_the_callers_thread(two_threads, monkeypatch, impl):
    """Dynamo is not thread-safe (two workers in a compiled FlexAttention aborted the process): a BRA layer or a
    BiFormer block on a compiled impl runs its batch on the caller's thread. The compiled backend is stood in for by
    the gather (same declaration, compiled=True), so the test needs no compiler."""
    import dataclasses

    from attentions import bra_kernels

    stand_in = dataclasses.replace(bra_kernels.BACKENDS["gather"], name=impl, compiled=True)
    monkeypatch.setitem(bra_kernels.BACKENDS, impl, stand_in)
    monkeypatch.setattr(bra_kernels, "_has_c_compiler", lambda: True)
    assert bra_kernels.runs_compiled(impl) and not bra_kernels.runs_compiled("auto")
    torch.manual_seed(0)
    layer = attentions.create("bra", dim=32, num_heads=2, n_win=2, topk=2, impl=impl).eval()
    block = BiFormer(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), head_dim=16, n_win=2, topks=(1, 2, 3, -2),
                     mlp_ratios=(2, 2, 2, 2), num_classes=10, impl=impl).eval().stages[0][0]
    threads = set()
    for module in (layer.qkv, block.attn.qkv, block.mlp):
        module.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    with torch.inference_mode():
        layer(torch.randn(4, 8, 8, 32))
        block(torch.randn(4, 16, 16, 16))
    assert threads == {threading.current_thread().name}


def test_no_workers_keeps_the_batch_on_the_callers_thread_and_ends_with_its_block(two_threads):
    fn, x = ThreadRecorder(), torch.randn(6, 3)
    with torch.no_grad():
        with by_image.no_workers():
            with by_image.no_workers():
                by_image.by_image(fn, x, bytes_per_image=10, budget=20)
            by_image.by_image(fn, x, bytes_per_image=10, budget=20)  # the outer block still holds
        assert [(name, size) for name, _, size, _ in fn.calls] == [(threading.current_thread().name, 6)] * 2
        by_image.by_image(fn, x, bytes_per_image=10, budget=20)
    assert all(name.startswith("attentions-image") for name, *_ in fn.calls[2:])
