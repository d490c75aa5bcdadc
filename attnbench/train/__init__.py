"""Training and evaluation for the accuracy suites: one case = one model trained on one task, then scored.

``run_accuracy_case`` is what the suite worker calls for a case of kind ``accuracy`` (and what
``python -m attnbench train`` calls in-process under ``torchrun``). It writes the data set first when the suite
asks for a generated one, trains with a checkpoint per epoch (a rerun resumes), and returns the metrics:
``accuracy`` (history and final scores, the data subset, the recipe), then the suite's other measures
(attnbench/measure/) on the trained model, in inference, at the task's input size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import models  # noqa: F401  (registers BiFormer's models with timm)
from ..cases import AccuracyCase
from ..data import prepare_data
from ..measure import Subject, measures_for
from ..measure.correctness import plain_copy
from .classification import ClassificationTask
from .distributed import World, init_world
from .engine import TrainSettings, train_and_evaluate
from .segmentation import SegmentationTask
from .task import Task

TASKS = {"classification": ClassificationTask, "segmentation": SegmentationTask}


def build_task(case: AccuracyCase) -> Task:
    task, train = case.task, case.task["train"]
    return TASKS[task["task"]](task["name"], case.model, dict(case.options), task["data"], task["image_size"],
                               train["eval_batch_size"], train["workers"], task.get("recipe"))


def _inference_measures(model: torch.nn.Module, task: Task, world: World, case: AccuracyCase) -> dict[str, Any]:
    """The suite's measures on the trained model: one inference forward over an evaluation batch (FLOPs on one
    image through the plain path)."""
    model.eval()
    x = task.sample_input(case.task["train"]["eval_batch_size"]).to(world.device)

    def forward():
        with torch.inference_mode():
            return model(x)
    def plain_forward_of_one_image():
        plain, one = plain_copy(model), x[:1]

        def plain_forward():
            with torch.no_grad():
                return plain(one)
        return plain_forward, 1
    subject = Subject(model, x, forward, world.device, case.kind, "forward", (task.image_size, task.image_size),
                      case.repeats.model_dump(), plain=plain_forward_of_one_image)
    return {measure.name: measure.measure(subject) for measure in measures_for(case.measures, case.kind)
            if measure.on_subject}


def run_accuracy_case(case: AccuracyCase, checkpoint_dir: str | Path | None, log=print) -> dict[str, Any]:
    """Train and score one (model, task) case; see the module docstring."""
    world = init_world(case.device)
    data = case.task["data"]
    if world.is_main:
        prepare_data(data)
    world.barrier()
    task = build_task(case)
    settings = TrainSettings(**case.task["train"], seed=case.seed)
    started = time.time()
    outcome = train_and_evaluate(task, settings, world, Path(checkpoint_dir) if checkpoint_dir else None, log)
    final = outcome["history"][-1] if outcome["history"] else {}
    accuracy = {
        "task": case.task["task"], "dataset": data["dataset"],
        "proxy": data["dataset"] in ("relation_proxy", "colour_pointer"),
        "final": {key: value for key, value in final.items() if key not in ("epoch", "lr")},
        "history": outcome["history"], "data": task.description(), "world_size": world.size,
        "steps_per_epoch": outcome["steps_per_epoch"], "train_seconds": time.time() - started,
        # train_seconds counts this process only: after a resume, the epochs before it ran elsewhere
        "resumed_after_epochs": outcome["resumed_after_epochs"],
    }
    metrics = {"accuracy": accuracy}
    if world.is_main:
        metrics.update(_inference_measures(outcome["model"], task, world, case))
    return metrics
