"""Large buffers on transparent huge pages (attentions/huge_pages.py): the advice takes where the kernel offers it
and glibc would map the buffer fresh anyway, dies with the buffer's own mapping, and is off elsewhere; ``linear``
is ``F.linear`` in value and gradient; the native BRA path puts its large buffers there; the stamp records it."""

from __future__ import annotations

import gc
import mmap
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attentions
from attentions import bra_native, huge_pages

MIB = 2**20


def _anon_huge_kib(start: int, end: int) -> int:
    """AnonHugePages (kB) of this process's mappings that overlap [start, end) (/proc/self/smaps)."""
    total, overlaps = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            overlaps = int(span.group(1), 16) < end and start < int(span.group(2), 16)
        elif overlaps and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def _mapped(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        low, high = (int(part, 16) for part in line.split()[0].split("-"))
        if low <= address < high:
            return True
    return False


def _span(buffer: torch.Tensor) -> tuple[int, int]:
    return buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()


@pytest.fixture
def default_malloc(monkeypatch):
    """The environment ``empty`` advises in: switched on, glibc's default mmap settings, no preloaded allocator."""
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(huge_pages.SWITCH, "1")


needs_thp = pytest.mark.skipif(huge_pages.thp_setting("enabled") not in ("madvise", "always") or not hasattr(mmap, "MADV_HUGEPAGE"),
                               reason="transparent huge pages are not offered here (Linux, THP madvise or always)")


@needs_thp
def test_a_large_buffer_sits_on_huge_pages_in_a_mapping_that_dies_with_it(default_malloc):
    buffer = huge_pages.empty((64, 4 * MIB // 4), torch.float32)  # 64 MiB
    assert huge_pages.advised(64 * MIB)
    assert buffer.shape == (64, MIB) and buffer.dtype == torch.float32 and buffer.is_contiguous()
    assert buffer._base is None and buffer.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    buffer.fill_(1.0)
    start, end = _span(buffer)
    assert _anon_huge_kib(start, end) >= 64 * 1024 - 2 * 1024  # at most a huge page the kernel could not find
    del buffer
    gc.collect()
    assert not _mapped(start)  # unmapped with the tensor: no later allocation of the process inherits the advice


@pytest.mark.parametrize("setting", [
    (huge_pages.SWITCH, "0"), (huge_pages.SWITCH, ""), ("MALLOC_MMAP_THRESHOLD_", "1000000000"),
    ("MALLOC_MMAP_MAX_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000000"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_no_advice_where_it_is_switched_off_or_the_allocator_keeps_large_blocks(default_malloc, monkeypatch,
                                                                                 setting):
    monkeypatch.setenv(*setting)
    assert not huge_pages.advised(64 * MIB)
    monkeypatch.setattr(mmap, "mmap", lambda *args, **kwargs: pytest.fail("mapped its own buffer"))
    buffer = huge_pages.empty((16 * MIB,), torch.float32)
    if huge_pages.thp_setting("enabled") == "madvise":  # with "always" every anonymous mapping may get them
        buffer.fill_(1.0)
        assert _anon_huge_kib(*_span(buffer)) == 0


def test_buffers_below_the_mmap_threshold_are_left_to_malloc(default_malloc, monkeypatch):
    assert not huge_pages.advised(huge_pages.MIN_BYTES - 1)
    monkeypatch.setattr(mmap, "mmap", lambda *args, **kwargs: pytest.fail("mapped its own buffer"))
    buffer = huge_pages.empty((huge_pages.MIN_BYTES // 8 - 1,), torch.float64)
    assert buffer.shape == (huge_pages.MIN_BYTES // 8 - 1,) and buffer.device.type == "cpu"


@needs_thp
def test_a_buffer_stays_on_the_cpu_under_another_default_device(default_malloc, monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    with torch.device("meta"):
        advised, plain = huge_pages.empty((4, 3), torch.float32), huge_pages.empty((0,), torch.float32)
    assert advised.device.type == plain.device.type == "cpu"


@pytest.fixture
def every_buffer_advised(default_malloc, monkeypatch):
    """``empty``'s own mapping for every buffer, however small, so small tests take the advised path."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 1)
    if not huge_pages.advised(1):
        pytest.skip("transparent huge pages are not offered here")


@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("needs", ("all", "input only", "weight only"))
def test_linear_equals_f_linear_in_value_and_gradients_float64(every_buffer_advised, bias, needs):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5, 12, dtype=torch.float64).transpose(1, 2)  # not contiguous
    weight = torch.randn(9, 12, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64) if bias else None
    wants = {"x": needs != "weight only", "weight": needs != "input only", "bias": needs == "all"}
    ours, theirs = ([t.clone().requires_grad_(wants[name]) if t is not None else None
                     for name, t in (("x", x), ("weight", weight), ("bias", b))] for _ in range(2))
    out_ours, out_theirs = huge_pages.linear(*ours), F.linear(*theirs)
    assert type(out_ours.grad_fn).__name__ == "_LinearBackward"
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-12)
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    for mine, reference in zip(ours, theirs, strict=True):
        if reference is not None:
            assert (mine.grad is None) == (reference.grad is None)
            if reference.grad is not None:
                torch.testing.assert_close(mine.grad, reference.grad, rtol=0, atol=1e-12)


def test_linear_is_twice_differentiable(every_buffer_advised):
    torch.manual_seed(0)
    inputs = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(huge_pages.linear, inputs)
    assert torch.autograd.gradgradcheck(huge_pages.linear, inputs)


def test_linear_output_may_be_modified_in_place_in_training(every_buffer_advised):
    """As ``nn.Linear``'s: the output is a tensor of its own, not a view autograd would refuse to modify."""
    x, weight = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    out = huge_pages.linear(x, weight)
    out.mul_(2.0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * weight.sum(0).expand(2, 3, 4))


def test_linear_is_f_linear_under_autocast():
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = huge_pages.linear(x, weight)
        expected = F.linear(x, weight)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_apply_linear_calls_any_other_module_as_it_is():
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    plain = nn.Linear(4, 5)
    assert type(huge_pages.apply_linear(plain, x).grad_fn).__name__ == "_LinearBackward"
    doubled = _Doubled(4, 5)
    torch.testing.assert_close(huge_pages.apply_linear(doubled, x), 2 * F.linear(x, doubled.weight, doubled.bias))
    hooked = nn.Linear(4, 5)
    hooked.register_forward_hook(lambda module, inputs, output: output + 1)
    torch.testing.assert_close(huge_pages.apply_linear(hooked, x), F.linear(x, hooked.weight, hooked.bias) + 1)
    assert huge_pages.apply_linear(nn.Identity(), x) is x


@pytest.mark.skipif(bool(bra_native.build_reasons()), reason="; ".join(bra_native.build_reasons()))
def test_the_native_path_puts_its_large_buffers_there_and_equals_the_reference(every_buffer_advised, monkeypatch):
    """BRA's raster path on ``fused`` in training: the Q|K|V and output projections, the attention output and the
    three gradients come from ``huge_pages.empty``, and the layer still equals ``reference``."""
    allocated: list[tuple[int, ...]] = []
    empty = huge_pages.empty
    monkeypatch.setattr(huge_pages, "empty", lambda shape, dtype: allocated.append(tuple(shape)) or empty(shape, dtype))
    torch.manual_seed(0)
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4, impl="fused").double().train()
    reference = module.plain()
    x = torch.randn(2, 28, 28, 64, dtype=torch.float64)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [module(inputs[0]), reference(inputs[1])]
    grad_out = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad_out)
    assert module.last_backend == "fused"
    assert sorted(allocated) == sorted([
        (2, 28, 28, 192), (2, 784, 64), (2, 28, 28, 64),  # forward: Q|K|V, attention (+ LCE), output projection
        (2, 28, 28, 64), (2, 784, 192), (2, 28, 28, 64)])  # backward: the three input gradients
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=0, atol=1e-10)
    for (name, ours), (_, theirs) in zip(module.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-9, msg=name)


@pytest.mark.skipif(bool(bra_native.build_reasons()), reason="; ".join(bra_native.build_reasons()))
def test_a_hook_on_the_output_projection_still_runs_on_the_native_path():
    torch.manual_seed(0)
    module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3, impl="fused").double().train()
    reference = module.plain()
    for layer in (module, reference):
        layer.wo.register_forward_hook(lambda mod, inputs, output: output * 3)
    x = torch.randn(2, 16, 16, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-10)
    assert module.last_backend == "fused"


def test_the_stamp_names_the_huge_page_settings_and_runs_compare_them(default_malloc, monkeypatch):
    import attnbench.env as env
    from attnbench.merge import ENVIRONMENT_KEYS
    from attnbench.runner import COMPARED_ENVIRONMENT

    monkeypatch.setattr(huge_pages, "thp_setting", lambda name: {"enabled": "madvise", "defrag": "defer"}[name])
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 14, raising=False)
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert re.fullmatch(r"transparent huge pages madvise \(defrag defer\), native BRA buffers on", env.huge_pages())
    monkeypatch.delenv(huge_pages.SWITCH)  # off by default
    assert env.huge_pages().endswith("native BRA buffers off")
    monkeypatch.setenv(huge_pages.SWITCH, "0")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert env.huge_pages().endswith("native BRA buffers off, THP_MEM_ALLOC_ENABLE=1")
    assert env.environment("cpu")["huge_pages"] == env.huge_pages()
    assert "huge_pages" in COMPARED_ENVIRONMENT and "huge_pages" in ENVIRONMENT_KEYS
