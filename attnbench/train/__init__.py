"""Training and evaluation for the accuracy suites: one case = one model trained on one task, then scored.

``run_accuracy_case`` is what the suite worker calls for a case of kind ``accuracy`` (and what
``python -m attnbench train`` calls in-process under ``torchrun``). It writes the data set first when the suite
asks for a generated one, trains with a checkpoint per epoch (a rerun resumes), and returns the metrics:
``accuracy`` (history and final scores, the data subset, the recipe), and the trained model's ``params``,
``flops`` and inference ``latency`` at the task's input size when the suite lists those measures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import models  # noqa: F401  (registers BiFormer's models with timm)
from ..data import prepare_data
from ..measure.flops import count_flops
from ..measure.latency import measure_latency
from ..measure.params import count_parameters
from .classification import ClassificationTask
from .distributed import World, init_world
from .engine import TrainSettings, train_and_evaluate
from .segmentation import SegmentationTask
from .task import Task

TASKS = {"classification": ClassificationTask, "segmentation": SegmentationTask}


def build_task(config: dict[str, Any]) -> Task:
    task, train = config["task"], config["task"]["train"]
    return TASKS[task["task"]](task["name"], config["mechanism"], dict(config["options"]), task["data"],
                               task["image_size"], train["eval_batch_size"], train["workers"], task.get("recipe"))


def _inference_measures(model: torch.nn.Module, task: Any, world: World, config: dict[str, Any]) -> dict[str, Any]:
    model.eval()
    batch = config["task"]["train"]["eval_batch_size"]
    metrics: dict[str, Any] = {}
    x = task.sample_input(batch).to(world.device)

    def forward():
        with torch.inference_mode():
            return model(x)
    if "params" in config["measures"]:
        metrics["params"] = count_parameters(model)
    if "flops" in config["measures"]:
        with torch.no_grad():
            counted = count_flops(lambda: model(x[:1]))
        # records count FLOPs per case batch (the training batch here); reports divide by it again
        metrics["flops"] = {"counted_flops": counted.flops * config["batch"], "counted_by_op": counted.by_op,
                            "uncounted_ops": counted.uncounted_ops}
    if "latency" in config["measures"]:
        latency = measure_latency(forward, world.device, **config["repeats"])
        metrics["latency"] = {**latency.summary(), "images_per_s": batch / latency.median_s}
    return metrics


def run_accuracy_case(config: dict[str, Any], checkpoint_dir: str | Path | None, log=print) -> dict[str, Any]:
    """Train and score one (model, task) case; see the module docstring."""
    world = init_world(config["device"])
    data = config["task"]["data"]
    if world.is_main:
        prepare_data(data)
    world.barrier()
    task = build_task(config)
    train = config["task"]["train"]
    settings = TrainSettings(**train, seed=config["seed"])
    started = time.time()
    outcome = train_and_evaluate(task, settings, world, Path(checkpoint_dir) if checkpoint_dir else None, log)
    final = outcome["history"][-1] if outcome["history"] else {}
    accuracy = {
        "task": config["task"]["task"], "dataset": data["dataset"], "proxy": data["dataset"] == "relation_proxy",
        "final": {key: value for key, value in final.items() if key not in ("epoch", "lr")},
        "history": outcome["history"], "data": task.description(), "world_size": world.size,
        "steps_per_epoch": outcome["steps_per_epoch"], "train_seconds": time.time() - started,
    }
    metrics = {"accuracy": accuracy}
    if world.is_main:
        metrics.update(_inference_measures(outcome["model"], task, world, config))
    return metrics
