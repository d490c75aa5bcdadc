"""FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, with the ops it cannot see listed.

FlopCounterMode counts 2 FLOPs per multiply-add of convs, linears and matmuls. On CPU it counts nothing for
``scaled_dot_product_attention`` (the CPU flash kernel has no formula in torch), so formulas for that op and
its backward are supplied here. Every other op that does arithmetic but has no formula (top-k, gather,
softmax, pooling, grid_sample, norms, reductions) is recorded by name in ``uncounted_ops`` so a reader knows
what the count leaves out; pointwise ops and pure layout ops are not listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from . import Measure, Subject, dispatch_safely, register_measure

aten = torch.ops.aten


def _cpu_flash_forward_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
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
    """Run ``fn()`` once under FlopCounterMode (with the CPU SDPA formulas) and report what it counted."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    recorder = _OpRecorder()
    with recorder, counter:  # the counter decomposes composite ops; the recorder sees what it then runs
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
    """FLOPs counted on one step. Attention cases: on the timed step, beside the mechanism's analytic MACs
    and keys per query. Models and trained models: on the plain path of their mechanisms (the useful
    multiply-adds, the paper's convention, whichever backend is timed)."""

    name = "flops"
    order = 20

    def measure(self, subject: Subject) -> dict[str, Any]:
        step = subject.plain_step or subject.step
        images = subject.plain_images if subject.plain_step else subject.images

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
