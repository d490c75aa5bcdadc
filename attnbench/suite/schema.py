"""The suite file's schema (pydantic, strict): every key a suite may hold, with its type and default.

The measures a suite may list are the names registered in attnbench/measure/. See attnbench/suite/__init__.py
for the file's layout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..cases import Repeats
from ..measure import MEASURES
from ..presets import PRESETS

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "float64", "bfloat16", "float16"]
Mode = Literal["forward", "forward_backward"]
AXES = ("mechanism", "shape", "task", "model", "image_size", "seed", "batch", "dtype", "mode")  # outer to inner


def _registered_measures(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {', '.join(unknown)}; measures: {', '.join(MEASURES)}")
    return names


class SuiteError(ValueError):
    """A suite file that cannot be run: the message is one line naming the file and the field."""


class Strict(BaseModel):
    """No unknown keys, no coercion (``true`` is no batch size, "8" no number), no infinities."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RepeatsSpec(Repeats):
    """A suite's timing repeats (attnbench/cases.py ``Repeats``), held to what a trustworthy figure needs."""

    model_config = ConfigDict(extra="forbid", strict=True)

    min_samples: int = Field(10, ge=5)  # a median and an IQR of fewer samples say little
    max_samples: int = Field(100, ge=5)
    max_time_s: float = Field(5.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> RepeatsSpec:
        if self.min_samples > self.max_samples:
            raise ValueError(f"min_samples={self.min_samples} is above max_samples={self.max_samples}")
        return self


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
    recipe: dict[str, Any] = {}  # accuracy tasks: this model's recipe overrides (e.g. its official drop path)


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

    dataset: Literal["imagenet", "ade20k", "relation_proxy", "colour_pointer"]
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
    lr_reference_batch: int | None = Field(None, ge=1)  # lr × batch_size × processes / this (linear scaling)
    cooldown_epochs: int = Field(0, ge=0)
    iterations: int | None = Field(None, ge=1)  # instead of epochs
    warmup_iterations: int | None = Field(None, ge=0)  # instead of warmup_epochs
    repeated_augmentation: int = Field(1, ge=1)
    model_ema_decay: float | None = Field(None, gt=0, lt=1)
    sync_bn: bool = False
    eval_interval: int = Field(1, ge=1)  # epochs between evaluations (and after the last)

    @model_validator(mode="after")
    def _one_length(self) -> TrainSpec:
        if self.iterations is not None and "epochs" in self.model_fields_set:
            raise ValueError("give epochs or iterations, not both")
        if self.warmup_iterations is not None and "warmup_epochs" in self.model_fields_set:
            raise ValueError("give warmup_epochs or warmup_iterations, not both")
        return self


TASK_DATASETS = {"classification": ("imagenet", "relation_proxy", "colour_pointer"), "segmentation": ("ade20k",)}
RECIPE_KEYS = {
    "classification": ("auto_augment", "re_prob", "mixup", "cutmix", "label_smoothing", "scale", "color_jitter",
                       "hflip", "drop_path_rate", "crop_pct", "interpolation"),
    "segmentation": ("fpn_channels", "head_channels", "dropout", "drop_path_rate", "ratio_range", "scale",
                     "cat_max_ratio", "photometric_distortion", "eval_resize", "size_divisor", "output_norms",
                     "backbone_checkpoint"),
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
    official: str | None = None  # the official recipe this task follows (attnbench/train/official.py): the dry
    # run prints each setting beside the official value and its source, and lists every deviation

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.data.dataset not in TASK_DATASETS[self.task]:
            raise ValueError(f"data.dataset {self.data.dataset!r} does not fit task {self.task!r}; "
                             f"use {' or '.join(TASK_DATASETS[self.task])}")
        check_recipe_keys(self.recipe, self.task, "recipe")
        if self.official is not None:
            from ..train.official import OFFICIAL_RECIPES

            if self.official not in OFFICIAL_RECIPES:
                raise ValueError(f"official: unknown recipe {self.official!r}; known: {', '.join(OFFICIAL_RECIPES)}")
        return self


def check_recipe_keys(recipe: dict[str, Any], task: str, field: str) -> None:
    unknown = sorted(set(recipe) - set(RECIPE_KEYS[task]))
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {', '.join(unknown)} for {task}; "
                         f"allowed: {', '.join(RECIPE_KEYS[task])}")


class Axes(Strict):
    mechanism: list[MechanismSpec] | None = None
    shape: list[ShapeSpec] | None = None
    model: list[ModelSpec] | None = None
    image_size: list[int] | None = None
    task: list[TaskSpec] | None = None
    seed: list[int] | None = None  # repeat every case with each seed (accuracy: seeds of a mean and its CI)
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

    @field_validator("*")
    @classmethod
    def _not_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("an axis needs at least one value (an empty list would make no cases)")
        return value

    def given(self) -> dict[str, list]:
        return {axis: getattr(self, axis) for axis in AXES if getattr(self, axis) is not None}


class Gate(Strict):
    """A check the report makes before it presents an accuracy sweep as a ranking (written in the suite, so
    before the measurement): the mean over seeds of ``label``'s ``metric`` (``top1``, ``miou``, or a distance
    bin such as ``far``) is ``at_least`` a value, or within ``within_chance`` points of chance."""

    label: str
    metric: str = "top1"
    at_least: float | None = None
    within_chance: float | None = Field(None, ge=0)
    why: str = ""

    @model_validator(mode="after")
    def _one_rule(self) -> Gate:
        if (self.at_least is None) == (self.within_chance is None):
            raise ValueError("a gate needs exactly one of at_least, within_chance")
        return self


# what an accuracy suite writes before its measurements and its report judges them by: run.json keeps those a run
# started with (a resume or a merge that would change them is refused)
RULES = ("gates", "hypotheses")


class Hypothesis(Strict):
    """A comparison an accuracy suite declares before its runs, its primary question: the mean over seeds of
    ``higher``'s ``metric`` exceeds ``lower``'s. The report tests the declared hypotheses as their own family (Welch
    t-test, Holm over these alone), so a question asked in advance keeps its power; the table of every pair stays
    exploratory (Holm over all the pairs)."""

    higher: str
    lower: str
    metric: str = "top1"
    why: str = ""

    @model_validator(mode="after")
    def _two_rows(self) -> Hypothesis:
        if self.higher == self.lower:
            raise ValueError(f"a hypothesis compares two rows, got {self.higher!r} twice")
        return self


class SuiteSettings(Strict):
    description: str = ""
    # sentences every report of the suite prints under its description: what the suite leaves out, and why
    notes: list[str] = []
    imports: list[str] = []  # modules imported before building mechanisms (third-party registrations)
    device: Device = "auto"
    measures: list[str] = ["params", "flops", "memory", "latency"]
    repeats: RepeatsSpec = RepeatsSpec()
    timeout_s: float = Field(600.0, gt=0)
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    check_correctness: bool = True
    baseline: str | None = None  # a row label: the report adds a speed-up table (baseline latency ÷ row latency)
    # --executor slurm: the jobs' resources (attnbench/executors.py SlurmOptions: partition, time_min, nodes,
    # gpus_per_node, tasks_per_node, cpus_per_task, mem_gb, account, qos, constraint, additional)
    slurm: dict[str, Any] = {}
    gates: list[Gate] = []  # accuracy suites: what must hold before the results are a ranking
    hypotheses: list[Hypothesis] = []  # accuracy suites: the comparisons declared before the runs
    # model suites: autocast (bfloat16 on CPU, float16 on CUDA), channels-last tensors, torch.compile of the model
    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @field_validator("measures")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        return _registered_measures(value)


class Profile(Strict):
    """A partial suite merged over the base: every field optional, lists replace, mappings merge."""

    description: str | None = None
    device: Device | None = None
    measures: list[str] | None = None
    repeats: dict[str, Any] | None = None
    timeout_s: float | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1)
    check_correctness: bool | None = None
    baseline: str | None = None
    slurm: dict[str, Any] | None = None
    gates: list[Gate] | None = None
    hypotheses: list[Hypothesis] | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    grid: Axes | None = None
    zip: list[Axes] | None = None

    @field_validator("measures")
    @classmethod
    def _registered(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _registered_measures(value)


class Suite(SuiteSettings):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # one folder name of the results directory
    grid: Axes
    zip: list[Axes] = []
    profiles: dict[str, Profile] = {}
    _cases: list | None = PrivateAttr(None)  # the expansion, computed once (attnbench/suite/expand.py)
    _selection: dict = PrivateAttr(default_factory=dict)  # how --only / --shard narrowed it (for run.json)

    def run_info(self) -> dict[str, Any]:
        """What run.json records of how this suite was narrowed (the shard, and every case id of the whole suite,
        so ``attnbench merge`` can tell which cases no shard ran), its rules (gates, hypotheses) and its notes."""
        rules = {key: [rule.model_dump() for rule in getattr(self, key)] for key in RULES if getattr(self, key)}
        return {**self._selection, **rules, **({"notes": self.notes} if self.notes else {})}


