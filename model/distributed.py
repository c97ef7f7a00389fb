"""One process or many: torchrun's environment, the process group (NCCL on CUDA, gloo on CPU) and sums across ranks.

Kept apart from the training loop so that the loop reads the same with one process or eight.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .runtime import resolve_device


@dataclass(frozen=True)
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the process that reports."""
    return torchrun_world()[0] == 0


@contextmanager
def process_group(device_option: str) -> Iterator[None]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) unless alone or already joined."""
    _, world, local_rank = torchrun_world()
    if world == 1 or dist.is_initialized():
        yield
        return
    device = resolve_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def sum_across(values: list[float], env: Env) -> list[float]:
    if env.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()
