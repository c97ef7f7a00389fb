"""Training data: the split's videos in the training shards, as random (train) or centre (validation) clips.

Sampling (paper §4.3, docs/DESIGN.md "Data rules"):

- Train: one random ``clip_len``-frame window per video per epoch, start uniform over the video's valid starts; a
  video shorter than the clip loops (0, 1, .., n-1, 0, ..; see :func:`model.clips.clip_indices`). The crop's top and
  left are drawn uniformly over every position the frame allows, so the centre and the four corners are among the
  possible crops (a 171x128 frame has 17x60 positions for a 112 crop). A horizontal flip with probability 1/2; for
  flow images the flip also negates u (:func:`model.clips.network_input`, on the device).
- Validation: one clip per test video, centred in time and space, unflipped: a cheap accuracy for choosing
  ``best.pt``; the full 250-view protocol is the evaluator's job.

The random choices of sample ``index`` in ``epoch`` come from a generator seeded with ``(seed, epoch, index)``, so
they do not depend on which DataLoader worker reads the sample nor on how many workers there are, and a resumed run
draws exactly what the uninterrupted one drew. Training samples are therefore addressed as ``(epoch, index)``
pairs; :class:`EpochSampler` produces them.

Inputs are normalised per channel with a mean and standard deviation measured on a sample of the split's training
frames (:func:`channel_statistics`); the numbers travel with the run's checkpoints so evaluation uses the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from pipeline.errors import Asym3dError
from pipeline.store import SHARD_GLOB, DamagedError, ShardSet, StoreError, VideoEntry, content_digest

from .clips import clip_indices, crop, crop_positions


class DataError(Asym3dError, ValueError):
    """Training shards that cannot serve a run (wrong modality, empty split, too many videos absent)."""


def open_training_shards(shard_dir: Path | str, modality: str) -> ShardSet:
    """Open build-rgbf's output for one input modality, refusing anything a run cannot use.

    Raises :class:`pipeline.store.StoreError` for a missing directory, one without complete shards, or another
    format version, and :class:`DataError` when the shards are not training shards or lack ``modality``.
    """
    root = Path(shard_dir)
    if not root.is_dir():
        raise StoreError(f"{root}: no such shard directory")
    if not any(root.glob(SHARD_GLOB)):
        raise StoreError(f"{root}: holds no complete shards (run build-rgbf into it first)")
    shards = ShardSet(root)
    if shards.schema.kind != "train":
        raise DataError(f"{root}: holds {shards.schema.kind!r} shards, not training shards (run build-rgbf on it)")
    if modality not in shards.schema.field_names:
        raise DataError(f"{root}: holds no {modality!r} frames (it holds: {', '.join(shards.schema.field_names)})")
    spec = shards.schema.field(modality)
    if spec.channels != 3 or spec.dtype != "uint8":
        raise DataError(f"{root}: field {modality!r} is {spec.channels}-channel {spec.dtype}, expected 3-channel uint8")
    if not shards.classes:
        raise DataError(f"{root}: {SHARD_GLOB} carry no class list in dataset.json")
    return shards


def shard_identity(shards: ShardSet) -> dict[str, Any]:
    """What a run records about its shards: the absolute path, a digest of what defines them (schema, dataset
    description with the class list, plan of videos per shard) and the complete shard files it saw."""
    defined = {"schema": shards.schema.to_dict(), "dataset": shards.dataset, "plan": shards.plan}
    return {"path": str(shards.root.resolve()), "digest": content_digest(defined),
            "files": list(shards.complete_shards)}


def check_shard_identity(shards: ShardSet, expected: dict[str, Any] | None, owner: Path | str) -> None:
    """Refuse ``shards`` unless they are the ones ``owner`` (a run's checkpoint) recorded: same digest, and every
    shard file it saw still there (shards completed since are the same data, more of it). ``expected`` None: a run
    from before identities were recorded, nothing to compare."""
    if not expected:
        return
    actual = shard_identity(shards)
    where = f"the run expected its shards at {expected.get('path')}"
    if actual["digest"] != expected.get("digest"):
        raise DataError(f"{shards.root}: not the shards {owner} was trained on (another schema, class list or plan); "
                        f"{where}")
    missing = sorted(set(expected.get("files", [])) - set(actual["files"]))
    if missing:
        raise DataError(f"{shards.root}: lacks {len(missing)} shard file(s) {owner} was trained on "
                        f"({', '.join(missing[:3])}); {where}")


@dataclass(frozen=True)
class SplitVideos:
    """The videos one split trains and validates on, and how many planned videos the shards lack."""

    train: list[VideoEntry]
    test: list[VideoEntry]
    absent: int  # planned for this directory but not in any complete shard (failed or not built yet)
    planned: int


def split_videos(shards: ShardSet, split: int, modality: str, max_missing: float) -> SplitVideos:
    """Select ``split``'s train and test videos; :class:`DataError` when none train or too many are absent.

    A failed video's split membership is not stored (it never reached a shard), so absence is measured over the
    whole directory's plan: ``absent / planned`` above ``max_missing`` stops the run, below it the count is
    reported by the caller. Videos whose ``modality`` has no frames (a one-frame video has no flow) count as absent.
    """
    usable = [v for v in shards.videos if shards.field_length(v, modality) > 0]
    planned = sum(len(ids) for ids in shards.plan) or len(shards.videos)
    absent = max(planned - len(usable), 0)
    if planned and absent / planned > max_missing:
        raise DataError(f"{shards.root}: {absent} of {planned} planned videos are absent from the shards "
                        f"({absent / planned:.1%} > --max-missing {max_missing:.1%}); finish build-rgbf or raise "
                        "--max-missing")
    train = [v for v in usable if v.splits.get(split) == "train"]
    test = [v for v in usable if v.splits.get(split) == "test"]
    if not train:
        raise DataError(f"{shards.root}: split {split} has no training videos in these shards")
    return SplitVideos(train, test, absent, planned)


def channel_statistics(shards: ShardSet, videos: Sequence[VideoEntry], modality: str, *, max_videos: int = 64,
                       frames_per_video: int = 4) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (0..255 scale) over frames evenly sampled from ``videos``.

    A deterministic sample (evenly spaced videos, evenly spaced frames) keeps the statistics reproducible; a few
    hundred frames pin the mean to well under one grey level. A channel with no spread gets std 1 (no division by 0).
    """
    picks = np.unique(np.linspace(0, len(videos) - 1, min(max_videos, len(videos))).round().astype(int))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in picks:
        video = videos[i]
        n = shards.field_length(video, modality)
        index = np.unique(np.linspace(0, n - 1, min(frames_per_video, n)).round().astype(int))
        try:
            frames = shards.read(video, modality, index=index.tolist()).astype(np.float64)
        except DamagedError:  # the training loop reports and counts it
            continue
        total += frames.sum(axis=(0, 1, 2))
        total_sq += (frames ** 2).sum(axis=(0, 1, 2))
        count += frames.shape[0] * frames.shape[1] * frames.shape[2]
    if not count:
        raise DataError(f"{shards.root}: none of the sampled training videos can be read (asym3d inspect --verify)")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std[std < 1e-6] = 1.0
    return mean.tolist(), std.tolist()


def check_crop(shards: ShardSet, crop_size: int) -> None:
    """:class:`DataError` when a square ``crop_size`` crop does not fit the stored frames."""
    height, width = shards.schema.height, shards.schema.width
    if crop_size > height or crop_size > width:
        raise DataError(f"{shards.root}: crop {crop_size} does not fit the stored {height}x{width} frames "
                        "(frames are resized when flow is extracted; pick a smaller --clip)")


@dataclass(frozen=True)
class View:
    """Where one clip comes from: first frame, crop corner and whether it is mirrored."""

    start: int
    top: int
    left: int
    flip: bool


class _Clips(Dataset):
    """Clips of ``modality`` from ``videos``; samples are ``{"clip": (T, S, S, C) uint8, "flip": bool, "label": int}``.

    The clip is cropped here (fewer bytes to ship) but neither mirrored nor normalised: the device the network runs
    on does both for a whole batch (:func:`model.clips.network_input`).
    """

    def __init__(self, shards: ShardSet, videos: Sequence[VideoEntry], modality: str, clip_len: int, crop_size: int):
        check_crop(shards, crop_size)
        self.shards = shards
        self.videos = list(videos)
        self.modality = modality
        self.clip_len = clip_len
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.videos)

    def frames(self, index: int) -> int:
        return self.shards.field_length(self.videos[index], self.modality)

    def clip(self, index: int, view: View) -> dict[str, Any]:
        """The sample of video ``index`` seen through ``view``, or ``{"unreadable": (video id, reason)}`` when its
        stored frames fail their checksum or do not decode (see :func:`collate_readable`)."""
        video = self.videos[index]
        try:
            frames = self.shards.read(video, self.modality, index=clip_indices(self.frames(index), view.start,
                                                                               self.clip_len).tolist())
        except DamagedError as err:
            return {"unreadable": (video.video_id, str(err))}
        frames = np.ascontiguousarray(crop(frames, view.top, view.left, self.crop_size))
        return {"clip": torch.from_numpy(frames), "flip": view.flip, "label": video.label}


def collate_readable(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the readable samples; ``batch["unreadable"]`` lists ``(video id, reason)`` of the others, so one bad
    frame skips one video (counted by the trainer, which stops past a cap) instead of ending the run."""
    good = [s for s in samples if "unreadable" not in s]
    batch = default_collate(good) if good else {}
    batch["unreadable"] = [s["unreadable"] for s in samples if "unreadable" in s]
    return batch


class TrainClips(_Clips):
    """Random training views, addressed by ``(epoch, index)`` (see the module docstring)."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def random_view(self, epoch: int, index: int) -> View:
        rng = np.random.default_rng((self.seed, epoch, index))
        last_start = max(self.frames(index) - self.clip_len, 0)
        height, width = self.shards.schema.height, self.shards.schema.width
        return View(start=int(rng.integers(0, last_start + 1)),
                    top=int(rng.integers(0, height - self.crop_size + 1)),
                    left=int(rng.integers(0, width - self.crop_size + 1)),
                    flip=bool(rng.random() < 0.5))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, index = key
        return self.clip(index, self.random_view(epoch, index))


class CentreClips(_Clips):
    """One clip per video, centred in time and space, unflipped (validation)."""

    def centre_view(self, index: int) -> View:
        top, left = crop_positions(self.shards.schema.height, self.shards.schema.width, self.crop_size)[0]
        return View(start=max(self.frames(index) - self.clip_len, 0) // 2, top=top, left=left, flip=False)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.clip(index, self.centre_view(index))


class EpochSampler(Sampler):
    """Shuffled ``(epoch, index)`` keys for this process's share of a :class:`TrainClips`.

    The order is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``, identical on every rank;
    rank ``r`` of ``world`` takes positions ``r, r + world, ...`` after padding the permutation to a multiple of
    ``world`` (as :class:`torch.utils.data.DistributedSampler` does), so every rank runs the same number of steps.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: len(self) * self.world - self.size]
        for index in order[self.rank::self.world]:
            yield self.epoch, index
