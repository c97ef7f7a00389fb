"""``asym3d predict``: a trained run on any video, scored with the paper's test protocol, several runs fused.

A run's input is made from a video exactly as its training shards were made, by the same library functions:
decoding (:func:`pipeline.decode.decode_video` at the shards' size, frame rate and frame cap), optical flow (the
shards' algorithm and parameters, :mod:`pipeline.flow`), the flow stored as extract-flow stores it (int16 hundredths
of a pixel), the flow image or RGBF of :func:`pipeline.rgbf.training_frames` with the shards' bound and frame
pairing, and finally the frames stored and read back as the shards store them (JPEG at their quality and chroma
subsampling, or lossless). The views and the scoring are :mod:`model.evaluate`'s (:func:`model.evaluate.score_clips`),
so a video's scores equal ``asym3d evaluate``'s for the same video read from the shards (tests/test_predict.py).

What the shards were is the ``schema`` every checkpoint written by ``asym3d train`` carries, so predict needs no
shards. A checkpoint from before that has none; predict then says so in one line, and ``--shards DIR`` reads the
schema from the training shards' ``dataset.json`` instead.

Several runs (an RGB and an RGBF run, as ``evaluate --fuse``) are fused by the weighted mean of their per-video
scores. Each video is decoded once per distinct decoding and its flow computed once per distinct flow, whatever the
number of runs; a video that cannot be used (not a video, too short for flow) fails alone, with its reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.datasets import VIDEO_EXTENSIONS
from pipeline.decode import DecodeConfig, decode_video
from pipeline.errors import Asym3dError
from pipeline.extract import FLOW_FIELD
from pipeline.flow import backend_metadata, make_backend
from pipeline.rgbf import paired_flow_index, training_frames
from pipeline.store import FieldSpec, Schema, StoreError, load_dataset_meta, stored_values
from pipeline.tvl1_params import TVL1Params

from .checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
from .clips import ViewProtocol, protocol_frames
from .evaluate import checkpoint_views, score_clips
from .fusion import fusion_weights
from .runs import split_dir

SCHEMA_PARTS = "decoding, flow algorithm and parameters, flow image bound, storage"


class PredictError(Asym3dError):
    """A run predict cannot use (no checkpoint, no schema, runs that disagree); the message names the file."""


# ------------------------------------------------------------------------------------------------ making the input


@dataclass(frozen=True)
class InputRecipe:
    """How a run's training shards made its input from a video (read from their schema; see the module docstring).

    ``flow`` is the flow's identity as extract-flow records it (``algorithm``, ``is_tvl1``, ``params``); extract-flow
    stores flow only as :data:`pipeline.extract.FLOW_FIELD` (it is not an option), which ``flow_field`` is.
    """

    modality: str
    decode: DecodeConfig
    flow: dict[str, Any]
    bound: float
    field: FieldSpec
    flow_field: FieldSpec = FLOW_FIELD

    @classmethod
    def from_schema(cls, schema: dict[str, Any], modality: str, origin: str) -> "InputRecipe":
        try:
            parsed = Schema.from_dict(schema)
            source = parsed.config["source"]
            decode = DecodeConfig(**source["decode"])
            return cls(modality, decode, source["flow"], float(parsed.config["flow_image"]["bound"]),
                       parsed.field(modality))
        except (KeyError, TypeError, ValueError, StoreError) as exc:
            raise PredictError(f"{origin}: its shards' schema does not say how they were made ({exc!r}); "
                               "it needs the schema build-rgbf writes") from None

    def identity(self) -> str:
        """The decoding and flow this input depends on: runs that share it share the decoded video and its flow."""
        return json.dumps([self.decode.__dict__, self.flow], sort_keys=True, default=str)


class VideoInputs:
    """One video's inputs for several runs: decoded once per decoding, flow computed once per flow."""

    def __init__(self, path: Path, backends: dict[str, Any]):
        self.path = path
        self.backends = backends  # InputRecipe.identity() -> flow backend
        self._decoded: dict[str, np.ndarray] = {}
        self._flow: dict[str, np.ndarray] = {}

    def frames(self, recipe: InputRecipe) -> np.ndarray:
        """The video as ``recipe``'s shards hold it: uint8 ``(T, H, W, 3)``."""
        key = json.dumps(recipe.decode.__dict__, sort_keys=True, default=str)
        if key not in self._decoded:
            self._decoded[key] = decode_video(self.path, recipe.decode)
        rgb = self._decoded[key]
        if recipe.modality == "rgb":
            return stored_values(recipe.field, rgb)
        identity = recipe.identity()
        if identity not in self._flow:
            if len(rgb) < 2:
                raise PredictError(f"{self.path}: {len(rgb)} frame; optical flow needs at least 2")
            self._flow[identity] = stored_values(recipe.flow_field, self.backends[identity].compute(rgb))
        flow = self._flow[identity][paired_flow_index(len(rgb))]
        made = training_frames(rgb, flow, (recipe.modality,), recipe.bound)[recipe.modality]
        return stored_values(recipe.field, made)


def protocol_item(frames: np.ndarray, spec: ViewProtocol) -> dict[str, Any]:
    """A video's frames as the evaluator's dataset item (:class:`model.evaluate.ClipViews`): the distinct frames
    its test clips use and the clips as positions into them."""
    index, clips = protocol_frames(len(frames), spec.clip_len, spec.num_clips)
    return {"position": 0, "frames": torch.from_numpy(np.ascontiguousarray(frames[index])),
            "clips": torch.from_numpy(clips)}


def flow_backend(recipe: InputRecipe, backend: str, device: str | None, origin: str) -> Any:
    """The backend that computes ``recipe``'s flow: ``backend`` (a TV-L1 one) for a TV-L1 run, the recorded
    algorithm otherwise; refused when it would not compute the recorded algorithm with the recorded parameters."""
    flow = recipe.flow
    if flow.get("is_tvl1"):
        try:
            made = make_backend(backend, TVL1Params(**flow["params"]), device=device)
        except TypeError as exc:
            raise PredictError(f"{origin}: its flow parameters are not this asym3d's TV-L1 parameters ({exc})") \
                from None
    else:
        made = make_backend(flow["algorithm"])
    have = json.loads(json.dumps(backend_metadata(made)))
    if have != json.loads(json.dumps(flow)):
        raise PredictError(f"{origin}: its shards' flow was {flow}; this asym3d computes {have}")
    return made


# ------------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """A loaded checkpoint ready to score videos."""

    origin: str
    state: dict[str, Any]
    recipe: InputRecipe
    net: nn.Module = field(repr=False)

    @property
    def classes(self) -> list[str]:
        return list(self.state["classes"])


def resolve_run(path: Path, split: int = 1, choice: str = "best") -> Path:
    """A checkpoint file, or a run directory's checkpoint of split ``split`` in either layout train writes (read from
    run.json by :func:`model.runs.split_dir`, as evaluate reads it: a single-split run of another split is refused)."""
    if path.is_file():
        return path
    candidate = split_dir(path, split) / f"{choice}.pt"
    if not candidate.is_file():
        raise PredictError(f"{path}: no checkpoint {candidate}")
    return candidate


def is_run(path: Path) -> bool:
    """Whether a command-line path names a run (a checkpoint or a directory holding them) rather than videos."""
    if path.is_file():
        return path.suffix == ".pt"
    return path.is_dir() and (any(path.glob("*.pt")) or any(path.glob("split*/*.pt")))


def load_run(path: Path, *, split: int = 1, choice: str = "best", shards: Path | None = None) -> Run:
    """Load a run for prediction; :class:`PredictError` names what is missing (an older checkpoint's schema)."""
    checkpoint = resolve_run(path, split, choice)
    state = load_checkpoint(checkpoint)
    modality = state.get("config", {}).get("input", "rgb")
    if shards is not None:
        schema = load_dataset_meta(shards)["schema"]
    elif "schema" in state:
        schema = state["schema"]
    else:
        raise PredictError(f"{checkpoint}: written before checkpoints carried their shards' schema ({SCHEMA_PARTS}); "
                           "pass --shards with the training shards it was trained on")
    recipe = InputRecipe.from_schema(schema, modality, str(checkpoint))
    try:
        net = build_model_from_checkpoint(state).eval()
    except CheckpointError as err:
        raise CheckpointError(f"{checkpoint}: {err}") from None
    return Run(str(checkpoint), state, recipe, net)


# ------------------------------------------------------------------------------------------------ prediction


@dataclass
class Prediction:
    """One video's fused scores (mean softmax over its views, weighted over runs), or why it failed."""

    video: str
    scores: np.ndarray | None = None  # (K,) float32
    views: int = 0  # views per run
    error: str | None = None

    def top(self, classes: Sequence[str], k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [(classes[i], float(self.scores[i])) for i in order]


def find_videos(paths: Sequence[Path]) -> list[Path]:
    """Files as given; directories walked (sorted) for files with a video extension."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        else:
            found.append(path)
    return found


def check_runs(runs: Sequence[Run], weights: Sequence[float] | None) -> list[float]:
    """Runs fused together must name the same classes; returns one weight per run."""
    for run in runs[1:]:
        if run.classes != runs[0].classes:
            raise PredictError(f"{run.origin}: other classes than {runs[0].origin}; runs fused must share them")
    return fusion_weights(weights, len(runs))


def predict_videos(runs: Sequence[Run], videos: Sequence[Path], *, clips: int = 25, crops: int = 10,
                   weights: Sequence[float] | None = None, batch_size: int = 30, device: str = "cpu",
                   flow_backend_name: str = "auto") -> Iterator[Prediction]:
    """Yield each video's :class:`Prediction`, in order, as soon as it is scored (see the module docstring).

    A video that fails (decoding, too short for flow) yields a Prediction with ``error`` and the rest go on; the
    project's own errors and ValueError (OpenCV and the flow backends refuse unusable frames with one) count as
    the video's; anything else is a bug and propagates.
    """
    weights = check_runs(runs, weights)
    specs = [checkpoint_views(run.state, clips, crops) for run in runs]
    backends: dict[str, Any] = {}
    for run in runs:
        if run.recipe.modality != "rgb" and run.recipe.identity() not in backends:
            backends[run.recipe.identity()] = flow_backend(run.recipe, flow_backend_name, None if device == "cpu"
                                                           else device, run.origin)
    for video in videos:
        inputs = VideoInputs(video, backends)
        try:
            fused = np.zeros(len(runs[0].classes), np.float64)
            for run, spec, weight in zip(runs, specs, weights):
                item = protocol_item(inputs.frames(run.recipe), spec)
                scored = score_clips(run.net, [item], spec, 1, batch_size=batch_size, device=device,
                                     progress=False, precision=run.state.get("config", {}).get("precision", "auto"))
                fused += weight * scored.scores[0]
        except (Asym3dError, ValueError) as err:
            text = str(err)
            yield Prediction(str(video), error=text if text.startswith(str(video)) else f"{video}: {text}")
            continue
        yield Prediction(str(video), (fused / sum(weights)).astype(np.float32), int(scored.views[0]))
