"""The epoch loop shared by classification and segmentation: AdamW, warm-up + cosine (or poly) schedule per
step, AMP on CUDA, DistributedDataParallel under torchrun, a checkpoint after every epoch and resume from it.

Determinism: every epoch re-seeds Python, NumPy and torch from (seed, epoch) and shuffles with a sampler
seeded the same way, so an epoch's batches and augmentations depend on nothing but the seed and the epoch;
with the model, optimiser and schedule restored from a checkpoint, a resumed run continues exactly as the
uninterrupted one would have (tested on CPU).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from .distributed import World
from .task import Task

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    """The recipe. Defaults follow timm's / BiFormer's ImageNet recipe where a demo has no reason to differ."""

    epochs: int = 300
    batch_size: int = 128  # per process
    eval_batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    schedule: str = "cosine"  # or "poly" (power 1.0, segmentation)
    clip_grad: float | None = None
    amp: bool = True  # CUDA only: bfloat16 autocast where supported, else float16 with a grad scaler
    workers: int = 0
    seed: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # torch seeds each worker from the loader's generator
    random.seed(seed)
    np.random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 10_007 + epoch


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


class CheckpointError(OSError):
    """A checkpoint that cannot be written or read; the message names the file."""


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint to a temporary sibling and rename it over ``path``: a failure (a full disk) leaves
    the previous checkpoint as it was and no partial file."""
    temporary = path.with_suffix(".tmp")
    try:
        torch.save(state, temporary)
        temporary.replace(path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as a RuntimeError
        temporary.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write the checkpoint ({error}); the previous one is intact") from None


def _load(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``; a CheckpointError naming the file if it cannot be read."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "scaler", "epoch"} <= set(state):
            raise ValueError("not a checkpoint written by attnbench")
        return state
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error}); delete it to train "
                              "this case from the start") from None


def _loggable(entry: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, number) pairs of an epoch's entry for the log line: its numbers and the bins of a nested
    per-distance accuracy (the rest of a nested figure goes to the record only)."""
    for key, value in entry.items():
        if isinstance(value, int | float) and key != "epoch":
            yield key, value
        elif isinstance(value, dict) and isinstance(value.get("bins"), dict):
            yield from value["bins"].items()


def train_and_evaluate(task: Task, settings: TrainSettings, world: World, checkpoint_dir: Path | None,
                       log=print) -> dict[str, Any]:
    """Train ``task`` for ``settings.epochs``, evaluating after every epoch; resume from ``checkpoint_dir``.

    Returns the history (one entry per epoch: train loss, learning rate, the task's metrics) and the model.
    """
    device = world.device
    seed_everything(settings.seed)
    model = task.build_model().to(device)
    trained = model
    if world.size > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    dataset = task.train
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                                  seed=settings.seed, drop_last=True)
    steps_per_epoch = len(dataset) // (world.size * settings.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"{task.name}: {len(dataset)} training images cannot fill one batch of "
                         f"{settings.batch_size} on each of {world.size} process(es)")
    optimizer = create_optimizer_v2(model, "adamw", lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = CosineLRScheduler if settings.schedule == "cosine" else PolyLRScheduler
    extra = {"power": 1.0} if settings.schedule == "poly" else {}
    scheduler = schedule(optimizer, t_initial=settings.epochs * steps_per_epoch, lr_min=settings.min_lr,
                         warmup_t=math.ceil(settings.warmup_epochs * steps_per_epoch),
                         warmup_lr_init=settings.warmup_lr, t_in_epochs=False, **extra)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and settings.amp
                                  and not torch.cuda.is_bf16_supported())
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    path = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and path.exists():
        state = _load(path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        log(f"{task.name}: resumed after epoch {state['epoch'] + 1} from {path}")
    for epoch in range(start_epoch, settings.epochs):
        started = time.time()
        seed_everything(_epoch_seed(settings.seed, epoch))
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=True,
                            num_workers=settings.workers, worker_init_fn=_worker_init,
                            generator=torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch)),
                            persistent_workers=False)
        trained.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, batches)
        for batch in loader:
            scheduler.step_update(num_updates=step)
            with _autocast(device, settings.amp):
                loss = task.loss(trained, batch, device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{task.name}: training loss is {loss.item()} at step {step}")
        world.all_reduce_sum(loss_sum)
        with _autocast(device, settings.amp):
            metrics = task.evaluate(model, world)
        entry = {"epoch": epoch + 1, "train_loss": (loss_sum[0] / loss_sum[1]).item(),
                 "lr": optimizer.param_groups[0]["lr"], **metrics}
        history.append(entry)
        log(f"{task.name}: epoch {epoch + 1}/{settings.epochs} "
            + " ".join(f"{key} {value:.4g}" for key, value in _loggable(entry))
            + f" ({time.time() - started:.0f} s)")
        if path is not None and world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(path, {"epoch": epoch, "step": step, "history": history, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict()})
        world.barrier()
    return {"history": history, "model": model, "steps_per_epoch": steps_per_epoch}
