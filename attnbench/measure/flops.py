"""FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, with the ops it cannot see listed.

FlopCounterMode counts 2 FLOPs per multiply-add of convs, linears and matmuls. What is counted here is the
*useful* work, the same for every backend that computes the same function, so that forward + backward is
3 × the forward for every differentiable op (each forward multiply-add has one partner in the input gradient
and one in the weight gradient). Three corrections to torch's formulas make that hold:

- ``scaled_dot_product_attention`` on CPU: torch has no formula for the CPU flash kernel, forward or backward;
  they are supplied here.
- SDPA backward, every kernel: torch counts 5 matmuls (it includes the flash kernels' recomputation of the
  scores); the gradients of Q, K and V need 4, twice the forward's 2, as the unfused (math) path spends.
- ``convolution_backward``: torch's weight-gradient term ignores ``groups`` and so counts a depthwise conv's
  weight gradient C times over (BiFormer's 5 × 5 LCE at 64 channels: 41 GFLOPs instead of 0.64 at batch 64);
  here the input and weight gradients each cost what the forward costs.

Every other op that does arithmetic but has no formula (top-k, gather, softmax, pooling, grid_sample, norms,
reductions) is recorded by name in ``uncounted_ops`` so a reader knows what the count leaves out; pointwise ops
and pure layout ops are not listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

from . import Measure, Subject, dispatch_safely, register_measure

aten = torch.ops.aten


def useful_sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) -> int:
    """Gradients of attention softmax(QKᵀ)V given dO, shapes (B, heads, tokens, head_dim): dV = Pᵀ dO,
    dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q, four matmuls, 2 × the forward's QKᵀ and PV. The recomputation of QKᵀ
    that flash kernels spend instead of storing P is an implementation's choice, not useful work."""
    if tuple(grad_out_shape[:-1]) != tuple(query_shape[:-1]) or grad_out_shape[-1] != value_shape[-1]:
        raise AssertionError(f"sdpa backward: grad_out {grad_out_shape} does not match query {query_shape} "
                             f"and value {value_shape}")
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_forward_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return useful_sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each multiply of the forward (x[i]·w[j] into out[o]) has one partner in the input gradient
    (dout[o]·w[j] into dx[i]) and one in the weight gradient (dout[o]·x[i] into dw[j]), whatever the groups."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
    aten.convolution_backward: _conv_backward_flop,
}

# Ops that only move, allocate, reshape or randomly fill data: they cost no multiply-adds, so their absence
# from the counter's registry is not a gap worth reporting.
_LAYOUT_OPS = {
    aten._unsafe_view, aten.as_strided_, aten.randn, aten.rand, aten.uniform_, aten.normal_, aten.bernoulli_,
    aten.randint, aten.flip, aten.linspace,
    aten.clone, aten.copy_, aten._to_copy, aten.cat, aten.stack, aten.constant_pad_nd, aten.empty_like,
    aten.zeros_like, aten.ones_like, aten.full_like, aten.empty, aten.zeros, aten.ones, aten.full, aten.arange,
    aten.fill_, aten.zero_, aten.lift_fresh, aten.new_zeros, aten.new_empty, aten.new_ones, aten.new_full,
    aten.empty_strided, aten.new_empty_strided, aten.scalar_tensor, aten._local_scalar_dense, aten.roll,
}


@dataclass(frozen=True)
class FlopCount:
    """What FlopCounterMode saw in one call: total FLOPs (2 per MAC), per op, and the ops it missed."""

    flops: int
    by_op: dict[str, int] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # op name -> calls, no formula

    @property
    def macs(self) -> int:
        return self.flops // 2


class _OpRecorder(TorchDispatchMode):
    """Counts the calls of every ATen op that runs beneath it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """Run ``fn()`` once under FlopCounterMode (with the corrected formulas above) and report what it counted."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    recorder = _OpRecorder()
    # torch's registered SDPA backward formulas (CUDA flash, efficient, cuDNN, nested, flex) all call this
    # module-level function at count time: pointing it at the useful count corrects every kernel at once.
    useful_backward = mock.patch.object(flop_counter, "sdpa_backward_flop_count", useful_sdpa_backward_flop_count)
    with useful_backward, recorder, counter:  # the counter decomposes composite ops; the recorder sees the rest
        fn()
    counted_ops = set(counter.flop_registry)
    uncounted = {
        str(op).removeprefix("aten."): calls
        for op, calls in sorted(recorder.calls.items(), key=lambda item: str(item[0]))
        if op not in counted_ops
        and op not in _LAYOUT_OPS
        and not any(overload.is_view for overload in _overloads(op))
        and torch.Tag.pointwise not in _tags(op)
    }
    by_op = {str(op).removeprefix("aten."): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return FlopCount(flops=counter.get_total_flops(), by_op=by_op, uncounted_ops=uncounted)


def _overloads(packet) -> list:
    return [getattr(packet, name) for name in packet.overloads()]


def _tags(packet) -> set:
    return {tag for overload in _overloads(packet) for tag in overload.tags}


@register_measure
class Flops(Measure):
    """FLOPs counted on one step of the plain path (``Subject.plain``: the useful multiply-adds, the
    paper's convention, whichever backend is timed); for attention cases beside the mechanism's analytic MACs
    and keys per query."""

    name = "flops"
    order = 20

    def measure(self, subject: Subject) -> dict[str, Any]:
        step, images = subject.plain() if subject.plain else (subject.step, subject.images)

        def counted() -> dict[str, Any]:
            count = count_flops(step)
            return {"counted_flops": count.flops, "counted_by_op": count.by_op, "uncounted_ops": count.uncounted_ops,
                    "images": images}
        metrics = dispatch_safely(counted)
        if subject.kind == "attention":
            metrics.update(analytic_cost(subject.module, *subject.spatial, subject.images))
        return metrics

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        counted_images = metrics.get("images", images)  # records before schema 2 counted the case's batch
        return {
            "analytic_gmacs_per_image": metrics["analytic_macs"] / images / 1e9 if "analytic_macs" in metrics else None,
            "counted_gflops_per_image": (metrics["counted_flops"] / counted_images / 1e9
                                         if "counted_flops" in metrics else None),
            "keys_per_query": metrics.get("keys_per_query"), "density": metrics.get("density"),
        }


def analytic_cost(module: Any, height: int, width: int, images: int) -> dict[str, Any]:
    """The mechanism's own MAC count (``images`` included) and the keys each query attends to."""
    analytic = module.macs(height, width).scaled(images)
    try:
        keys = module.keys_per_query(height, width)
    except NotImplementedError:
        keys = None
    return {"analytic_macs": analytic.total, "analytic_flops": analytic.flops, "analytic_parts": analytic.parts,
            "analytic_counter_blind": sorted(analytic.counter_blind), "keys_per_query": keys,
            "density": keys / (height * width) if keys is not None else None}
