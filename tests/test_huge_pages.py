"""Large buffers on transparent huge pages (attentions/huge_pages.py): the advice takes where the kernel offers it,
``linear`` is ``F.linear`` in value and gradient, and the native BRA path puts its large buffers there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attentions
from attentions import bra_native, huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    try:
        found = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def _anon_huge_kib(buffer: torch.Tensor) -> int:
    """AnonHugePages (kB) of this process's mappings that overlap ``buffer``'s memory (/proc/self/smaps; advice
    splits a mapping, so the buffer may span several)."""
    start = buffer.untyped_storage().data_ptr()
    end = start + buffer.untyped_storage().nbytes()
    total, overlaps = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            overlaps = int(span.group(1), 16) < end and start < int(span.group(2), 16)
        elif overlaps and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


needs_thp = pytest.mark.skipif(_thp_mode() not in ("madvise", "always") or huge_pages._madvise() is None,
                               reason="transparent huge pages are not offered here (Linux, THP madvise or always)")


@needs_thp
def test_a_large_fresh_buffer_is_backed_by_huge_pages(monkeypatch):
    monkeypatch.delenv(huge_pages.SWITCH, raising=False)
    buffer = huge_pages.empty((16 * 2**20,), torch.float32)  # 64 MiB
    buffer.fill_(1.0)
    huge_kib = _anon_huge_kib(buffer)
    # all but the unaligned head and tail, and a little slack for a huge page the kernel could not find
    assert huge_kib >= (64 - 8) * 1024, huge_kib


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs THP on madvise: with 'always' every buffer gets them")
def test_the_switch_turns_the_advice_off(monkeypatch):
    monkeypatch.setenv(huge_pages.SWITCH, "0")
    buffer = huge_pages.empty((16 * 2**20,), torch.float32)
    buffer.fill_(1.0)
    assert _anon_huge_kib(buffer) == 0
    assert not huge_pages.advise(torch.empty(16 * 2**20))


def test_small_buffers_are_left_alone(monkeypatch):
    monkeypatch.delenv(huge_pages.SWITCH, raising=False)
    assert not huge_pages.advise(torch.empty(1000))
    assert huge_pages.empty((3, 5), torch.float64).shape == (3, 5)


@pytest.mark.parametrize("bias", (True, False))
def test_linear_equals_f_linear_in_value_and_gradients_float64(monkeypatch, bias):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)  # every buffer takes the advised path
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    weight = torch.randn(9, 12, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64) if bias else None
    ours = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b)]
    theirs = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b)]
    out_ours, out_theirs = huge_pages.linear(*ours), F.linear(*theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-12)
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    for mine, reference in zip(ours, theirs, strict=True):
        if reference is not None:
            torch.testing.assert_close(mine.grad, reference.grad, rtol=0, atol=1e-12)


def test_linear_is_twice_differentiable(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    torch.manual_seed(0)
    inputs = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(huge_pages.linear, inputs)
    assert torch.autograd.gradgradcheck(huge_pages.linear, inputs)


def test_linear_is_f_linear_under_autocast():
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = huge_pages.linear(x, weight)
        expected = F.linear(x, weight)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(bool(bra_native.build_reasons()), reason="; ".join(bra_native.build_reasons()))
def test_the_native_path_advises_its_large_buffers_and_equals_the_reference(monkeypatch):
    """BRA's raster path on ``fused`` in training: the Q|K|V and output projections, the attention output and the
    three gradients are allocated through ``huge_pages``, and the layer still equals ``reference``."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    advised: list[tuple[int, ...]] = []
    advise = huge_pages.advise
    monkeypatch.setattr(huge_pages, "advise", lambda buffer: advised.append(tuple(buffer.shape)) or advise(buffer))
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
    rows = 2 * 28 * 28
    assert sorted(advised) == sorted([
        (rows, 192), (2, 784, 64), (rows, 64),  # forward: Q|K|V projection, attention (+ LCE), output projection
        (rows, 64), (2, 784, 192), (rows, 64)])  # backward: their input gradients, in reverse
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=0, atol=1e-10)
