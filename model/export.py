"""``asym3d export``: a run's network as TorchScript or ONNX, checked against PyTorch before it is written.

The exported model maps normalised views ``(N, 3, T, S, S)`` float32 (input ``views``; any N) to logits
``(N, classes)`` (output ``logits``), the network of :mod:`model.networks` in eval mode. What it needs around it
travels inside the file as JSON (``asym3d.json``: TorchScript extra file, ONNX metadata): classes, normalisation
(mean/std on the 0..255 scale, per channel), clip (T, S, S), the input modality and the shards' schema that says how
frames were made (:mod:`model.predict` makes them; the views are :class:`model.clips.ViewProtocol`'s).

The check: views of real clips (``--check VIDEO``: each video's input made as predict makes it, 2 clips x 10 crops),
or seeded random views when none are given (said so), run through PyTorch and through the exported file (loaded
back; ONNX through onnxruntime's CPU provider), with another batch size than the one traced, so the batch axis is
shown to be dynamic. The largest absolute difference of the logits and of the softmax probabilities is printed, and
a difference above :data:`BOUNDS` (relative to the largest logit) stops the export before the file is renamed into
place. The bounds are the measured differences with a margin (BENCHMARKS.md, "export").

ONNX needs the optional extra (``pip install 'asym3d[onnx]'``: onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.errors import Asym3dError, ConfigError
from pipeline.store import atomic_output

from .checkpoint import build_model_from_checkpoint
from .clips import protocol_frames
from .evaluate import checkpoint_views

EXPORT_FORMATS = ("torchscript", "onnx")
# Largest |exported - PyTorch| logit allowed, relative to max(1, largest |logit|); see the module docstring.
BOUNDS = {"torchscript": 1e-6, "onnx": 1e-4}
TRACE_BATCH = 2  # the batch the model is traced/exported with; the check uses another
ONNX_EXTRA = "pip install 'asym3d[onnx]' (onnx, onnxruntime, onnxscript)"


class ExportError(Asym3dError):
    """An export that cannot be made or does not match PyTorch; the message names the file or the missing extra."""


@dataclass
class ExportSummary:
    out: Path
    format: str
    views: int
    videos: int  # real clips checked; 0: random views
    logit_diff: float
    prob_diff: float
    bound: float


def check_format(fmt: str) -> None:
    """Refuse an unknown format, or ONNX without its extra, before any work (one line naming the install)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ExportError(f"--format onnx needs {exc.name}: {ONNX_EXTRA}") from None


def metadata(state: dict[str, Any]) -> str:
    """What a user of the exported file needs to feed it (see the module docstring), as JSON."""
    spec = checkpoint_views(state, 1, 1)
    return json.dumps({"model": state["model_name"], "classes": list(state["classes"]),
                       "input": spec.modality, "clip": [spec.clip_len, spec.crop_size, spec.crop_size],
                       "normalization": state["normalization"], "schema": state.get("schema"),
                       "inputs": "views (N, 3, T, S, S) float32, (x - mean) / std per channel; outputs logits (N, K)"})


def check_views(state: dict[str, Any], frames: Sequence[np.ndarray]) -> torch.Tensor:
    """2 clips x 10 crops of each video's input frames, as the evaluator makes them; seeded random views if none."""
    spec = checkpoint_views(state, 2, 10)
    if not frames:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(10, 3, spec.clip_len, spec.crop_size, spec.crop_size, generator=generator)
    views = []
    for video in frames:
        index, clips = protocol_frames(len(video), spec.clip_len, spec.num_clips)
        views.append(spec.views(torch.from_numpy(np.ascontiguousarray(video[index]))[torch.from_numpy(clips)]))
    return torch.cat(views).contiguous()


def _torchscript(net: nn.Module, example: torch.Tensor, path: Path, meta: str) -> Any:
    with warnings.catch_warnings():  # torch 2.13 marks torch.jit deprecated; TorchScript is what users asked for
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(path), _extra_files={"asym3d.json": meta})
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x).numpy()


def _onnx(net: nn.Module, example: torch.Tensor, path: Path, meta: str) -> Any:
    import onnx
    import onnxruntime

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=["views"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False)
    model = onnx.load(str(path))
    model.metadata_props.add(key="asym3d.json", value=meta)
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"views": x.numpy()})[0]


def export_run(state: dict[str, Any], fmt: str, out: Path, frames: Sequence[np.ndarray] = ()) -> ExportSummary:
    """Export a loaded checkpoint to ``out`` (written only once it matches PyTorch; see the module docstring)."""
    check_format(fmt)
    net = build_model_from_checkpoint(state).eval()
    views = check_views(state, frames)
    example = views[:TRACE_BATCH]
    with torch.inference_mode():
        reference = net(views).numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    with atomic_output(out) as tmp:
        with torch.no_grad():
            run = (_torchscript if fmt == "torchscript" else _onnx)(net, example, tmp, metadata(state))
            exported = run(views)
        logit_diff = float(np.abs(exported - reference).max())
        probabilities = [torch.from_numpy(np.asarray(x)).softmax(dim=1).numpy() for x in (exported, reference)]
        prob_diff = float(np.abs(probabilities[0] - probabilities[1]).max())
        bound = BOUNDS[fmt] * scale
        if not logit_diff <= bound:
            raise ExportError(f"{out}: the exported model differs from PyTorch by {logit_diff:.3g} in the logits "
                              f"(bound {bound:.3g}); not written")
    return ExportSummary(out, fmt, len(views), len(frames), logit_diff, prob_diff, bound)
