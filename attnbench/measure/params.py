"""Parameter counts: what papers report as "Params"."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import Measure, Subject, register_measure


def count_parameters(module: nn.Module) -> int:
    """Learnable parameters (what papers report as "Params")."""
    return sum(parameter.numel() for parameter in module.parameters())


def state_bytes(module: nn.Module, *tensors) -> int:
    """Bytes held by the module's parameters and buffers and by ``tensors`` (the case's fixed state)."""
    held = [*module.parameters(), *module.buffers(), *tensors]
    return sum(tensor.numel() * tensor.element_size() for tensor in held)


@register_measure
class Params(Measure):
    name = "params"
    order = 10

    def measure(self, subject: Subject) -> dict[str, Any]:
        return {"count": count_parameters(subject.module)}

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        return {"params": metrics.get("count")}
