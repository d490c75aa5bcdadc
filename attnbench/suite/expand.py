"""A suite's cases: the cartesian product of its grid axes and zip groups, in file order, each a typed case."""

from __future__ import annotations

from typing import Any

import torch

from ..cases import AccuracyCase, AttentionCase, Case, ModelCase, Repeats
from .schema import AXES, MechanismSpec, ModelSpec, ShapeSpec, Suite, TaskSpec

DEFAULTS = {"batch": 1, "dtype": "float32", "mode": "forward"}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _combinations(suite: Suite) -> list[dict[str, Any]]:
    """One mapping axis -> value per case: the grid's product, zip groups advancing together, then defaults."""
    axes: list[list[dict[str, Any]]] = []
    given = suite.grid.given()
    for axis in AXES:
        if axis in given:
            axes.append([{axis: value} for value in given[axis]])
    for group in suite.zip:
        values = group.given()
        axes.append([dict(zip(values, combo, strict=True)) for combo in zip(*values.values(), strict=True)])
    tied = {axis for group in suite.zip for axis in group.given()}
    for axis, value in DEFAULTS.items():
        if axis not in given and axis not in tied:
            axes.append([{axis: value}])
    combos: list[dict[str, Any]] = [{}]
    for axis in axes:
        combos = [{**combo, **choice} for combo in combos for choice in axis]
    return combos


def _case(suite: Suite, combo: dict[str, Any]) -> Case:
    common = dict(batch=combo["batch"], dtype=combo["dtype"], mode=combo["mode"], device=resolve_device(suite.device),
                  measures=tuple(suite.measures), repeats=Repeats(**suite.repeats.model_dump()),
                  threads=suite.threads, seed=combo.get("seed", suite.seed),
                  check_correctness=suite.check_correctness, timeout_s=suite.timeout_s, imports=tuple(suite.imports),
                  suite=suite.name)
    if "task" in combo:
        model: ModelSpec = combo["model"]
        task: TaskSpec = combo["task"]
        common.update(batch=task.train.batch_size, mode="train")
        task_fields = task.model_dump()
        if model.recipe:  # keys checked by load_suite
            task_fields["recipe"] = {**task_fields["recipe"], **model.recipe}
        return AccuracyCase(model=model.name, label=model.label or model.name, source=model.source,
                            options={**model.options, **task.model_options}, task=task_fields,
                            paper=model.paper, **common)
    if "model" in combo:
        model = combo["model"]
        return ModelCase(model=model.name, label=model.label or model.name, options=dict(model.options),
                         source=model.source, image_size=combo["image_size"], paper=model.paper, amp=suite.amp,
                         channels_last=suite.channels_last, compile=suite.compile, **common)
    spec: MechanismSpec = combo["mechanism"]
    shape: ShapeSpec = combo["shape"]
    return AttentionCase(mechanism=spec.name, label=spec.label or spec.name, source=spec.source,
                         options={**spec.options, **spec.options_by_shape.get(shape.name, {})}, shape=shape.name,
                         height=shape.height, width=shape.width, dim=shape.dim, heads=shape.heads, **common)


def expand(suite: Suite) -> list[Case]:
    """The suite's cases with their ids, computed once per loaded suite."""
    if suite._cases is None:
        suite._cases = [_case(suite, combo).with_id() for combo in _combinations(suite)]
    return suite._cases
