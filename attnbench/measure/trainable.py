"""Parameters that receive a gradient: a learnable weight that no gradient reaches is dead in training (a
routing projection behind a detached top-k, a branch a mask never uses)."""

from __future__ import annotations

from typing import Any

import torch

from . import Measure, Subject, Table, register_measure


@register_measure
class GradientReach(Measure):
    name = "gradient_reach"
    kinds = frozenset({"attention", "model"})
    order = 15
    table = Table("Parameters that receive a gradient in one forward + backward (of those that require one)",
                  "grad_params", "{:,.0f}")

    def measure(self, subject: Subject) -> dict[str, Any]:
        module, x = subject.module, subject.x.detach()
        training = module.training
        module.train()
        module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = module(x)
            out.backward(torch.randn_like(out))
        params = [p for p in module.parameters() if p.requires_grad]
        reached = sum(p.numel() for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))
        module.zero_grad(set_to_none=True)
        module.train(training)
        return {"requires_grad": sum(p.numel() for p in params), "reached": reached}

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        return {"grad_params": metrics.get("reached"), "grad_required_params": metrics.get("requires_grad")}
