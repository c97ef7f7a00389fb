"""Check a ``--device`` option before any work starts, so a typo or a missing GPU is one line, not a traceback
from deep inside torch after the output directory was created."""
from __future__ import annotations

from pipeline.errors import ConfigError


def check_device(option: str) -> str:
    """Return ``option`` when it names a device torch can use here: ``cpu``, ``cuda`` or ``cuda:N``.

    Raises :class:`ConfigError` for anything else (``--device bogus``, ``cuda`` without a GPU, ``cuda:3`` on a
    machine with two GPUs).
    """
    import torch  # imported here: the CLI starts without torch

    try:
        device = torch.device(option)
    except RuntimeError:
        raise ConfigError(f"--device {option!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return option
    if device.type != "cuda":
        raise ConfigError(f"--device {option!r}: asym3d runs on cpu or cuda, not {device.type}")
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(f"--device {option}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {option}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return option
