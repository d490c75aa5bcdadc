"""The epoch loop shared by classification and segmentation: AdamW, warm-up + cosine (or poly) schedule per
step, AMP on CUDA, DistributedDataParallel under torchrun, a checkpoint after every epoch and resume from it.

The official recipes' pieces (attnbench/train/official.py lists each with its source): the linear learning-rate
scaling rule (``lr × total batch / lr_reference_batch``, DeiT's and BiFormer's ``main.py``), cool-down epochs at
``min_lr`` after the cosine, repeated augmentation (timm's ``RepeatAugSampler``: each image three times per epoch,
on three processes, as DeiT's ``RASampler``), an exponential moving average of the weights (timm's
``ModelEmaV3``, scored after the last epoch), SyncBatchNorm under DistributedDataParallel, and a length in
iterations (mmseg's ``IterBasedRunner``) with a warm-up in iterations.

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
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
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
    lr_reference_batch: int | None = None  # lr is for this total batch: scaled by batch_size × processes / this
    cooldown_epochs: int = 0  # epochs at min_lr after the cosine (timm's cooldown; BiFormer trains 300 + 10)
    iterations: int | None = None  # length in optimiser steps instead of epochs (the last pass stops early)
    warmup_iterations: int | None = None  # warm-up in steps (replaces warmup_epochs)
    repeated_augmentation: int = 1  # > 1: each image this many times per epoch (timm RepeatAugSampler)
    model_ema_decay: float | None = None  # keep an EMA of the weights with this decay; scored after training
    sync_bn: bool = False  # BatchNorm statistics over all processes (SyncBatchNorm) under DDP
    eval_interval: int = 1  # evaluate every this many epochs, and after the last

    def scaled_lr(self, world_size: int) -> float:
        """The peak learning rate of a run on ``world_size`` processes (the linear scaling rule, if asked)."""
        if self.lr_reference_batch is None:
            return self.lr
        return self.lr * self.batch_size * world_size / self.lr_reference_batch


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


def _train_sampler(dataset, world: World, settings: TrainSettings) -> torch.utils.data.Sampler:
    """Each process's share of an epoch: a seeded DistributedSampler, or with repeated augmentation timm's
    RepeatAugSampler (each image ``repeated_augmentation`` times, the copies on different processes; an epoch
    keeps ``len(dataset)`` rounded down to a multiple of 256 samples, as DeiT's RASampler, unless the data set is
    smaller than 256 per process)."""
    if settings.repeated_augmentation > 1:
        selected_round = 256 if len(dataset) >= 256 * world.size else 0
        return RepeatAugSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                num_repeats=settings.repeated_augmentation, selected_round=selected_round)
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                               seed=settings.seed, drop_last=True)


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

    Returns the history (one entry per epoch: train loss, learning rate, the task's metrics), the model, and the
    epochs after which this training resumed from a checkpoint (empty when it ran in one piece).
    """
    device = world.device
    seed_everything(settings.seed)
    model = task.build_model()
    if settings.sync_bn and world.size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    trained = model
    if world.size > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    ema = ModelEmaV3(model, decay=settings.model_ema_decay) if settings.model_ema_decay is not None else None
    dataset = task.train
    sampler = _train_sampler(dataset, world, settings)
    steps_per_epoch = len(sampler) // settings.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{task.name}: {len(dataset)} training images cannot fill one batch of "
                         f"{settings.batch_size} on each of {world.size} process(es)")
    schedule_steps = settings.iterations or settings.epochs * steps_per_epoch  # warm-up + cosine (or poly)
    schedule_epochs = math.ceil(schedule_steps / steps_per_epoch)
    epochs = schedule_epochs + settings.cooldown_epochs  # past the schedule the learning rate holds at min_lr
    optimizer = create_optimizer_v2(model, "adamw", lr=settings.scaled_lr(world.size),
                                    weight_decay=settings.weight_decay)
    schedule = CosineLRScheduler if settings.schedule == "cosine" else PolyLRScheduler
    extra = {"power": 1.0} if settings.schedule == "poly" else {}
    warmup_steps = settings.warmup_iterations if settings.warmup_iterations is not None else \
        math.ceil(settings.warmup_epochs * steps_per_epoch)
    scheduler = schedule(optimizer, t_initial=schedule_steps, lr_min=settings.min_lr, warmup_t=warmup_steps,
                         warmup_lr_init=settings.warmup_lr, t_in_epochs=False, **extra)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and settings.amp
                                  and not torch.cuda.is_bf16_supported())
    history: list[dict[str, Any]] = []
    resumes: list[int] = []  # the epochs after which a run resumed from its checkpoint (a record says so)
    start_epoch, step = 0, 0
    path = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and path.exists():
        state = _load(path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        resumes = [*state.get("resumes", []), state["epoch"] + 1]
        log(f"{task.name}: resumed after epoch {state['epoch'] + 1} from {path}")
    for epoch in range(start_epoch, epochs):
        started = time.time()
        seed_everything(_epoch_seed(settings.seed, epoch))
        sampler.set_epoch(_epoch_seed(settings.seed, epoch) if isinstance(sampler, RepeatAugSampler) else epoch)
        loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=True,
                            num_workers=settings.workers, worker_init_fn=_worker_init,
                            generator=torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch)),
                            persistent_workers=False)
        trained.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, batches)
        for batch in loader:
            if epoch < schedule_epochs and step == schedule_steps:  # a length in iterations ends inside a pass
                break
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
            if ema is not None:
                ema.update(model, step=step)
            step += 1
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{task.name}: training loss is {loss.item()} at step {step}")
        world.all_reduce_sum(loss_sum)
        last = epoch + 1 == epochs
        metrics: dict[str, Any] = {}
        if last or (epoch + 1) % settings.eval_interval == 0:
            with _autocast(device, settings.amp):
                metrics = task.evaluate(model, world)
                if last and ema is not None:
                    metrics["ema"] = task.evaluate(ema.module, world)
        entry = {"epoch": epoch + 1, "step": step, "train_loss": (loss_sum[0] / loss_sum[1]).item(),
                 "lr": optimizer.param_groups[0]["lr"], **metrics}
        history.append(entry)
        log(f"{task.name}: epoch {epoch + 1}/{epochs} "
            + " ".join(f"{key} {value:.4g}" for key, value in _loggable(entry))
            + f" ({time.time() - started:.0f} s)")
        if path is not None and world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(path, {"epoch": epoch, "step": step, "history": history, "resumes": resumes,
                         "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), **({"ema": ema.module.state_dict()} if ema else {})})
        world.barrier()
    return {"history": history, "model": model, "steps_per_epoch": steps_per_epoch, "resumed_after_epochs": resumes}
