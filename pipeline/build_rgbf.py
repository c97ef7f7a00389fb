"""The build-rgbf stage: flow shards (extract-flow) -> training shards with RGB, flow-image and RGBF frames.

One output shard per input shard, with the same name, videos, labels and splits, so the trainer and the evaluator
read one directory for all three of the paper's inputs (its Figure 7). The maths is in :mod:`pipeline.rgbf`; this
module plans the work, runs one picklable function per shard with :func:`pipeline.runner.run_tasks` (joblib or
dask), and keeps the stage guarantees of :mod:`pipeline.store`: the schema (with the flow backend that made the input)
is declared up front, a different configuration in the same directory is refused, shards appear atomically, a rerun
skips complete shards that are newer than their input, and failures (the input's and new ones) are recorded per video.

Storage default (measured by ``bench/storage.py``, table in BENCHMARKS.md): JPEG q90 for every modality, about
0.07x the raw uint8 size for the three together (measured 0.067-0.069x); ``--storage lzf|gzip|raw`` is lossless.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import ConfigError
from pipeline.rgbf import (DEFAULT_FLOW_BOUND, FLOW_IMAGE_ENCODING, LAST_FRAME_PAIRING, MODALITIES, RGBF_DEFINITION,
                           RGBFError, paired_flow_index, training_frames)
from pipeline.lock import DirectoryLock
from pipeline.runner import run_tasks
from pipeline.store import (DamagedError, FieldSpec, Schema, ShardSet, ShardWriter, StoreError, VideoEntry, VideoMeta,
                            decode_field, library_versions, open_shard, os_reason, prepare_output, read_checked,
                            shard_name, video_entries, write_manifest)
from pipeline.verify import Damage, set_aside_damaged

STORAGE = {  # --storage name -> FieldSpec arguments (quality is filled in for JPEG)
    "jpeg": {"encoding": "jpeg"},
    "lzf": {"compression": "lzf"},
    "gzip": {"compression": "gzip"},
    "raw": {},
}
DEFAULT_STORAGE = "jpeg"
DEFAULT_JPEG_QUALITY = 90
# JPEG chroma subsampling: 4:2:0 decodes ~30% faster and is smaller for natural images (RGB, RGBF); flow images keep
# full-resolution chroma because their channels are u, v and |F|, not colour.
JPEG_SUBSAMPLING = {"rgb": "420", "rgbf": "420", "flow": "444"}
# Frames computed per step: bounds the float32 temporaries of a long video to a few tens of MB.
CHUNK_FRAMES = 128
DESCRIPTIONS = {
    "rgb": "RGB frames, copied from the flow shards",
    "flow": "flow image (u, v, |F|); see schema.config.flow_image",
    "rgbf": "RGB weighted by the frame's normalised flow magnitude (paper eq. 7); see schema.config.rgbf",
}


@dataclass(frozen=True)
class BuildConfig:
    """What build-rgbf writes.

    modalities: which of "rgb", "flow" (flow image), "rgbf" to store.
    storage: "jpeg" (lossy, small) or "lzf" / "gzip" / "raw" (lossless uint8 chunked per frame).
    jpeg_quality: JPEG quality 1..100 (only with storage "jpeg").
    flow_bound: |u|, |v| and |F| in pixels that map to the ends of 0..255 in the flow image.
    """

    modalities: tuple[str, ...] = MODALITIES
    storage: str = DEFAULT_STORAGE
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    flow_bound: float = DEFAULT_FLOW_BOUND

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities must be distinct names from {', '.join(MODALITIES)}; "
                             f"got {', '.join(self.modalities) or 'none'}")
        if self.storage not in STORAGE:
            raise ConfigError(f"unknown storage {self.storage!r}; choose from {', '.join(STORAGE)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"JPEG quality must be 1..100, got {self.jpeg_quality}")
        if not 0 < self.flow_bound < math.inf:
            raise ConfigError(f"flow bound must be positive, got {self.flow_bound}")


def train_schema(source: Schema, cfg: BuildConfig) -> Schema:
    """The output schema: one 3-channel uint8 field per modality (in the canonical order), T frames each."""
    options = dict(STORAGE[cfg.storage])
    if cfg.storage == "jpeg":
        options["quality"] = cfg.jpeg_quality
    fields = tuple(FieldSpec(name, 3, description=DESCRIPTIONS[name],
                             **options, **({"subsampling": JPEG_SUBSAMPLING[name]} if cfg.storage == "jpeg" else {}))
                   for name in MODALITIES if name in cfg.modalities)
    config = {
        "stage": "build-rgbf",
        "modalities": [spec.name for spec in fields],
        "storage": cfg.storage,
        "jpeg_quality": cfg.jpeg_quality if cfg.storage == "jpeg" else None,
        "flow_image": {"bound": cfg.flow_bound, "encoding": FLOW_IMAGE_ENCODING},
        "rgbf": RGBF_DEFINITION,
        "frame_pairing": LAST_FRAME_PAIRING,
        "source": source.config,
    }
    return Schema(kind="train", height=source.height, width=source.width, fields=fields, config=config)


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs for one shard (picklable: paths as strings, plain dataclasses)."""

    source: str  # input shard path
    output: str  # output shard path
    shard_index: int
    videos: tuple[VideoEntry, ...]
    source_schema: Schema
    schema: Schema
    flow_bound: float


@dataclass(frozen=True)
class FollowOn:
    """``extract-flow --train-dir``: build each training shard as soon as its flow shard is complete (issue 17).

    Without ``keep_flow`` the flow shard is deleted once its training shard is complete, so the disk holds the
    training shards plus only the flow shards in flight (one per worker) instead of every flow shard (~7x the
    training shards). The training shards are the ones build-rgbf writes from the same flow shards, frame for frame.
    """

    out_dir: Path
    cfg: BuildConfig = BuildConfig()
    keep_flow: bool = False


def shard_task(flow_shard: Path, out_dir: Path, index: int, source_schema: Schema, cfg: BuildConfig) -> ShardTask:
    """The task that builds ``out_dir``'s shard from one complete flow shard (its videos read from the shard)."""
    with open_shard(flow_shard) as f:
        try:
            videos = tuple(video_entries(f, flow_shard.name))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise DamagedError(f"{flow_shard}: damaged shard ({os_reason(exc)}); rerun with --repair") from None
    return ShardTask(str(flow_shard), str(Path(out_dir) / flow_shard.name), index, videos, source_schema,
                     train_schema(source_schema, cfg), cfg.flow_bound)


@dataclass
class ShardResult:
    shard: str
    videos_ok: int = 0
    videos_failed: int = 0  # new failures plus those carried over from the input shard
    frames: int = 0
    skipped: bool = False  # the output shard was already complete
    failures: list[dict[str, str]] = field(default_factory=list)


@dataclass
class BuildSummary:
    out_dir: Path
    shards_planned: int
    shards_built: int
    shards_skipped: int  # complete from an earlier run
    shards_waiting: list[str]  # input shards extract-flow has not written yet
    videos_ok: int
    videos_failed: int
    frames_built: int
    failures: list[dict[str, str]]  # every failure recorded in the output (earlier runs included)
    repaired: list[Damage] = field(default_factory=list)  # damage --repair found in shards then rebuilt

    @property
    def complete(self) -> bool:
        return not self.failures and not self.shards_waiting


def _check_source(flow_dir: Path, shards: ShardSet) -> None:
    schema = shards.schema
    if schema.kind != "flow":
        raise StoreError(f"{flow_dir}: holds {schema.kind!r} shards, build-rgbf reads extract-flow output ('flow')")
    fields = {spec.name: spec for spec in schema.fields}
    rgb, flow = fields.get("rgb"), fields.get("flow")
    if (rgb is None or flow is None or rgb.channels != 3 or rgb.frames_offset != 0 or flow.channels != 2
            or flow.frames_offset != -1):
        raise StoreError(f"{flow_dir}: expected 'rgb' (3 channels, T frames) and 'flow' (2 channels, T-1 pairs)")


def plan_build(flow_dir: Path, out_dir: Path, cfg: BuildConfig, *, overwrite: bool = False, repair: bool = False
               ) -> tuple[list[ShardTask], list[str], int, list[Damage]]:
    """Check the input, prepare ``out_dir`` and list the shards still to build (the caller holds its lock).

    Returns ``(tasks, input shards not yet written, output shards already complete, damage repaired)``; with
    ``repair``, damaged output shards are set aside first (:mod:`pipeline.verify`) so they are rebuilt. Raises
    :class:`StoreError` for an input that is not extract-flow output, or an ``out_dir`` holding another
    configuration (unless ``overwrite``).
    """
    flow_dir, out_dir = Path(flow_dir), Path(out_dir)
    if flow_dir.resolve() == out_dir.resolve():
        raise StoreError(f"{out_dir}: output directory must differ from the flow directory")
    source = ShardSet(flow_dir)
    source.close()
    _check_source(flow_dir, source)
    schema = train_schema(source.schema, cfg)
    repaired = prepare_train_output(out_dir, schema, source.dataset, source.plan, overwrite=overwrite, repair=repair)
    by_shard: dict[str, list[VideoEntry]] = {name: [] for name in source.complete_shards}
    for video in source.videos:
        by_shard[video.shard].append(video)
    tasks, waiting, skipped = [], [], 0
    for index in range(len(source.plan)):
        name = shard_name(index)
        if name not in by_shard and (out_dir / name).exists():  # built by extract-flow --train-dir, input deleted
            skipped += 1
        elif name not in by_shard:
            waiting.append(name)
        elif up_to_date(flow_dir / name, out_dir / name):
            skipped += 1
        else:
            tasks.append(ShardTask(str(flow_dir / name), str(out_dir / name), index, tuple(by_shard[name]),
                                   source.schema, schema, cfg.flow_bound))
    return tasks, waiting, skipped, repaired


def prepare_train_output(out_dir: Path, schema: Schema, dataset: dict[str, Any], plan: list[list[str]], *,
                         overwrite: bool, repair: bool) -> list[Damage]:
    """Declare ``out_dir`` (refusing another configuration, see :func:`pipeline.store.prepare_output`); with
    ``repair``, set its damaged shards aside so they are rebuilt. The caller holds the directory's lock."""
    prepare_output(out_dir, schema, dataset, plan, overwrite=overwrite, recorded={"libraries": library_versions()})
    return set_aside_damaged(out_dir) if repair else []


def up_to_date(source: Path, output: Path) -> bool:
    """Whether ``output`` is complete and newer than its input shard. An input shard rewritten after the output was
    built (``extract-flow --retry-failed`` recovering videos) makes the output stale, and it is rebuilt."""
    return output.exists() and output.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _read(handle: h5py.File, spec: FieldSpec, video: VideoEntry, start: int, stop: int,
          checksums: bool) -> np.ndarray:
    return decode_field(spec, read_checked(handle["videos"][video.key], spec, start, stop, checksums=checksums))


def _video_frames(handle: h5py.File, task: ShardTask, video: VideoEntry) -> dict[str, np.ndarray]:
    """All training frames of one video, computed ``CHUNK_FRAMES`` at a time.

    Raises RGBFError, or OSError / DamagedError when the input fails its checksums."""
    rgb_spec, flow_spec = task.source_schema.field("rgb"), task.source_schema.field("flow")
    n_pairs = handle["videos"][video.key]["flow"].shape[0]
    if n_pairs != video.n_frames - 1:
        raise RGBFError(f"{n_pairs} flow pairs for {video.n_frames} frames (expected {video.n_frames - 1})")
    pairing = paired_flow_index(video.n_frames)
    names = task.schema.field_names
    out = {name: np.empty((video.n_frames, task.schema.height, task.schema.width, 3), np.uint8) for name in names}
    for start in range(0, video.n_frames, CHUNK_FRAMES):
        stop = min(start + CHUNK_FRAMES, video.n_frames)
        checksums = task.source_schema.version >= 2
        rgb = _read(handle, rgb_spec, video, start, stop, checksums)
        first = int(pairing[start])
        flow = _read(handle, flow_spec, video, first, int(pairing[stop - 1]) + 1, checksums)
        flow = flow[pairing[start:stop] - first]
        for name, frames in training_frames(rgb, flow, tuple(names), task.flow_bound).items():
            out[name][start:stop] = frames
    return out


def process_shard(task: ShardTask) -> ShardResult:
    """Build one output shard from one input shard. Bad videos are recorded as failures; the shard is still written.

    Module-level and free of open handles, so joblib and dask can pickle it with its task.
    """
    output = Path(task.output)
    result = ShardResult(output.name)
    if up_to_date(Path(task.source), output):  # finished by an earlier run or a retried task
        result.skipped = True
        return result
    recorded = {"libraries": library_versions()}
    with open_shard(task.source) as handle, ShardWriter(output, task.schema, task.shard_index, recorded) as writer:
        result.failures.extend(json.loads(handle.attrs.get("failures", "[]")))
        for video in task.videos:
            try:
                frames = _video_frames(handle, task, video)
            except RGBFError as exc:
                result.failures.append({"video_id": video.video_id, "path": video.source,
                                        "reason": f"build-rgbf: {exc}"})
                continue
            except (OSError, DamagedError) as exc:  # the input fails its checksum or cannot be read
                result.failures.append({"video_id": video.video_id, "path": video.source,
                                        "reason": f"build-rgbf: {task.source}: damaged input ({os_reason(exc)}); "
                                                  "see asym3d extract-flow --repair"})
                continue
            writer.add_video(VideoMeta(video.video_id, video.label, video.label_name, video.source, video.splits),
                             frames)
            result.videos_ok += 1
            result.frames += video.n_frames
        for failure in result.failures:
            writer.add_failure(failure["video_id"], failure["path"], failure["reason"])
    result.videos_failed = len(result.failures)
    return result


def build_rgbf(flow_dir: Path, out_dir: Path, cfg: BuildConfig = BuildConfig(), *, jobs: int = 1,
               scheduler: str | None = None, overwrite: bool = False, repair: bool = False,
               progress: bool = True) -> BuildSummary:
    """Run the stage: plan, build the missing shards with joblib (``jobs``) or dask (``scheduler``), write the
    manifest. Complete output shards are left untouched, so a rerun of a finished build does nothing. The run
    holds ``out_dir``'s lock throughout; ``repair`` rebuilds exactly the output shards that fail verification."""
    with DirectoryLock(out_dir):
        tasks, waiting, skipped, repaired = plan_build(flow_dir, out_dir, cfg, overwrite=overwrite, repair=repair)
        results = run_tasks(process_shard, tasks, jobs=jobs, scheduler=scheduler, desc="build-rgbf",
                            frames_of=operator.attrgetter("frames"), progress=progress)
        manifest: dict[str, Any] = write_manifest(Path(out_dir))
    failures = [{k: v.get(k, "") for k in ("video_id", "path", "reason")}
                for v in manifest["videos"] if v["status"] == "failed"]
    return BuildSummary(out_dir=Path(out_dir), shards_planned=manifest["summary"]["shards_planned"],
                        shards_built=sum(not r.skipped for r in results),
                        shards_skipped=skipped + sum(r.skipped for r in results), shards_waiting=waiting,
                        videos_ok=manifest["summary"]["videos_ok"], videos_failed=len(failures),
                        frames_built=sum(r.frames for r in results), failures=failures, repaired=repaired)
