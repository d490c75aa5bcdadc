"""The traffic model of attnbench/measure/traffic.py: each op's inputs read and outputs written once, views free."""

import pytest
import torch

from attnbench.measure.traffic import TrafficCounter, attainable_fraction, copy_bandwidth, count_traffic


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_an_op_reads_its_inputs_and_writes_its_output_once():
    x, weight, bias = torch.randn(32, 16), torch.randn(8, 16), torch.randn(8)
    with TrafficCounter() as counter:
        out = torch.addmm(bias, x, weight.t())
    assert counter.read == _bytes(x, weight, bias) and counter.written == _bytes(out)
    assert counter.total == sum(counter.by_op.values()) and set(counter.by_op) == {"addmm"}


def test_views_and_bare_allocations_move_nothing():
    x = torch.randn(4, 6, 8)
    counter = count_traffic(lambda: (x.view(24, 8), x.transpose(0, 1), x.split(2), x[:, 1:], torch.empty(1000)))
    assert counter.total == 0
    copied = count_traffic(lambda: x.transpose(0, 1).contiguous())  # a copy moves the tensor in and out
    assert copied.read == copied.written == _bytes(x)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_the_count_is_the_same_whether_or_not_composite_ops_are_decomposed(mode):
    """Under inference_mode the dispatch sees reshape and linear whole, under no_grad their clone / _unsafe_view and
    addmm: a reshape is a copy exactly when it copies, and a linear reads x, W, b and writes its output either way."""
    x, weight, bias = torch.randn(4, 6, 8), torch.randn(5, 8), torch.randn(5)
    with mode():
        assert count_traffic(lambda: x.reshape(24, 8)).total == 0
        copied = count_traffic(lambda: x.transpose(0, 1).reshape(24, 8))
        assert copied.read == copied.written == _bytes(x)
        linear = count_traffic(lambda: torch.nn.functional.linear(x, weight, bias))
        assert linear.read == _bytes(x, weight, bias) and linear.written == 4 * 6 * 5 * 4


def test_an_expanded_tensor_is_read_once_and_out_arguments_are_written_not_read():
    row, full = torch.randn(1, 64), torch.randn(128, 64)
    counter = count_traffic(lambda: row.expand(128, 64) + full)
    assert counter.read == _bytes(row, full) and counter.written == _bytes(full)
    target = torch.empty(128, 64)
    counter = count_traffic(lambda: torch.add(full, full, out=target))
    assert counter.read == _bytes(full) and counter.written == _bytes(target)
    counter = count_traffic(lambda: target.add_(full))  # in place: self is read and written
    assert counter.read == _bytes(target, full) and counter.written == _bytes(target)


def test_the_roofline_ceiling_and_the_copy_bandwidth():
    assert attainable_fraction(flops=100.0, traffic_bytes=10.0, bandwidth=2.0, gemm_rate=40.0) == pytest.approx(0.5)
    assert attainable_fraction(flops=100.0, traffic_bytes=1.0, bandwidth=2.0, gemm_rate=40.0) == 1.0
    rates = copy_bandwidth(size_bytes=2**20, tries=2)
    assert len(rates) == 2 and all(1e8 < rate < 1e13 for rate in rates)  # 0.1 GB/s .. 10 TB/s
