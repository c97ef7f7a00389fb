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
- ``digest``: a hash of everything above (:func:`state_digest`), added by :func:`save_checkpoint`.

Everything is stored as tensors, numbers, strings, lists and dicts so that :func:`load_checkpoint` can use
``torch.load(weights_only=True)``: a checkpoint downloaded from elsewhere cannot run pickled code.

Integrity: ``torch.load`` checks neither the zip archive's CRC-32s nor anything else, so a flipped bit in a tensor's
bytes loads as a wrong weight. :func:`load_checkpoint` checks both the CRCs (naming the damaged member) and the stored
digest against what was loaded: a bit flipped in the archive's directory can make torch skip a tensor's bytes while
every CRC still holds (a "directory" attribute on its entry left it uninitialised). Flipping bit 0 of each of the
2,085 bytes of a small checkpoint, 159 flips loaded as other values with neither check; with the CRCs alone, one of
the flips of bit 4 still did (that directory flag); with both, none does (tests/test_checkpoint_integrity.py flips
a bit of every byte). The digest also names the checkpoint in an evaluation report's identity. Checkpoints saved
before digests load with the CRC check alone.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import random
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import Asym3dError
from pipeline.store import StoreError, link_atomic, write_bytes_atomic

CHECKPOINT_CHOICES = ("best", "last")  # a run's checkpoints by name: RUN/[splitN/]best.pt, last.pt
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
    torch.save({**state, "digest": state_digest(state)}, buffer)
    target = Path(path)
    try:
        write_bytes_atomic(target, buffer.getbuffer())
        if also is not None:
            target = Path(also)
            link_atomic(path, target)
    except StoreError as err:
        raise CheckpointError(f"{err}; the previous {target.name} is unchanged") from None


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``, its zip CRCs and stored digest checked (see the
    module docstring); :class:`CheckpointError` names the path on failure, damage included. The returned state's
    ``digest`` is always set (computed for a checkpoint saved before digests)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"{path}: not an asym3d checkpoint (missing {', '.join(missing)})")
    stored = state.pop("digest", None)
    state["digest"] = state_digest(state)
    if stored is not None and stored != state["digest"]:
        raise CheckpointError(f"{path}: damaged: what loads differs from the digest stored in it (a flipped bit or "
                              "a bad copy); restore the file or retrain")
    return state


def state_digest(state: dict[str, Any]) -> str:
    """BLAKE2b-128 of a checkpoint's contents (every key but ``digest``): tensors by dtype, shape and bytes; numbers,
    strings and containers by type and value, in order. The same state gives the same digest after a save and load.
    """
    h = hashlib.blake2b(digest_size=16)

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            flat = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for key, value in obj.items():
                walk(key)
                walk(value)
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__}{len(obj)}".encode())
            for item in obj:
                walk(item)
        else:
            h.update(repr((type(obj).__name__, obj)).encode())

    walk({key: value for key, value in state.items() if key != "digest"})
    return h.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Read every member of the checkpoint's zip archive against its CRC-32; :class:`CheckpointError` naming the file
    when one differs or the archive's structure is broken (a text file, a truncated copy)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
            struct.error, zlib.error) as exc:  # what zipfile raises on a damaged archive (the bit-flip test meets them)
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: {damaged} fails its CRC-32 check (a flipped bit or a bad copy); "
                              "restore the file or retrain")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
