"""The paper's test protocol (§4.3) and ``asym3d evaluate``'s run over splits (metrics: :mod:`model.results`; report
files: :mod:`model.reports`).

Protocol: each test video gives ``clips`` (25) 16-frame clips at equal intervals; each clip gives ``crops`` (10)
112x112 views -- centre and four corners, each also mirrored (flow images mirrored with u negated) -- and the video's
score is the mean of the 250 views' softmax scores. Sampling, crops and flips come from :mod:`model.clips`, the code
the trainer uses, so training and test views cannot drift apart.

Each test video's frames are read once: a dataset item is one video, the distinct frames its clips use
(:func:`model.clips.protocol_frames`: at most ``clips x clip_len`` frames however long the video), and the clips are
cut from them by index on the network's device. Batches of ``batch_size`` views span videos, so memory is bounded by
one batch of views plus the few videos' frames in flight; scores are accumulated per video as the batches go by.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.lock import DirectoryLock
from pipeline.store import DamagedError, ShardSet, VideoEntry

from .checkpoint import CHECKPOINT_CHOICES, CheckpointError, build_model_from_checkpoint, load_checkpoint
from .clips import CROP_CHOICES, ViewProtocol, protocol_frames
from .data import check_shard_identity, open_training_shards
from .reports import check_report_identity, write_reports
from .results import EvaluationError, SplitResult
from .runs import split_dir
from .runtime import Runtime, resolve_device

# ---------------------------------------------------------------------------------------------------- protocol


class ClipViews(Dataset):
    """Item ``i`` = test video ``i`` -> ``{"position": i, "frames": uint8 (U, H, W, C), "clips": int64 (clips, T)}``
    (the distinct frames its clips use, read once, and each clip as positions into them: ``frames[clips[j]]``), or
    ``{"unreadable": (video id, reason)}`` when its stored frames fail their checksum: a DataLoader worker would
    wrap the exception in its traceback, so the reason travels as data and :func:`score_videos` raises it.

    The views (``spec``: crops, flips, normalisation) are made on the device the network runs on. Pickles without
    open HDF5 handles (see :class:`ShardSet`), so DataLoader workers each open their own.
    """

    def __init__(self, shards: ShardSet, videos: Sequence[VideoEntry], spec: ViewProtocol):
        self.shards, self.spec = shards, spec
        self.videos = list(videos)
        if spec.crop_size > min(shards.schema.height, shards.schema.width):
            raise ConfigError(f"{shards.root}: crop {spec.crop_size} does not fit the stored "
                              f"{shards.schema.height}x{shards.schema.width} frames")

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        video = self.videos[i]
        frames, clips = protocol_frames(self.shards.field_length(video, self.spec.modality), self.spec.clip_len,
                                        self.spec.num_clips)
        try:
            stored = self.shards.read(video, self.spec.modality, index=frames)
        except DamagedError as err:
            return {"unreadable": (video.video_id, str(err))}
        return {"position": i, "frames": torch.from_numpy(stored), "clips": torch.from_numpy(clips)}


@dataclass
class VideoScores:
    """Per-video means over views: softmax ``scores`` (N, K), ``views`` counted (N,), optional ``features`` (N, D)."""

    scores: np.ndarray
    views: np.ndarray
    features: np.ndarray | None = None


def score_videos(model: nn.Module, views: ClipViews, *, batch_size: int = 30, device: str | torch.device = "cpu",
                 workers: int = 0, progress: bool = True, desc: str = "evaluate",
                 feature_layer: str | None = None, precision: str = "auto") -> VideoScores:
    """Mean softmax scores of ``model`` over the views of each video of ``views``, read by ``workers`` DataLoader
    processes (0: this one); see :func:`score_clips` for the rest."""
    loader = DataLoader(views, batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    return score_clips(model, loader, views.spec, len(views), batch_size=batch_size, device=device,
                       progress=progress, desc=desc, feature_layer=feature_layer, precision=precision)


def score_clips(model: nn.Module, videos: Iterable[dict[str, Any]], spec: ViewProtocol, n_videos: int, *,
                batch_size: int = 30, device: str | torch.device = "cpu", progress: bool = True,
                desc: str = "evaluate", feature_layer: str | None = None, precision: str = "auto") -> VideoScores:
    """Mean softmax scores of ``model`` over the ``spec`` views of ``n_videos`` videos given as :class:`ClipViews`
    items (from shards, or from frames computed by ``asym3d predict``).

    Batches hold ``max(1, batch_size // V)`` clips (``V`` views each) and may span videos, so a GPU sees full
    batches. Runs under ``torch.inference_mode`` with the training's precision policy (:mod:`model.runtime`: bf16
    autocast on a GPU that has it); softmax is taken in float32.
    ``feature_layer`` (e.g. "fc6") also averages that layer's ReLU output per video, as C3D's "net + linear SVM"
    protocol uses it.
    """
    runtime = Runtime.choose(device, precision)
    device = runtime.device
    model = runtime.prepare(model).eval()
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(n_videos, dtype=torch.int64)
    captured: list[torch.Tensor] = []
    hook = None
    if feature_layer:
        hook = model.get_submodule(feature_layer).register_forward_hook(
            lambda module, args, output: captured.append(torch.relu(output.float())))
    videos = tqdm(videos, desc=desc, unit="video", total=n_videos, disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for positions, clips in clip_batches(videos, max(1, batch_size // spec.views_per_clip), device):
                n_clips, n_views = len(clips), spec.views_per_clip
                inputs = runtime.inputs(spec.views(clips))
                with runtime.autocast():
                    logits = model(inputs)
                outputs = {"scores": logits.float().softmax(dim=1)}
                if captured:
                    outputs["features"] = captured.pop()
                for key, value in outputs.items():
                    per_clip = value.view(n_clips, n_views, -1).sum(dim=1).cpu().double()
                    if key not in sums:
                        sums[key] = torch.zeros(n_videos, per_clip.shape[1], dtype=torch.float64)
                    sums[key].index_add_(0, positions, per_clip)
                counts.index_add_(0, positions, torch.full_like(positions, n_views))
    finally:
        if hook is not None:
            hook.remove()
    if not sums:
        raise EvaluationError("no videos to evaluate")
    mean = {key: (total / counts.clamp(min=1).unsqueeze(1)).float().numpy() for key, total in sums.items()}
    return VideoScores(mean["scores"], counts.numpy(), mean.get("features"))


def clip_batches(videos: Iterable[dict[str, Any]], clips_per_batch: int, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(video positions (N,), uint8 clips (N, T, H, W, C) on device)`` batches of ``clips_per_batch`` clips (the
    last may be smaller) cut from :class:`ClipViews` items in order, spanning videos. A video's frames cross to the
    device once; each clip is cut there when its batch is made, so at most one batch of clips exists at a time."""
    queue: collections.deque[tuple[int, torch.Tensor, torch.Tensor]] = collections.deque()
    waiting = 0
    for item in videos:
        if "unreadable" in item:  # a test video cannot be skipped without changing the result: stop
            raise EvaluationError(f"{item['unreadable'][1]}; asym3d inspect SHARD_DIR --verify lists the damaged "
                                  "shards, and --repair on the command that built them redoes them")
        frames = item["frames"].to(device, non_blocking=True)
        queue.append((int(item["position"]), frames, item["clips"].to(device)))
        waiting += len(item["clips"])
        while waiting >= clips_per_batch:
            yield _take_clips(queue, clips_per_batch)
            waiting -= clips_per_batch
    if waiting:
        yield _take_clips(queue, waiting)


def _take_clips(queue: collections.deque, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions: list[int] = []
    clips = []
    while n:
        position, frames, rows = queue[0]
        take = min(n, len(rows))
        clips.append(frames[rows[:take]])
        positions += [position] * take
        if take == len(rows):
            queue.popleft()
        else:
            queue[0] = (position, frames, rows[take:])
        n -= take
    return torch.tensor(positions, dtype=torch.int64), torch.cat(clips)


def checkpoint_views(state: dict[str, Any], clips: int, crops: int) -> ViewProtocol:
    """The paper's test views of a checkpoint's input: its modality, clip length, crop size and normalisation."""
    config, clip = state.get("config", {}), state["model_kwargs"]["clip"]
    return ViewProtocol(config.get("input", "rgb"), clip_len=int(config.get("clip_len", clip[0])), num_clips=clips,
                     crop_size=int(config.get("crop", clip[1])), crops=crops,
                     mean=tuple(state["normalization"]["mean"]), std=tuple(state["normalization"]["std"]))


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
    views = ClipViews(shards, videos, checkpoint_views(state, clips, crops))
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
    path = split_dir(run_dir, split) / f"{choice}.pt" if choice in CHECKPOINT_CHOICES else Path(choice)
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
                 batch_size: int = 30, device: str = "auto", workers: int = 0, progress: bool = True,
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
    device = str(resolve_device(device))
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
