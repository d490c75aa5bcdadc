"""Measures: one file each, registered here by name; the worker and the training both iterate ``MEASURES``.

A measure declares what it runs (``measure(subject)``: a JSON-able dict stored under its name in the record's
``metrics``) and what it contributes to the report's frame (``columns(metrics, subject_batch)``: flat values),
and, when it has one, its table (``table``: the column shown, a title and a cell format). A suite's allowed
``measures`` are this registry's names. A new measure is one new file here, imported at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

KINDS = frozenset({"attention", "model", "accuracy"})


@dataclass
class Subject:
    """What a measure looks at: a module, its random input, and the step that is measured.

    ``step`` runs one inference forward or one forward + backward of ``module`` on ``x`` (``x.shape[0]``
    images); ``plain`` builds, when a measure first asks, the same step on a copy of the module on its plain
    paths and the images it covers (the paper's useful multiply-adds, whichever backend is timed; the copy is
    made only for a measure that needs it); ``kind`` is the case's kind; ``spatial`` is (H, W) of the map
    (attention) or the image (models).
    """

    module: nn.Module
    x: torch.Tensor
    step: Callable[[], Any]
    device: torch.device
    kind: str
    mode: str
    spatial: tuple[int, int]
    repeats: dict[str, Any] = field(default_factory=dict)
    plain: Callable[[], tuple[Callable[[], Any], int]] | None = None  # -> (plain step, images per plain step)

    @property
    def images(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Table:
    """A measure's own report table: one ``column`` of the frame pivoted (rows: labels, columns: shapes)."""

    title: str
    column: str
    template: str  # str.format template of one cell


class Measure:
    """Base of every measure; subclasses set ``name`` and implement ``measure`` and ``columns``."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = KINDS  # case kinds it applies to
    before_check: ClassVar[bool] = False  # measured on the fresh module, before the output is checked and timed
    on_subject: ClassVar[bool] = True  # False: produced by something else (accuracy: by the training)
    order: ClassVar[int] = 50  # measures run in this order (latency last)
    table: ClassVar[Table | None] = None

    def measure(self, subject: Subject) -> dict[str, Any]:
        raise NotImplementedError

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        """Flat report columns from this measure's stored ``metrics`` (``images`` per step of the case); every
        column present, None where ``metrics`` lacks it (an empty mapping gives the column names)."""
        raise NotImplementedError


MEASURES: dict[str, Measure] = {}


def register_measure(cls: type[Measure]) -> type[Measure]:
    MEASURES[cls.name] = cls()
    return cls


def measures_for(names: tuple[str, ...] | list[str], kind: str) -> list[Measure]:
    """The registered measures among ``names`` that apply to a case of ``kind``, in running order."""
    return sorted((MEASURES[name] for name in names if kind in MEASURES[name].kinds), key=lambda m: m.order)


def backends_used(module: nn.Module) -> list[str]:
    """The backends the module's mechanisms ran on in their last forward (``impl="auto"`` resolved), if they
    say (a ``last_backend`` attribute), e.g. ``["dense"]``."""
    names = {getattr(child, "last_backend", None) for child in module.modules()}
    return sorted(name for name in names if name)


def dispatch_safely(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a measure that watches the step through a torch dispatch mode (CPU memory, FLOP counting). A
    compiled kernel refuses to run under one (torch.compile: "non-infra torch dispatch mode present"); the
    measure is then recorded as unmeasured, with the reason, and the case goes on to be timed."""
    try:
        return measure()
    except Exception as error:
        if is_out_of_memory(error):
            raise
        return {"unmeasured": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


from . import accuracy, flops, latency, memory, params, trainable  # noqa: E402,F401  (each registers its measure)
