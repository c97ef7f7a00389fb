"""How a network runs on its device: one precision policy and memory format for training and evaluation.

Why one place: training and evaluation must compute alike (a checkpoint evaluated as it was trained), and the GPU
path (bf16 autocast with channels_last_3d, what cuDNN's fast 3D kernels want) must also run on the CPU in the tests,
so that CI executes its Python even though it has no GPU (PyTorch autocasts to bf16 on the CPU too).

``device`` (train and evaluate take the same option, checked here before anything is written): ``auto`` = the
process's CUDA device when there is one, else the CPU; ``cpu``; ``cuda`` (under torchrun, each process's
LOCAL_RANK); ``cuda:N``.

``precision``: ``auto`` = bf16 on a CUDA device that supports it, float32 elsewhere (on a CPU without bf16 units it
would only be slower); ``bf16`` or ``fp32`` force one. Softmax, losses and metrics are always taken in float32.
Forced ``bf16`` on a CPU is for exercising the GPU path only: PyTorch's oneDNN bf16 conv3d weight gradient there is
nondeterministic and once in about 20 short runs returned values near 1e23 (BENCHMARKS.md, "bf16 on a CPU"); the
trainer then stops on the non-finite loss.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.devices import check_device as check_named_device

PRECISIONS = ("auto", "bf16", "fp32")
DEVICE_HELP = "auto (cuda when there is one, else cpu), cpu, cuda or cuda:N"


def check_device(option: str) -> str:
    """``option`` when it is ``auto`` or names a device torch can use here; :class:`ConfigError` otherwise."""
    return option if option == "auto" else check_named_device(option)


def resolve_device(option: str, local_rank: int = 0) -> torch.device:
    """The device ``option`` (see :func:`check_device`) means for the process of ``local_rank``."""
    if check_device(option) == "auto":
        option = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(option)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def device_memory(device: torch.device) -> int:
    """Bytes of memory on ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None runs in float32

    @classmethod
    def choose(cls, device: torch.device | str, precision: str = "auto") -> "Runtime":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        device = torch.device(device)
        bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        return cls(device, torch.bfloat16 if bf16 else None)

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last_3d with bf16 (the GPU path), contiguous with float32."""
        return torch.channels_last_3d if self.dtype is not None else torch.contiguous_format

    def prepare(self, net: nn.Module) -> nn.Module:
        return net.to(self.device, memory_format=self.memory_format)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format)

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
