"""Before a case is timed: its output must be finite and agree with the float64 CPU run of the same module.

In bfloat16 / float16 a top-k choice (BRA's routed regions, QuadTree's kept keys) whose scores are near a tie
can come out differently than in float64, and then one region attends elsewhere: the outputs differ by O(1)
although both computations are right. For half-precision cases the check therefore runs one image, records
the choices the module made, imposes them on the float64 run (``attentions/_common.top_k_choice``), and
compares the arithmetic; how many choices float64 would have made differently is reported beside it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

# max |out - reference| allowed, relative to max |reference|, by the case's dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


HALF_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Agreement:
    max_abs_error: float
    reference_scale: float
    tolerance: float
    choices_imposed: int = 0  # top-k choices of the module imposed on the float64 run (half precision only)
    choices_differing: int = 0  # of those, how many the float64 run would have made otherwise

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance * max(self.reference_scale, 1.0)

    def summary(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "reference_scale": self.reference_scale,
                "tolerance": self.tolerance, "ok": self.ok, "choices_imposed": self.choices_imposed,
                "choices_differing": self.choices_differing}


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


def _choosers(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_modules() if getattr(child, "makes_top_k_choices", False)]


def _recording_choices(module: nn.Module, names: list[str], run) -> tuple[torch.Tensor, dict[str, list]]:
    """``run()`` with every chooser of ``module`` recording its choices: the output and the choices by name."""
    for name in names:
        module.get_submodule(name).recorded_choices = []
    try:
        out = run()
    finally:
        recorded = {name: module.get_submodule(name).__dict__.pop("recorded_choices") for name in names}
    return out, recorded


def _differing(chosen: dict[str, list], own: dict[str, list]) -> int:
    """Rows of top-k indices whose sets differ between two runs' choices."""
    return sum(int((a.cpu().sort(-1).values != b.cpu().sort(-1).values).any(-1).sum())
               for name in chosen for a, b in zip(chosen[name], own[name], strict=True))


@torch.no_grad()
def check_against_reference(module: nn.Module, x: torch.Tensor) -> Agreement:
    """Compare ``module(x)`` with the float64 plain path on the same input (use a small batch); in half
    precision on the first image, with the module's top-k choices imposed on the float64 run. Both run in eval
    mode (the function, without drop path or dropout draws); ``module``'s own train/eval flags are restored."""
    flags = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        return _agreement(module, x)
    finally:
        for child, training in flags:
            child.training = training


def _agreement(module: nn.Module, x: torch.Tensor) -> Agreement:
    reference = plain_reference(module)
    names = _choosers(module) if x.dtype in HALF_PRECISION else []
    if not names:
        out = module(x).double().cpu()
        expected = reference(x.detach().double().cpu())
        return Agreement(float((out - expected).abs().max()), float(expected.abs().max()), TOLERANCE[x.dtype])
    x = x[:1]
    x64 = x.detach().double().cpu()
    out, chosen = _recording_choices(module, names, lambda: module(x).double().cpu())
    _, own = _recording_choices(reference, names, lambda: reference(x64))
    for name in names:
        reference.get_submodule(name).imposed_choices = [index.cpu() for index in chosen[name]]
    expected = reference(x64)
    imposed = sum(index[..., 0].numel() for indices in chosen.values() for index in indices)
    return Agreement(float((out - expected).abs().max()), float(expected.abs().max()), TOLERANCE[x.dtype],
                     imposed, _differing(chosen, own))
