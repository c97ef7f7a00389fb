"""``asym3d features``: C3D-style clip features of a trained run, one vector per window and one per video.

The convention that captioning, localisation and anomaly-detection work builds on (C3D's fc6/fc7 over 16-frame
windows every 8 frames): each video is cut into windows of the run's clip length starting every ``stride`` frames
(a video shorter than one window gives one, looping, as :func:`model.clips.clip_indices` does), each window seen
through the centre crop or the mean of the paper's 10 crops, and the chosen layer's output kept: ``fc6``/``fc7``
after their ReLU, ``pool5`` flattened. The video's vector is the mean of its windows'. Scoring is
:func:`model.evaluate.score_clips` with each window as one "video", so the views, precision and normalisation are the
evaluator's; frames come from video files (made as :mod:`model.predict` makes them) or from training shards.

Output, one HDF5 file: ``videos/NNNNN`` groups with attributes ``video_id`` and ``source`` and datasets ``starts``
(window start frames), ``windows`` (n, D) and ``mean`` (D,), float32, each with HDF5's fletcher32 checksum (read
back with :func:`read_features`); the file's ``asym3d_features`` attribute is the configuration that made it.

Resumable, one writer: while a run goes on, each finished video is written atomically to ``FILE.parts/`` (locked by
:class:`pipeline.lock.DirectoryLock`); a rerun skips the videos in ``FILE`` and in the parts, and the end of a run
merges them into ``FILE`` (written under a temporary name, then renamed). A file made with another configuration is
refused, not mixed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
import torch

from pipeline.errors import Asym3dError, ConfigError
from pipeline.lock import DirectoryLock
from pipeline.store import StoreError, atomic_output, os_reason

from .clips import clip_indices
from .evaluate import checkpoint_views, score_clips
from .predict import Run

FEATURE_LAYERS = {"fc6": "fc6", "fc7": "fc7", "pool5": "features.pool5"}  # --layer -> the module hooked
FORMAT = 1


class FeatureError(Asym3dError):
    """An output file of another configuration, or one that cannot be read; the message names the file."""


def window_starts(n_frames: int, clip_len: int, stride: int) -> np.ndarray:
    """First frames of the windows: 0, stride, 2 stride, ... while a whole window fits (at least one window)."""
    if stride < 1:
        raise ConfigError(f"--stride must be at least 1, got {stride}")
    return np.arange(0, max(n_frames - clip_len, 0) + 1, stride, dtype=np.int64)


def video_features(run: Run, frames: np.ndarray, *, layer: str, stride: int, crops: int, batch_size: int = 30,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(starts (n,), windows (n, D) float32)`` of one video's input frames (uint8 ``(T, H, W, 3)``)."""
    spec = checkpoint_views(run.state, 1, crops)
    starts = window_starts(len(frames), spec.clip_len, stride)
    clip = torch.arange(spec.clip_len).unsqueeze(0)
    items = ({"position": i, "frames": torch.from_numpy(frames[clip_indices(len(frames), int(s), spec.clip_len)]),
              "clips": clip} for i, s in enumerate(starts))
    scored = score_clips(run.net, items, spec, len(starts), batch_size=batch_size, device=device, progress=False,
                         feature_layer=FEATURE_LAYERS[layer],
                         precision=run.state.get("config", {}).get("precision", "auto"))
    return starts, scored.features.reshape(len(starts), -1)


def identity(run: Run, layer: str, stride: int, crops: int) -> dict[str, Any]:
    """What a feature file's numbers depend on; a rerun into the file must match it."""
    state = run.state
    return {"format": FORMAT, "checkpoint": str(Path(run.origin).resolve()), "model": state["model_name"],
            "epoch": state["epoch"], "input": run.recipe.modality, "layer": layer, "stride": stride,
            "crops": crops, "clip_len": checkpoint_views(state, 1, crops).clip_len}


@dataclass
class FeatureSummary:
    out: Path
    done_before: int
    computed: int
    failures: list[str] = field(default_factory=list)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _stored_ids(path: Path, wanted: dict[str, Any]) -> set[str]:
    """Video ids already in a feature file (or part) of configuration ``wanted``; another one is refused."""
    try:
        with h5py.File(path, "r") as f:
            have = json.loads(f.attrs["asym3d_features"])
            ids = {str(g.attrs["video_id"]) for g in f["videos"].values()}
    except (OSError, KeyError, ValueError) as exc:
        raise FeatureError(f"{path}: not a readable asym3d feature file ({os_reason(exc)})") from None
    if have != wanted:
        diff = ", ".join(f"{k} {have.get(k)!r} (asked: {wanted[k]!r})" for k in wanted if have.get(k) != wanted[k])
        raise FeatureError(f"{path}: holds features of another configuration ({diff}); use another --out")
    return ids


def _write_video(group: h5py.Group, video_id: str, source: str, starts: np.ndarray, windows: np.ndarray) -> None:
    group.attrs.update(video_id=video_id, source=source)
    mean = windows.astype(np.float64).mean(axis=0).astype(np.float32)
    for name, data in (("starts", starts), ("windows", windows.astype(np.float32)), ("mean", mean)):
        group.create_dataset(name, data=data, fletcher32=True, chunks=data.shape)


def _part_name(video_id: str) -> str:
    return hashlib.sha1(video_id.encode()).hexdigest()[:20] + ".h5"


def extract_features(run: Run, sources: Sequence[tuple[str, str, Callable[[], np.ndarray]]], out: Path, *,
                     layer: str = "fc6", stride: int = 8, crops: int = 1, batch_size: int = 30, device: str = "cpu",
                     on_failure: Callable[[str], None] = lambda line: None) -> FeatureSummary:
    """Features of every ``(video id, source, frames())`` not yet in ``out``; see the module docstring.

    ``frames()`` gives the video's input frames or raises the project's error (or ValueError) for a video that
    cannot be used: that video is reported through ``on_failure`` (one line) and the others go on.
    """
    if layer not in FEATURE_LAYERS:
        raise ConfigError(f"--layer must be one of {', '.join(FEATURE_LAYERS)}, got {layer!r}")
    wanted = json.loads(json.dumps(identity(run, layer, stride, crops)))
    done = _stored_ids(out, wanted) if out.exists() else set()  # refused before anything is created
    before = len(done)
    parts = parts_dir(out)
    summary = FeatureSummary(out, before, 0)
    with DirectoryLock(parts):
        for part in sorted(parts.glob("*.h5")):
            done |= _stored_ids(part, wanted)
        summary.done_before = len(done)
        for video_id, source, frames_of in sources:
            if video_id in done:
                continue
            try:
                starts, windows = video_features(run, frames_of(), layer=layer, stride=stride, crops=crops,
                                                 batch_size=batch_size, device=device)
            except (Asym3dError, ValueError) as err:
                text = str(err)
                summary.failures.append(text if text.startswith(source) else f"{source}: {text}")
                on_failure(summary.failures[-1])
                continue
            with atomic_output(parts / _part_name(video_id)) as tmp, h5py.File(tmp, "w") as f:
                f.attrs["asym3d_features"] = json.dumps(wanted)
                _write_video(f.create_group("videos").create_group("00000"), video_id, source, starts, windows)
            done.add(video_id)
            summary.computed += 1
        _merge(out, sorted(parts.glob("*.h5")), wanted)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _merge(out: Path, parts: list[Path], wanted: dict[str, Any]) -> None:
    """``out``'s videos and the parts' into a new ``out``, renamed into place; then the parts are deleted. A video
    in both (a run killed after its merge, before deleting its parts) is copied once."""
    if not parts and out.exists():
        return
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as merged:
        merged.attrs["asym3d_features"] = json.dumps(wanted)
        videos = merged.create_group("videos")
        seen: set[str] = set()
        for path in ([out] if out.exists() else []) + parts:
            with h5py.File(path, "r") as source:
                for group in source["videos"].values():
                    if str(group.attrs["video_id"]) not in seen:
                        seen.add(str(group.attrs["video_id"]))
                        source.copy(group, videos, name=f"{len(videos):05d}")
    for part in parts:
        part.unlink()


def video_sources(run: Run, videos: Sequence[Path], flow_backend_name: str = "auto", device: str = "cpu"
                  ) -> list[tuple[str, str, Callable[[], np.ndarray]]]:
    """``(id, source, frames())`` of video files, the input made as :mod:`model.predict` makes it; the id is the
    path as given."""
    from .predict import VideoInputs, flow_backend

    backends = {}
    if run.recipe.modality != "rgb":
        backends[run.recipe.identity()] = flow_backend(run.recipe, flow_backend_name,
                                                       None if device == "cpu" else device, run.origin)
    return [(str(video), str(video), lambda video=video: VideoInputs(video, backends).frames(run.recipe))
            for video in videos]


def shard_sources(run: Run, shard_dir: Path) -> list[tuple[str, str, Callable[[], np.ndarray]]]:
    """``(id, source, frames())`` of every video stored in training shards, the run's input field read whole."""
    from pipeline.store import ShardSet

    shards = ShardSet(shard_dir)
    modality = run.recipe.modality
    shards.schema.field(modality)  # shards without the run's input are one line, before any work
    return [(video.video_id, video.source or video.video_id,
             lambda video=video: shards.read(video, modality)) for video in shards.videos]


@dataclass(frozen=True)
class VideoFeatures:
    video_id: str
    source: str
    starts: np.ndarray
    windows: np.ndarray
    mean: np.ndarray


def read_features(path: Path | str) -> Iterator[VideoFeatures]:
    """The videos of a feature file, checksums checked (a damaged one is a one-line :class:`FeatureError`)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for group in f["videos"].values():
                yield VideoFeatures(str(group.attrs["video_id"]), str(group.attrs["source"]), group["starts"][()],
                                    group["windows"][()], group["mean"][()])
    except (OSError, KeyError) as exc:
        raise FeatureError(f"{path}: unreadable feature file ({os_reason(exc)})") from None


def check_writable(out: Path) -> None:
    """``--out`` must name a file in an existing directory (checked before any work)."""
    if out.is_dir():
        raise StoreError(f"{out}: is a directory; --out names the .h5 file to write")
    if not out.parent.is_dir():
        raise StoreError(f"{out.parent}: no such directory for --out")
