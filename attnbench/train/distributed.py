"""Single-process or ``torchrun`` multi-process training: the process group, samplers and reductions.

Under ``torchrun`` (RANK, WORLD_SIZE and LOCAL_RANK in the environment) the process group is initialised with
NCCL on CUDA and gloo on CPU, each rank takes the GPU of its LOCAL_RANK, and only rank 0 logs and writes files.
Without it everything runs in this process as a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (a no-op for a world of one)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> World:
    """The world of this process: from torchrun's environment, or a world of one on ``device``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + world, r + 2·world, ... (no padding, no duplicates, so
    summed counts are exact)."""

    def __init__(self, length: int, world: World) -> None:
        self.indices = list(range(world.rank, length, world.size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
