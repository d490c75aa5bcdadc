"""Before a case is timed: its output must be finite and agree with the float64 CPU run of the same module.

Below float64 a top-k choice (BRA's routed regions, QuadTree's kept keys) whose scores are near a tie can come
out differently than in float64, and then a region or a key attends elsewhere: the outputs differ by far more than
rounding although both computations are right (in bfloat16 often; in float32 rarely, but QuadTree's twelve
blocks in BiFormer-STL met one, 6e-4 against a tolerance of 1e-4). For such modules the check therefore records
the choices the module made (the whole batch on one thread), imposes them on the float64 run
(``attentions/_common.top_k_choice``) and compares the arithmetic. An imposed choice must be a near-tie: one
scoring below float64's own k-th choice by more than the dtype's tolerance × max |score| fails the check (a wrong
choice is not excused). How many choices float64 would have made differently is reported beside it (for
QuadTree, every level's rows count: a flip at a coarse level changes the candidates below it).

The check compares the path the case times: a module in train mode (a forward+backward case) runs its whole batch
on the caller's thread, one in eval mode may split it over ``attentions/by_image.py``'s worker threads (except
when choices are imposed: their order must be the batch's); both run in eval mode here (no drop path or dropout
draws), and the module's own flags are restored.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from attentions.by_image import no_workers

# max |out - reference| allowed, relative to max |reference|, by the case's dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}





@dataclass(frozen=True)
class Agreement:
    max_abs_error: float
    reference_scale: float
    tolerance: float
    choices_imposed: int = 0  # top-k choices of the module imposed on the float64 run (below float64 only)
    choices_differing: int = 0  # of those, how many the float64 run would have made otherwise
    imposed_shortfall: float = 0.0  # the worst imposed choice's score below float64's k-th, ÷ max |score|

    @property
    def ok(self) -> bool:
        return (self.max_abs_error <= self.tolerance * max(self.reference_scale, 1.0)
                and self.imposed_shortfall <= self.tolerance)

    def failure(self) -> str:
        """Why the check failed, in one line (empty when it passed)."""
        if self.imposed_shortfall > self.tolerance:
            return (f"a top-k choice of the module scores {self.imposed_shortfall:.3g} × max |score| below float64's "
                    f"own k-th choice (tolerance {self.tolerance:g}): not a near-tie")
        if not self.ok:
            return (f"output differs from the float64 plain path by {self.max_abs_error:.3g} (tolerance "
                    f"{self.tolerance:g} × {self.reference_scale:.3g})")
        return ""

    def summary(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "reference_scale": self.reference_scale,
                "tolerance": self.tolerance, "ok": self.ok, "choices_imposed": self.choices_imposed,
                "choices_differing": self.choices_differing, "imposed_shortfall": self.imposed_shortfall}


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


def _rows(indices: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """A run's choices as rows of k sorted indices in call order, by k (two runs may split the batch otherwise)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for index in indices:
        groups.setdefault(index.shape[-1], []).append(index.reshape(-1, index.shape[-1]).cpu().sort(-1).values)
    return {k: torch.cat(rows) for k, rows in groups.items()}


def _differing(chosen: dict[str, list], own: dict[str, list]) -> int:
    """Rows of top-k indices whose sets differ between two runs' choices."""
    count = 0
    for name in chosen:
        ours, theirs = _rows(chosen[name]), _rows(own[name])
        for k, rows in ours.items():
            count += int((rows != theirs[k]).any(-1).sum())
    return count


@torch.no_grad()
def check_against_reference(module: nn.Module, x: torch.Tensor) -> Agreement:
    """Compare ``module(x)`` with the float64 plain path on the same input (use a small batch); below float64
    with the module's top-k choices imposed on the float64 run (module docstring)."""
    flags = [(child, child.training) for child in module.modules()]
    names = _choosers(module) if x.dtype != torch.float64 else []  # the modules whose choices are imposed
    whole_batch = module.training or bool(names)  # as the timed train-mode step runs it; imposed choices in order
    module.eval()
    try:
        with no_workers() if whole_batch else contextlib.nullcontext():
            return _agreement(module, x, names)
    finally:
        for child, training in flags:
            child.training = training


def _agreement(module: nn.Module, x: torch.Tensor, names: list[str]) -> Agreement:
    reference = plain_reference(module)
    x64 = x.detach().double().cpu()
    if not names:
        out = module(x).double().cpu()
        expected = reference(x64)
        return Agreement(float((out - expected).abs().max()), float(expected.abs().max()), TOLERANCE[x.dtype])
    out, chosen = _recording_choices(module, names, lambda: module(x).double().cpu())
    _, own = _recording_choices(reference, names, lambda: reference(x64))
    choosers = [reference.get_submodule(name) for name in names]
    for name, chooser in zip(names, choosers, strict=True):
        chooser.imposed_choices = [index.cpu() for index in chosen[name]]
    expected = reference(x64)
    if any(chooser.imposed_choices for chooser in choosers):
        raise ValueError("the float64 run made fewer top-k choices than the module: the imposed ones were not all used")
    imposed = sum(index[..., 0].numel() for indices in chosen.values() for index in indices)
    shortfall = max(getattr(chooser, "imposed_shortfall", 0.0) for chooser in choosers)
    return Agreement(float((out - expected).abs().max()), float(expected.abs().max()), TOLERANCE[x.dtype],
                     imposed, _differing(chosen, own), shortfall)
