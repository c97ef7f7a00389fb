"""Checkpoints shared by the trainer and the evaluator: atomic writes, safe loads, and the model they rebuild.

A checkpoint is one ``dict`` saved with :func:`torch.save`. Keys (the contract every reader relies on):

- ``model_name`` (registry name) and ``model_kwargs`` (the keyword arguments of :func:`model.build_model`:
  ``num_classes``, ``in_channels``, ``clip`` as a list (T, H, W), ``batch_norm``, ``dropout``), ``model_state``;
- ``optimizer_state``, ``scheduler_state``, ``epoch`` (number of completed epochs);
- ``config``: the run's :class:`model.train.TrainConfig` as a plain dict (``input``, ``split``, ``shard_dir``,
  ``crop``, ``clip_len``, ...);
- ``normalization``: ``{"mean": [3 floats], "std": [3 floats]}`` on the 0..255 scale, applied to every input;
- ``classes`` (list of class names, index = label), ``metrics`` (dict), ``rng_state`` (see :func:`capture_rng_state`);
- ``schema``: the training shards' schema (:class:`pipeline.store.Schema` as a dict: decoding, flow algorithm and
  parameters, flow image bound, storage), so ``asym3d predict`` makes a video's input as the shards were made.
  Checkpoints written before it lack it; nothing but predict and features needs it.

Everything is stored as tensors, numbers, strings, lists and dicts so that :func:`load_checkpoint` can use
``torch.load(weights_only=True)``: a checkpoint downloaded from elsewhere cannot run pickled code.
"""
from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import Asym3dError
from pipeline.store import StoreError, link_atomic, write_bytes_atomic

REQUIRED_KEYS = ("model_name", "model_kwargs", "model_state", "epoch", "config", "normalization", "classes")


class CheckpointError(Asym3dError):
    """A checkpoint that is missing, unreadable, or not an asym3d checkpoint; the message names the file."""


def save_checkpoint(path: Path | str, state: dict[str, Any], *, also: Path | str | None = None) -> None:
    """Write ``state`` to ``path`` under a temporary name, then rename: a crash, a full disk or a read-only
    filesystem never leaves a truncated file, and the previous ``path`` stays as it was. ``also``, when given,
    becomes a second name for the same file once ``path`` is written (a hard link: the trainer's best.pt and
    last.pt of an improving epoch are one write of hundreds of MB, not two).

    Serialised in memory first: ``torch.save`` reports a failed write as an opaque RuntimeError ("unexpected
    pos"), while a plain file write names the reason. Raises :class:`CheckpointError` naming the file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    target = Path(path)
    try:
        write_bytes_atomic(target, buffer.getbuffer())
        if also is not None:
            target = Path(also)
            link_atomic(path, target)
    except StoreError as err:
        raise CheckpointError(f"{err}; the previous {target.name} is unchanged") from None


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``; :class:`CheckpointError` names the path on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"{path}: not an asym3d checkpoint (missing {', '.join(missing)})")
    return state


def build_model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The network a checkpoint describes, with its weights loaded (CPU, train mode; call ``.eval()`` to test)."""
    from model import build_model  # the registry imports this package's siblings; import late to avoid a cycle

    kwargs = dict(state["model_kwargs"])
    kwargs["clip"] = tuple(kwargs["clip"])
    try:
        net = build_model(state["model_name"], **kwargs)
        net.load_state_dict(state["model_state"])
    except (RuntimeError, TypeError, ValueError) as exc:  # settings edited or from another version than the weights
        reason = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(f"a {state['model_name']} checkpoint whose settings {kwargs} do not fit its weights "
                              f"({reason})") from None
    return net


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states in a form ``weights_only`` loading accepts."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`, so dropout draws after a resume are the ones the uninterrupted run made."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
