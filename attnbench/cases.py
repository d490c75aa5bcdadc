"""Cases: one measurement each, typed by kind, from the suite's expansion to the report's cell.

* ``AttentionCase``: one mechanism (registry name and options) on a (B, H, W, C) feature map.
* ``ModelCase``: one whole model (timm name and options) on (B, 3, image_size, image_size) images.
* ``AccuracyCase``: one model trained on one task (attnbench/train), then scored and measured.

A case crosses the process boundary as JSON (``model_dump``) and is rebuilt in the worker with
``parse_case``; nothing downstream reads it through string keys. Its ``id`` hashes what the measurement
depends on (labels, timeouts and the suite's name are left out), in the form the first records used, so the
ids of committed runs stay valid.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Repeats(BaseModel):
    """How long and how often a case is timed (attnbench/measure/latency.py): at least ``min_samples`` samples
    and ``min_run_time_s`` seconds, then until IQR / median < ``target_iqr`` or ``max_time_s`` is spent."""

    model_config = ConfigDict(extra="forbid")

    warmup_iters: int = Field(3, ge=0)
    warmup_time_s: float = Field(0.2, ge=0)
    min_samples: int = Field(10, ge=1)
    max_samples: int = Field(100, ge=1)
    min_run_time_s: float = Field(0.2, ge=0)
    max_time_s: float = Field(5.0, gt=0)
    target_iqr: float = Field(0.10, gt=0)  # stop once IQR / median is below this


class CaseBase(BaseModel):
    """What every kind shares: how it runs and what it measures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str  # the report's row
    batch: int
    dtype: str
    mode: str
    device: str
    measures: tuple[str, ...]
    repeats: Repeats = Repeats()
    threads: int | None = None
    seed: int = 0
    check_correctness: bool = True
    timeout_s: float = 600.0
    imports: tuple[str, ...] = ()
    suite: str = ""
    id: str = ""

    @property
    def column(self) -> str:
        """The report's column: a shape's name, an input size, a task's name."""
        raise NotImplementedError

    @property
    def group(self) -> tuple[str, str, str, int]:
        """Cases of one table share device, dtype, mode and batch."""
        return (self.device, self.dtype, self.mode, self.batch)

    def _legacy(self) -> dict[str, Any]:
        """The flat form of the first records (kind-specific fields filled in by each kind)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the measurement depends on; its hash is the id."""
        flat = {"batch": self.batch, "dtype": self.dtype, "mode": self.mode, "device": self.device,
                "measures": list(self.measures), "repeats": self.repeats.model_dump(exclude_unset=True),
                "threads": self.threads,
                "seed": self.seed, "check_correctness": self.check_correctness, "imports": list(self.imports),
                **self._legacy()}
        return json.loads(json.dumps(flat, sort_keys=True, default=str))

    @property
    def key(self) -> str:
        """What two runs must share for their figures of this case to be compared (``attnbench compare``):
        the identity less how it was measured (repeats, measures, correctness check, imports)."""
        measured = {k: v for k, v in self.identity().items()
                    if k not in ("repeats", "measures", "check_correctness", "imports")}
        return hashlib.sha1(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:16]

    def with_id(self) -> Case:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        return self.model_copy(update={"id": digest})

    def describe(self) -> str:
        """One line for progress and dry runs."""
        return f"{self.label} @ {self.column} b{self.batch} {self.dtype} {self.mode} {self.device}"


class AttentionCase(CaseBase):
    kind: Literal["attention"] = "attention"
    mechanism: str
    options: dict[str, Any] = {}
    source: str | None = None  # the upstream config the options follow
    shape: str  # the shape's name
    height: int
    width: int
    dim: int
    heads: int

    @property
    def column(self) -> str:
        return self.shape

    def _legacy(self) -> dict[str, Any]:
        return {"kind": "attention", "mechanism": self.mechanism, "options": self.options, "height": self.height,
                "width": self.width, "dim": self.dim, "heads": self.heads, "task": None}

    def describe(self) -> str:
        return (f"{self.label} @ {self.shape} ({self.height}x{self.width}, C={self.dim}, heads={self.heads}) "
                f"b{self.batch} {self.dtype} {self.mode} {self.device} {json.dumps(self.options, sort_keys=True)}")


class ModelCase(CaseBase):
    kind: Literal["model"] = "model"
    model: str  # a timm name (attnbench's models included)
    options: dict[str, Any] = {}
    source: str | None = None
    image_size: int
    in_chans: int = 3
    paper: str | None = None  # the model's row in attnbench/paper_figures.yaml
    amp: bool = False  # autocast: bfloat16 on CPU, float16 on CUDA
    channels_last: bool = False
    compile: bool = False  # torch.compile of the whole model

    @property
    def column(self) -> str:
        return f"{self.image_size}px"

    def _legacy(self) -> dict[str, Any]:
        runtime = {name: True for name in ("amp", "channels_last", "compile") if getattr(self, name)}
        return {"kind": "model", "mechanism": self.model, "options": self.options, "height": self.image_size,
                "width": self.image_size, "dim": self.in_chans, "heads": 0, "task": None, **runtime}


class AccuracyCase(CaseBase):
    kind: Literal["accuracy"] = "accuracy"
    model: str
    options: dict[str, Any] = {}  # the model's options merged with the task's model_options
    source: str | None = None
    task: dict[str, Any]  # the suite's TaskSpec, dumped: name, task, image_size, data, train, recipe
    paper: str | None = None

    @property
    def column(self) -> str:
        return self.task["name"]

    @property
    def image_size(self) -> int:
        return self.task["image_size"]

    def _legacy(self) -> dict[str, Any]:
        return {"kind": "accuracy", "mechanism": self.model, "options": self.options, "height": self.image_size,
                "width": self.image_size, "dim": 3, "heads": 0, "task": self.task}


Case = Annotated[AttentionCase | ModelCase | AccuracyCase, Field(discriminator="kind")]
_CASE = TypeAdapter(Case)


def parse_case(data: dict[str, Any]) -> Case:
    """A case from its JSON form (``model_dump(mode="json")``), validated."""
    return _CASE.validate_python(data)


def case_from_legacy(flat: dict[str, Any]) -> Case:
    """A case from the flat dict the first records stored (schema 1), keeping its id."""
    common = {key: flat[key] for key in ("label", "batch", "dtype", "mode", "device", "repeats", "threads", "seed",
                                         "check_correctness", "timeout_s", "suite", "id") if key in flat}
    common.update(measures=tuple(flat.get("measures", ())), imports=tuple(flat.get("imports", ())))
    kind = flat.get("kind", "attention")
    if kind == "attention":
        return AttentionCase(mechanism=flat["mechanism"], options=flat["options"], shape=flat["shape"],
                             height=flat["height"], width=flat["width"], dim=flat["dim"], heads=flat["heads"],
                             **common)
    if kind == "model":
        return ModelCase(model=flat["mechanism"], options=flat["options"], image_size=flat["height"],
                         in_chans=flat["dim"], paper=flat.get("paper"), **common)
    return AccuracyCase(model=flat["mechanism"], options=flat["options"], task=flat["task"], paper=flat.get("paper"),
                        **common)
