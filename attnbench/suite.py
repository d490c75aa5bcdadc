"""Suite files: schema (pydantic), validation with one-line errors, profiles, and expansion into cases.

A suite is a YAML file::

    name: speed
    device: auto                      # auto | cpu | cuda
    measures: [params, flops, memory, latency]
    grid:                             # cartesian product of these axes
      mechanism:
        - {name: bra, options: {n_win: 7}, options_by_shape: {biformer_t.stage1: {topk: 1}}}
        - {name: full}
      shape: [biformer_t.stage1, {name: tiny, height: 14, width: 21, dim: 64, heads: 2}]
      batch: [8]
      dtype: [float32]
      mode: [forward, forward_backward]
    zip:                              # each group is one axis whose lists advance together
      - {shape: [...], batch: [...]}
    profiles:                         # named partial suites merged over the base (lists replace)
      quick: {grid: {batch: [2]}, repeats: {max_time_s: 1}}

A suite of whole models uses ``model`` (timm names, attnbench's models included) and ``image_size`` axes
instead of ``mechanism`` and ``shape``; a model's ``paper`` names its row in attnbench/paper_figures.yaml.

Every error names the file, the field path and what is allowed, in one line (``SuiteError``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import attentions

from .presets import PRESETS

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "float64", "bfloat16", "float16"]
Mode = Literal["forward", "forward_backward"]
Measure = Literal["params", "flops", "memory", "latency", "accuracy"]
AXES = ("mechanism", "shape", "task", "model", "image_size", "batch", "dtype", "mode")  # outer to inner


class SuiteError(ValueError):
    """A suite file that cannot be run: the message is one line naming the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Repeats(Strict):
    """How long and how often a case is timed."""

    warmup_iters: int = Field(3, ge=0)
    warmup_time_s: float = Field(0.2, ge=0)
    min_samples: int = Field(5, ge=1)
    max_samples: int = Field(100, ge=1)
    max_time_s: float = Field(5.0, gt=0)
    target_iqr: float = Field(0.10, gt=0)  # stop once IQR / median is below this


class MechanismSpec(Strict):
    name: str
    label: str | None = None
    options: dict[str, Any] = {}
    options_by_shape: dict[str, dict[str, Any]] = {}  # shape name -> options for that shape only
    source: str | None = None  # the upstream config these options come from (repo, path, commit or tag)


class ModelSpec(Strict):
    name: str  # a timm model name (attnbench.models registers BiFormer's)
    label: str | None = None
    options: dict[str, Any] = {}  # keyword arguments of timm.create_model
    paper: str | None = None  # key of the paper's row in attnbench/paper_figures.yaml (models)
    source: str | None = None  # the upstream config of the model's options (repo, path, commit or tag)


class ShapeSpec(Strict):
    """Either a preset name (see attnbench.presets) or explicit sizes; ``name`` labels the report column."""

    preset: str | None = None
    name: str | None = None
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    dim: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> ShapeSpec:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
            preset = PRESETS[self.preset]
            for key in ("height", "width", "dim", "heads"):
                if getattr(self, key) is None:
                    setattr(self, key, getattr(preset, key))
            self.name = self.name or self.preset
        missing = [key for key in ("height", "width", "dim", "heads") if getattr(self, key) is None]
        if missing:
            raise ValueError(f"needs a preset or all of height, width, dim, heads (missing {', '.join(missing)})")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        self.name = self.name or f"{self.height}x{self.width}x{self.dim}"
        return self


class DataSpec(Strict):
    """Where a task's images are and which subset of them it uses (attnbench/data/)."""

    dataset: Literal["imagenet", "ade20k", "relation_proxy"]
    root: str | None = None  # or --data-root NAME=PATH on the command line (NAME: the task's name)
    generate: dict[str, Any] | None = None  # write a generated data set of this size at root first (demo, tests)
    classes: list[str] | None = None  # classification: class folders to use
    num_classes: int | None = Field(None, ge=1)  # ... or how many to draw with seed
    images_per_class: int | None = Field(None, ge=1)
    val_images_per_class: int | None = Field(None, ge=1)
    images: int | None = Field(None, ge=1)  # segmentation: training images to draw with seed
    val_images: int | None = Field(None, ge=1)
    seed: int = 0


class TrainSpec(Strict):
    """The optimisation recipe (attnbench/train/engine.py TrainSettings); batch sizes are per process."""

    epochs: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    clip_grad: float | None = Field(None, gt=0)
    amp: bool = True
    workers: int = Field(0, ge=0)


TASK_DATASETS = {"classification": ("imagenet", "relation_proxy"), "segmentation": ("ade20k",)}
RECIPE_KEYS = {
    "classification": ("auto_augment", "re_prob", "mixup", "cutmix", "label_smoothing", "scale", "color_jitter",
                       "hflip", "drop_path_rate", "crop_pct", "interpolation"),
    "segmentation": ("fpn_channels", "head_channels", "dropout", "drop_path_rate", "ratio_range"),
}


class TaskSpec(Strict):
    """An accuracy task: train a model on a data subset, then score it (top-1/top-5, or mIoU/pixel accuracy)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: Literal["classification", "segmentation"]
    image_size: int = Field(224, ge=32)  # classification input; segmentation crop
    data: DataSpec
    train: TrainSpec = TrainSpec()
    recipe: dict[str, Any] = {}  # augmentation / regularisation / head overrides, see RECIPE_KEYS
    model_options: dict[str, Any] = {}  # merged over every model's options for this task (e.g. a demo scale)

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.data.dataset not in TASK_DATASETS[self.task]:
            raise ValueError(f"data.dataset {self.data.dataset!r} does not fit task {self.task!r}; "
                             f"use {' or '.join(TASK_DATASETS[self.task])}")
        unknown = sorted(set(self.recipe) - set(RECIPE_KEYS[self.task]))
        if unknown:
            raise ValueError(f"recipe: unknown key(s) {', '.join(unknown)} for {self.task}; "
                             f"allowed: {', '.join(RECIPE_KEYS[self.task])}")
        return self


class Axes(Strict):
    mechanism: list[MechanismSpec] | None = None
    shape: list[ShapeSpec] | None = None
    model: list[ModelSpec] | None = None
    image_size: list[int] | None = None
    task: list[TaskSpec] | None = None
    batch: list[int] | None = None
    dtype: list[DType] | None = None
    mode: list[Mode] | None = None

    @field_validator("shape", mode="before")
    @classmethod
    def _preset_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"preset": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("batch", "image_size")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(item < 1 for item in value):
            raise ValueError("every entry must be >= 1")
        return value

    def given(self) -> dict[str, list]:
        return {axis: getattr(self, axis) for axis in AXES if getattr(self, axis) is not None}


class SuiteSettings(Strict):
    description: str = ""
    imports: list[str] = []  # modules imported before building mechanisms (third-party registrations)
    device: Device = "auto"
    measures: list[Measure] = ["params", "flops", "memory", "latency"]
    repeats: Repeats = Repeats()
    timeout_s: float = Field(600.0, gt=0)
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    check_correctness: bool = True
    baseline: str | None = None  # a row label: the report adds a speed-up table (baseline latency ÷ row latency)


class Profile(Strict):
    """A partial suite merged over the base: every field optional, lists replace, mappings merge."""

    description: str | None = None
    device: Device | None = None
    measures: list[Measure] | None = None
    repeats: dict[str, Any] | None = None
    timeout_s: float | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1)
    check_correctness: bool | None = None
    baseline: str | None = None
    grid: Axes | None = None
    zip: list[Axes] | None = None


class Suite(SuiteSettings):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    grid: Axes
    zip: list[Axes] = []
    profiles: dict[str, Profile] = {}


@dataclass(frozen=True)
class Case:
    """One measurement: a mechanism with options, at one shape, batch, dtype, mode and device."""

    mechanism: str
    label: str
    options: dict[str, Any]
    shape: str
    height: int
    width: int
    dim: int
    heads: int
    batch: int
    dtype: str
    mode: str
    device: str
    measures: tuple[str, ...]
    repeats: dict[str, Any]
    threads: int | None
    seed: int
    check_correctness: bool
    timeout_s: float
    imports: tuple[str, ...] = ()
    suite: str = ""
    kind: str = "attention"  # "model": ``mechanism`` is a timm model name, dim = in_chans; "accuracy": trained
    paper: str | None = None
    task: dict[str, Any] | None = None  # kind "accuracy": the TaskSpec (data, recipe) the model is trained on
    id: str = field(default="", compare=False)

    def identity(self) -> dict[str, Any]:
        """What the measurement depends on: its hash is the case id (labels and timeouts are left out)."""
        config = asdict(self)
        for key in ("label", "suite", "timeout_s", "id", "shape", "paper"):
            config.pop(key)
        return json.loads(json.dumps(config, sort_keys=True, default=str))

    def config(self) -> dict[str, Any]:
        return {**asdict(self), "measures": list(self.measures), "imports": list(self.imports)}


def case_id(case: Case) -> str:
    return hashlib.sha1(json.dumps(case.identity(), sort_keys=True).encode()).hexdigest()[:16]


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that the field path ``loc`` leads into, to list its allowed keys."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        if part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        while get_origin(current) is not None or get_args(current):
            args = [arg for arg in get_args(current) if arg is not type(None)]
            if not args:
                break
            current = args[-1]
            if isinstance(current, type) and issubclass(current, BaseModel):
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_error(path: Path, error: ValidationError, model: type[BaseModel]) -> SuiteError:
    detail = error.errors()[0]
    loc = tuple(detail["loc"])
    if detail["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the suite schema"
        return SuiteError(f"{path}: {_location(loc)}: unknown key {loc[-1]!r}; allowed: {allowed}")
    if detail["type"] == "missing":
        return SuiteError(f"{path}: {_location(loc)}: required field is missing")
    message = detail["msg"].removeprefix("Value error, ")
    return SuiteError(f"{path}: {_location(loc)}: {message} (got {detail.get('input')!r})")


def _apply_data_roots(suite: Suite, data_roots: dict[str, str]) -> None:
    tasks = [task for _, values in _axis_values(suite, "task") for task in values]
    names = [task.name for task in tasks]
    for name, root in data_roots.items():
        if name not in names:
            raise SuiteError(f"--data-root {name}={root}: no task named {name!r}; tasks: {', '.join(names) or 'none'}")
        for task in tasks:
            if task.name == name:
                task.data.root = root


def load_suite(path: str | Path, profile: str | None = None, data_roots: dict[str, str] | None = None) -> Suite:
    """Read, merge the profile, set ``data_roots`` (task name -> path), validate: a ``SuiteError`` with one line
    on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such suite file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SuiteError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: (top level): a suite is a mapping with at least 'name' and 'grid'")
    try:
        base = Suite.model_validate(raw)
    except ValidationError as error:
        raise _first_error(path, error, Suite) from None
    if profile is not None:
        if profile not in base.profiles:
            known = ", ".join(base.profiles) or "none"
            raise SuiteError(f"{path}: profiles: no profile {profile!r}; profiles: {known}")
        merged = _merge(raw, raw["profiles"][profile] or {})
        try:
            base = Suite.model_validate(merged)
        except ValidationError as error:
            raise _first_error(path, error, Suite) from None
    _apply_data_roots(base, data_roots or {})
    _check_semantics(path, base)
    _check_distinct(path, base)
    _check_baseline(path, base)
    return base


def _import_modules(path: Path, suite: Suite) -> None:
    for index, module in enumerate(suite.imports):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise SuiteError(f"{path}: imports[{index}]: cannot import {module!r}: {error}") from None


def _axis_values(suite: Suite, axis: str) -> list[tuple[str, list]]:
    """(field path, values) of every place an axis is given."""
    places = []
    if getattr(suite.grid, axis) is not None:
        places.append((f"grid.{axis}", getattr(suite.grid, axis)))
    for index, group in enumerate(suite.zip):
        if getattr(group, axis) is not None:
            places.append((f"zip[{index}].{axis}", getattr(group, axis)))
    return places


def _check_semantics(path: Path, suite: Suite) -> None:
    _import_modules(path, suite)
    models = bool(_axis_values(suite, "model"))
    tasks = bool(_axis_values(suite, "task"))
    required = (("model", "task") if tasks else ("model", "image_size")) if models else ("mechanism", "shape")
    for axis in AXES:
        places = _axis_values(suite, axis)
        if len(places) > 1:
            raise SuiteError(f"{path}: {places[1][0]}: axis {axis!r} is already given at {places[0][0]}")
        if axis in required and not places:
            raise SuiteError(f"{path}: grid.{axis}: required axis is missing")
        if places and axis in ("mechanism", "shape", "model", "image_size", "task") and axis not in required:
            raise SuiteError(f"{path}: {places[0][0]}: a suite measures mechanisms at shapes, models at image "
                             "sizes, or models trained on tasks; not a mix")
    for index, group in enumerate(suite.zip):
        lengths = {axis: len(values) for axis, values in group.given().items()}
        if len(set(lengths.values())) > 1:
            raise SuiteError(f"{path}: zip[{index}]: tied axes need equal lengths, got {lengths}")
    if tasks:
        _check_tasks(path, suite)
        return
    if models:
        _check_models(path, suite)
        return
    (shape_path, shapes), = _axis_values(suite, "shape")
    shape_names = [shape.name for shape in shapes]
    (mechanism_path, mechanisms), = _axis_values(suite, "mechanism")
    registered = attentions.available()
    for index, spec in enumerate(mechanisms):
        where = f"{path}: {mechanism_path}[{index}]"
        if spec.name not in registered:
            raise SuiteError(f"{where}.name: unknown attention {spec.name!r}; registered: {', '.join(registered)}")
        valid = attentions.options(spec.name)
        for key, options in [("options", spec.options), *(
                (f"options_by_shape.{name}", extra) for name, extra in spec.options_by_shape.items())]:
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise SuiteError(f"{where}.{key}: unknown option(s) {', '.join(unknown)} for attention "
                                 f"{spec.name!r}; valid options: {', '.join(valid)}")
        for name in spec.options_by_shape:
            if name not in shape_names:
                raise SuiteError(f"{where}.options_by_shape: no shape named {name!r}; shapes: {', '.join(shape_names)}")
        for shape in shapes:
            options = {**spec.options, **spec.options_by_shape.get(shape.name, {})}
            try:
                with torch.device("meta"):
                    module = attentions.create(spec.name, dim=shape.dim, num_heads=shape.heads, **options)
                module.macs(shape.height, shape.width)
            except (ValueError, TypeError) as error:
                raise SuiteError(f"{where}: at shape {shape.name} ({shape.height}x{shape.width}, dim {shape.dim}, "
                                 f"heads {shape.heads}): {error}") from None


def _check_tasks(path: Path, suite: Suite) -> None:
    import inspect

    from .data import GENERATORS

    if "accuracy" not in suite.measures:
        raise SuiteError(f"{path}: measures: a suite of tasks needs 'accuracy' among its measures")
    if "memory" in suite.measures:
        raise SuiteError(f"{path}: measures: 'memory' is measured by speed suites, not by accuracy suites")
    (task_path, tasks), = _axis_values(suite, "task")
    for index, task in enumerate(tasks):
        where = f"{path}: {task_path}[{index}]"
        if task.data.root is None:
            raise SuiteError(f"{where}.data.root: no data root; give it in the suite or with "
                             f"--data-root {task.name}=PATH")
        if task.data.generate is None and not Path(task.data.root).is_dir():
            layout = ("ADEChallengeData2016 with images/ and annotations/" if task.data.dataset == "ade20k"
                      else "an ImageFolder root with train/<class>/ and val/<class>/")
            raise SuiteError(f"{where}.data.root: {task.data.root} is not a directory (expected {layout})")
        if task.data.generate is not None:
            generator = GENERATORS[task.data.dataset]
            allowed = [name for name in inspect.signature(generator).parameters if name not in ("root", "seed")]
            unknown = sorted(set(task.data.generate) - set(allowed))
            if unknown:
                raise SuiteError(f"{where}.data.generate: unknown key(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(allowed)}")
    _check_models(path, suite, paper_tables=("attention_ablation", "models"))


def _check_models(path: Path, suite: Suite, paper_tables: tuple[str, ...] = ("models",)) -> None:
    import timm

    from . import models  # noqa: F401  (registers BiFormer's models with timm)
    from .paper import paper_figures

    (model_path, specs), = _axis_values(suite, "model")
    for index, spec in enumerate(specs):
        where = f"{path}: {model_path}[{index}]"
        if not timm.is_model(spec.name):
            raise SuiteError(f"{where}.name: unknown model {spec.name!r}; attnbench's: biformer_tiny, biformer_small, "
                             "biformer_base, biformer_stl*, or any timm model name")
        rows = [row for table in paper_tables for row in paper_figures()[table]]
        if spec.paper is not None and spec.paper not in rows:
            raise SuiteError(f"{where}.paper: no paper row {spec.paper!r}; rows: {', '.join(rows)}")
        try:
            with torch.device("meta"):  # builds the architecture without allocating its weights
                timm.create_model(spec.name, **spec.options)
        except (ValueError, TypeError) as error:
            raise SuiteError(f"{where}.options: {error}") from None
        except (NotImplementedError, RuntimeError):
            pass  # a model that cannot be built on the meta device is checked when its case runs


def _check_distinct(path: Path, suite: Suite) -> None:
    seen: dict[str, Case] = {}
    for case in expand(suite):
        if case.id in seen:
            first = seen[case.id]
            raise SuiteError(f"{path}: grid: cases '{first.label} @ {first.shape}' and '{case.label} @ {case.shape}' "
                             "measure the same thing (same mechanism, options, shape, batch, dtype and mode)")
        seen[case.id] = case


def _check_baseline(path: Path, suite: Suite) -> None:
    labels = list(dict.fromkeys(case.label for case in expand(suite)))
    if suite.baseline is not None and suite.baseline not in labels:
        raise SuiteError(f"{path}: baseline: no row labelled {suite.baseline!r}; labels: {', '.join(labels)}")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def expand(suite: Suite) -> list[Case]:
    """The cartesian product of the grid axes and the zip groups, in file order, with stable ids."""
    axes: list[list[dict[str, Any]]] = []
    defaults = {"batch": [1], "dtype": ["float32"], "mode": ["forward"]}
    given = suite.grid.given()
    for axis in AXES:
        if axis in given:
            axes.append([{axis: value} for value in given[axis]])
    for group in suite.zip:
        values = group.given()
        axes.append([dict(zip(values, combo, strict=True)) for combo in zip(*values.values(), strict=True)])
    tied = {axis for group in suite.zip for axis in group.given()}
    for axis, value in defaults.items():
        if axis not in given and axis not in tied:
            axes.append([{axis: value[0]}])
    combos: list[dict[str, Any]] = [{}]
    for axis in axes:
        combos = [{**combo, **choice} for combo in combos for choice in axis]
    cases = []
    for combo in combos:
        common = dict(
            batch=combo["batch"], dtype=combo["dtype"], mode=combo["mode"], device=resolve_device(suite.device),
            measures=tuple(suite.measures), repeats=suite.repeats.model_dump(), threads=suite.threads,
            seed=suite.seed, check_correctness=suite.check_correctness, timeout_s=suite.timeout_s,
            imports=tuple(suite.imports), suite=suite.name,
        )
        if "task" in combo:
            model, task = combo["model"], combo["task"]
            common.update(batch=task.train.batch_size, mode="train")
            case = Case(mechanism=model.name, label=model.label or model.name,
                        options={**model.options, **task.model_options}, shape=task.name,
                        height=task.image_size, width=task.image_size, dim=3, heads=0, kind="accuracy",
                        paper=model.paper, task=task.model_dump(), **common)
        elif "model" in combo:
            model: ModelSpec = combo["model"]
            size = combo["image_size"]
            case = Case(mechanism=model.name, label=model.label or model.name, options=dict(model.options),
                        shape=f"{size}px", height=size, width=size, dim=3, heads=0, kind="model",
                        paper=model.paper, **common)
        else:
            spec: MechanismSpec = combo["mechanism"]
            shape: ShapeSpec = combo["shape"]
            case = Case(mechanism=spec.name, label=spec.label or spec.name,
                        options={**spec.options, **spec.options_by_shape.get(shape.name, {})}, shape=shape.name,
                        height=shape.height, width=shape.width, dim=shape.dim, heads=shape.heads, **common)
        cases.append(Case(**{**case.__dict__, "id": case_id(case)}))
    return cases
