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


def plain_reference(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``module``; a mechanism with faster paths returns its plain one from
    ``plain()``."""
    reference = module.plain() if hasattr(module, "plain") else copy.deepcopy(module)
    return reference.to(device="cpu", dtype=torch.float64).eval()


@torch.no_grad()
def check_against_reference(module: nn.Module, x: torch.Tensor) -> Agreement:
    """Compare ``module(x)`` with the float64 plain path on the same input (use a small batch)."""
    out = module(x).double().cpu()
    expected = plain_reference(module)(x.detach().double().cpu())
    return Agreement(float((out - expected).abs().max()), float(expected.abs().max()), TOLERANCE[x.dtype])
