"""Before a case is timed: its output must be finite and agree with the float64 CPU run of the same module."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

# max |out - reference| allowed, relative to max |reference|, by the case's dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Agreement:
    max_abs_error: float
    reference_scale: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance * max(self.reference_scale, 1.0)

    def summary(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "reference_scale": self.reference_scale,
                "tolerance": self.tolerance, "ok": self.ok}


def plain_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every mechanism with faster paths (a ``plain()`` method, e.g. BRA's
    ``impl``) is replaced by its plain one, at any depth (a whole model too)."""
    if hasattr(module, "plain"):
        return module.plain()
    copied = copy.deepcopy(module)
    for name, child in list(copied.named_modules()):
        if name and hasattr(child, "plain"):
            parent, _, attribute = name.rpartition(".")
            setattr(copied.get_submodule(parent) if parent else copied, attribute, child.plain())
    return copied


def plain_reference(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``module`` on its plain paths."""
    return plain_copy(module).to(device="cpu", dtype=torch.float64).eval()


@torch.no_grad()
def check_against_reference(module: nn.Module, x: torch.Tensor) -> Agreement:
    """Compare ``module(x)`` with the float64 plain path on the same input (use a small batch)."""
    out = module(x).double().cpu()
    expected = plain_reference(module)(x.detach().double().cpu())
    return Agreement(float((out - expected).abs().max()), float(expected.abs().max()), TOLERANCE[x.dtype])
