"""The paper's test protocol (§4.3) and ``asym3d evaluate``'s run over splits (metrics: :mod:`model.results`; report
files: :mod:`model.reports`).

Protocol: each test video gives ``clips`` (25) 16-frame clips at equal intervals; each clip gives ``crops`` (10)
112x112 views -- centre and four corners, each also mirrored (flow images mirrored with u negated) -- and the video's
score is the mean of the 250 views' softmax scores. Sampling, crops and flips come from :mod:`model.clips`, the code
the trainer uses, so training and test views cannot drift apart.

Memory is bounded whatever the video length: a dataset item is one clip of one video (its ``clip_len`` frames read
with ``ShardSet.read(index=...)``), expanded into its crop views on the network's device, so at most ``batch_size``
views and a few clips per loader worker are held at a time; scores are accumulated per video as the batches go by.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.lock import DirectoryLock
from pipeline.store import DamagedError, ShardSet, VideoEntry

from .checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
from .clips import clip_indices, crop_positions, evenly_spaced_starts, protocol_views
from .data import check_shard_identity, collate_readable, open_training_shards
from .reports import check_report_identity, write_reports
from .results import EvaluationError, SplitResult
from .runs import split_dir
from .runtime import Runtime, resolve_device

CROP_CHOICES = (1, 10)


# ---------------------------------------------------------------------------------------------------- protocol


class ClipViews(Dataset):
    """Item ``i`` = one clip of one video -> ``{"position": video position, "clip": uint8 (T, H, W, C) whole-frame}``,
    or ``{"unreadable": (video id, reason)}`` when its stored frames fail their checksum: a DataLoader worker would
    wrap the exception in its traceback, so the reason travels as data and :func:`score_videos` raises it.

    Its ``V`` views (1: the centre crop; 10: centre + 4 corners, each also mirrored) are made on the device the
    network runs on (:meth:`views`), from one uint8 clip: a tenth of the bytes of ten float views, and no per-pixel
    work on the host. Pickles without open HDF5 handles (see :class:`ShardSet`), so DataLoader workers each open their
    own.
    """

    def __init__(self, shards: ShardSet, videos: Sequence[VideoEntry], field_name: str, *, clip_len: int,
                 num_clips: int, crop_size: int, crops: int, mean: Sequence[float], std: Sequence[float]):
        if crops not in CROP_CHOICES:
            raise ConfigError(f"crops must be one of {CROP_CHOICES}, got {crops}")
        if num_clips < 1:
            raise ConfigError(f"need at least one clip per video, got {num_clips}")
        self.shards, self.field_name = shards, field_name
        self.clip_len, self.crop_size, self.crops = clip_len, crop_size, crops
        self.mean, self.std = list(mean), list(std)
        self.videos = list(videos)
        self.items: list[tuple[int, int]] = []
        for position, video in enumerate(self.videos):
            length = shards.field_length(video, field_name)
            self.items += [(position, int(s)) for s in evenly_spaced_starts(length, clip_len, num_clips)]
        schema = shards.schema
        self.positions = crop_positions(schema.height, schema.width, crop_size)[:1 if crops == 1 else None]
        self.views_per_clip = len(self.positions) * (2 if crops == 10 else 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        position, start = self.items[i]
        video = self.videos[position]
        index = clip_indices(self.shards.field_length(video, self.field_name), start, self.clip_len)
        try:
            return {"position": position,
                    "clip": torch.from_numpy(self.shards.read(video, self.field_name, index=index))}
        except DamagedError as err:
            return {"unreadable": (video.video_id, str(err))}

    def views(self, clips: torch.Tensor) -> torch.Tensor:
        """The views of a batch of clips ``(N, T, H, W, C)`` uint8, on their device: ``(N * V, C, T, S, S)``."""
        mean, std = (torch.tensor(v, dtype=torch.float32, device=clips.device) for v in (self.mean, self.std))
        return protocol_views(clips, self.positions, self.crop_size, self.crops == 10, self.field_name, mean, std)


@dataclass
class VideoScores:
    """Per-video means over views: softmax ``scores`` (N, K), ``views`` counted (N,), optional ``features`` (N, D)."""

    scores: np.ndarray
    views: np.ndarray
    features: np.ndarray | None = None


def score_videos(model: nn.Module, views: ClipViews, *, batch_size: int = 30, device: str | torch.device = "cpu",
                 workers: int = 0, progress: bool = True, desc: str = "evaluate",
                 feature_layer: str | None = None, precision: str = "auto") -> VideoScores:
    """Mean softmax scores of ``model`` over the views of each video of ``views``.

    Batches hold ``max(1, batch_size // V)`` clips (``V`` views each) and may span videos, so a GPU sees full
    batches. Runs under ``torch.inference_mode`` with the training's precision policy (:mod:`model.runtime`: bf16
    autocast on a GPU that has it); softmax is taken in float32.
    ``feature_layer`` (e.g. "fc6") also averages that layer's ReLU output per video, as C3D's "net + linear SVM"
    protocol uses it.
    """
    runtime = Runtime.choose(device, precision)
    device = runtime.device
    loader = DataLoader(views, batch_size=max(1, batch_size // views.views_per_clip), shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_readable)
    model = runtime.prepare(model).eval()
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(len(views.videos), dtype=torch.int64)
    captured: list[torch.Tensor] = []
    hook = None
    if feature_layer:
        hook = model.get_submodule(feature_layer).register_forward_hook(
            lambda module, args, output: captured.append(torch.relu(output.float())))
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            if batch["unreadable"]:  # a test video cannot be skipped without changing the result: stop
                raise EvaluationError(f"{batch['unreadable'][0][1]}; asym3d inspect SHARD_DIR --verify lists the "
                                      "damaged shards, and --repair on the command that built them redoes them")
            positions, clips = batch["position"], batch["clip"]
            n_clips, n_views = len(clips), views.views_per_clip
            inputs = runtime.inputs(views.views(clips.to(device, non_blocking=True)))
            with runtime.autocast():
                logits = model(inputs)
            outputs = {"scores": logits.float().softmax(dim=1)}
            if captured:
                outputs["features"] = captured.pop()
            for key, value in outputs.items():
                per_clip = value.view(n_clips, n_views, -1).sum(dim=1).cpu().double()
                if key not in sums:
                    sums[key] = torch.zeros(len(views.videos), per_clip.shape[1], dtype=torch.float64)
                sums[key].index_add_(0, positions, per_clip)
            counts.index_add_(0, positions, torch.full_like(positions, n_views))
    if hook is not None:
        hook.remove()
    if not sums:
        raise EvaluationError("no videos to evaluate")
    mean = {key: (total / counts.clamp(min=1).unsqueeze(1)).float().numpy() for key, total in sums.items()}
    return VideoScores(mean["scores"], counts.numpy(), mean.get("features"))


def evaluate_split(checkpoint: str | Path | dict[str, Any], shards: ShardSet | str | Path, split: int, *,
                   clips: int = 25, crops: int = 10, batch_size: int = 30, device: str | None = None,
                   workers: int = 0, progress: bool = True, model: nn.Module | None = None,
                   feature_layer: str | None = None) -> SplitResult:
    """Scores of one checkpoint on split ``split``'s test videos under the paper's protocol (§4.3).

    ``checkpoint`` is a path or an already loaded checkpoint dict (see :mod:`model.checkpoint`); the input field
    (rgb/flow/rgbf), clip length, crop size and normalisation come from it, so evaluation sees what training saw.
    ``model`` may pass the network already built from that checkpoint (e.g. with hooks attached);
    ``feature_layer`` (e.g. "fc6") also keeps per-video mean features of that layer (see :func:`score_videos`).
    Raises :class:`EvaluationError` when the checkpoint was trained on another split, or the shards hold none of
    the split's test videos or other classes.
    """
    device = resolve_device(device or "auto")
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(Path(checkpoint))
    origin = str(checkpoint) if not isinstance(checkpoint, dict) else "(in memory)"
    shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    config = state.get("config", {})
    modality = config.get("input", "rgb")
    videos = check_split(state, shards, split, origin)
    clip = state["model_kwargs"]["clip"]
    views = ClipViews(shards, videos, modality, clip_len=int(config.get("clip_len", clip[0])), num_clips=clips,
                      crop_size=int(config.get("crop", clip[1])), crops=crops,
                      mean=state["normalization"]["mean"], std=state["normalization"]["std"])
    net = model if model is not None else build_model_from_checkpoint(state)
    scored = score_videos(net, views, batch_size=batch_size, device=device, workers=workers,
                          precision=config.get("precision", "auto"),
                          progress=progress, desc=f"split {split}", feature_layer=feature_layer)
    return SplitResult(split=split, video_ids=[v.video_id for v in videos],
                       labels=np.array([v.label for v in videos], np.int64), scores=scored.scores,
                       classes=list(state.get("classes") or shards.classes), views=scored.views,
                       features=scored.features,
                       source={"checkpoint": origin, "model": state.get("model_name"), "input": modality,
                               "epoch": state.get("epoch"), "shards": str(shards.root)},
                       absent=absent_videos(shards))


def check_split(state: dict[str, Any], shards: ShardSet, split: int, origin: str | Path) -> list[VideoEntry]:
    """Split ``split``'s test videos in ``shards``, after refusing a checkpoint trained on another split (it would
    score videos it was trained on), shards without its input field, or other classes; :class:`EvaluationError`
    naming ``origin`` (the checkpoint's file) otherwise."""
    config = state.get("config", {})
    trained_on = config.get("split")
    if isinstance(trained_on, int) and trained_on != split:
        raise EvaluationError(f"{origin}: trained on split {trained_on}; testing it on split {split} would score "
                              "videos it was trained on")
    modality = config.get("input", "rgb")
    if modality not in shards.schema.field_names:
        raise EvaluationError(f"{shards.root}: holds no {modality!r} field for checkpoint {origin} "
                              f"(it holds: {', '.join(shards.schema.field_names)})")
    if state.get("classes") and shards.classes and list(state["classes"]) != shards.classes:
        raise EvaluationError(f"{origin}: trained on other classes than {shards.root} holds "
                              f"({len(state['classes'])} vs {len(shards.classes)} classes)")
    videos = shards.split_videos(split, "test")
    if not videos:
        raise EvaluationError(f"{shards.root}: none of split {split}'s test videos are in these shards "
                              f"({len(shards)} videos stored)")
    return videos


def absent_videos(shards: ShardSet) -> list[str]:
    """Video ids the shards' plan names but that are not stored (failed or not yet written)."""
    return [vid for ids in shards.plan for vid in ids if vid not in shards]


# ---------------------------------------------------------------------------------------------------- runs


def resolve_checkpoint(run_dir: Path, split: int, choice: str) -> Path:
    """``best``/``last`` -> that checkpoint of split ``split`` in either run layout (:func:`model.runs.split_dir`);
    anything else is a path. Missing -> EvaluationError."""
    path = split_dir(run_dir, split) / f"{choice}.pt" if choice in ("best", "last") else Path(choice)
    if not path.is_file():
        raise EvaluationError(f"{path}: no checkpoint for split {split}")
    return path


# what evaluation needs of a checkpoint: the optimiser and generator states are left out of memory
_EVALUATION_KEYS = ("model_name", "model_kwargs", "model_state", "epoch", "config", "normalization", "classes",
                    "shards", "digest")


def run_shards(state: dict[str, Any], path: Path, shard_dir: Path | None) -> ShardSet:
    """The training shards a checkpoint is tested on: ``shard_dir`` (``--shards``) or the ones it was trained on,
    gated as training gates them (:func:`model.data.open_training_shards`: training shards holding its input as
    3-channel images) and checked against the identity the run recorded (:func:`model.data.check_shard_identity`).
    A checkpoint from before identities that names a relative path is refused: the path meant the directory train
    ran in, which is unknown."""
    config = state.get("config", {})
    expected = state.get("shards") or {}
    root = Path(shard_dir or expected.get("path") or config.get("shard_dir", ""))
    if shard_dir is None and not root.is_absolute():
        raise EvaluationError(f"{path}: trained on the relative shard path {str(root)!r}, relative to wherever "
                              "train ran; pass --shards")
    if shard_dir is None and not root.is_dir():
        raise EvaluationError(f"{path}: its shard directory {root} does not exist (pass --shards)")
    shards = open_training_shards(root, config.get("input", "rgb"))
    check_shard_identity(shards, expected, path)
    return shards


def evaluate_run(run_dir: Path, splits: Sequence[int], *, checkpoints: Sequence[str] = ("best",),
                 shard_dir: Path | None = None, out: Path | None = None, clips: int = 25, crops: int = 10,
                 batch_size: int = 30, device: str | None = None, workers: int = 0, progress: bool = True,
                 feature_layer: str | None = None) -> dict[str, Any]:
    """``asym3d evaluate RUN_DIR``: every split's checkpoint on its test list, reports in ``out`` (RUN_DIR/eval).

    ``checkpoints`` is one choice for every split or one per split (``best``, ``last`` or a path); ``run_dir`` may
    have either layout train writes (:mod:`model.runs`). Everything is checked before anything is created: the
    options, every checkpoint (located and verified), its shards (``shard_dir``, default the ones it was trained on:
    gated and identity-checked, see :func:`run_shards`) and the report's identity (the splits, each checkpoint's
    choice, epoch and digest, the protocol), which a report already in ``out`` must share. The report directory is
    then locked for the whole evaluation. Returns the summary (see :func:`summarize`).
    """
    if len(checkpoints) not in (1, len(splits)):
        raise EvaluationError(f"give one checkpoint for all splits or one per split ({len(splits)}), "
                              f"got {len(checkpoints)}")
    if crops not in CROP_CHOICES or clips < 1:
        raise ConfigError(f"crops must be one of {CROP_CHOICES} and clips at least 1, got {crops} and {clips}")
    device = str(resolve_device(device or "auto"))
    choices = list(checkpoints) * len(splits) if len(checkpoints) == 1 else list(checkpoints)
    paths = [resolve_checkpoint(run_dir, s, c) for s, c in zip(splits, choices)]
    states, shard_sets = [], []
    for split, path in zip(splits, paths):
        state = load_checkpoint(path)
        states.append({key: state[key] for key in _EVALUATION_KEYS if key in state})
        del state
        shard_sets.append(run_shards(states[-1], path, shard_dir))
        check_split(states[-1], shard_sets[-1], split, path)
    identity = {"splits": list(splits),
                "checkpoints": [{"choice": c, "epoch": s["epoch"], "digest": s["digest"]}
                                for c, s in zip(choices, states)],
                "clips": clips, "crops": crops, "shards": str(Path(shard_dir).resolve()) if shard_dir else None}
    out = out or Path(run_dir) / "eval"
    check_report_identity(out, identity)
    with DirectoryLock(out):
        check_report_identity(out, identity)  # again: another evaluation may have written it since
        results = []
        for split, path, choice, state, shards in zip(splits, paths, choices, states, shard_sets):
            try:
                result = evaluate_split(state, shards, split, clips=clips, crops=crops, batch_size=batch_size,
                                        device=device, workers=workers, progress=progress,
                                        feature_layer=feature_layer)
            except CheckpointError as err:  # the checkpoint was passed as loaded, so name its file here
                raise CheckpointError(f"{path}: {err}") from None
            result.source.update(checkpoint=str(path), choice=choice, digest=state["digest"])
            results.append(result)
        for shards in shard_sets:
            shards.close()
        return write_reports(results, out, title=str(run_dir), identity=identity)
