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
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import ConfigError
from pipeline.rgbf import (DEFAULT_FLOW_BOUND, FLOW_IMAGE_ENCODING, LAST_FRAME_PAIRING, MODALITIES, RGBF_DEFINITION,
                           RGBFError, paired_flow_index, training_frames)
from pipeline.stage import BUILD_MAX_FAILURES, Output, ShardResult, Stage
from pipeline.store import (DamagedError, FieldSpec, JpegFrames, Schema, ShardSet, ShardWriter, StoreError,
                            VideoEntry, VideoMeta, damaged_shard, decode_field, encode_jpeg, library_versions,
                            open_shard, os_reason, read_checked, shard_name, video_entries)
from pipeline.verify import Damage

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
# Frames computed per step: the float32 temporaries of 8 frames at 128x171 (~2 MB) stay in the CPU's cache, which
# makes the training frames ~1.8x cheaper than steps of 128 frames (tens of MB, bench/host_cost.py); any long video
# costs the same bounded memory.
CHUNK_FRAMES = 8
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
    """``extract-flow --train-dir``: build each training shard in memory from the decoded frames and their flow
    (issues 17, 21), the same bytes build-rgbf writes from the flow shards.

    No flow shard is written unless ``keep_flow``, so the disk holds the training shards only, instead of every flow
    shard too (~7x the training shards).
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
            raise damaged_shard(flow_shard, exc) from None
    return ShardTask(str(flow_shard), str(Path(out_dir) / flow_shard.name), index, videos, source_schema,
                     train_schema(source_schema, cfg), cfg.flow_bound)


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


def read_source(flow_dir: Path, out_dir: Path) -> ShardSet:
    """The flow shards build-rgbf reads; :class:`StoreError` for an input that is not extract-flow output or is the
    output directory itself."""
    flow_dir, out_dir = Path(flow_dir), Path(out_dir)
    if flow_dir.resolve() == out_dir.resolve():
        raise StoreError(f"{out_dir}: output directory must differ from the flow directory")
    source = ShardSet(flow_dir)
    source.close()
    _check_source(flow_dir, source)
    return source


def train_output(out_dir: Path, source: Schema, cfg: BuildConfig) -> Output:
    """The training-shard directory as a stage output: its schema and what is recorded there."""
    return Output(Path(out_dir), train_schema(source, cfg), {"libraries": library_versions()})


def plan_build(source: ShardSet, out_dir: Path, schema: Schema, flow_bound: float
               ) -> tuple[list[ShardTask], list[str], int]:
    """The shards still to build into ``out_dir`` (declared, and locked by the caller), as ``(tasks, input shards
    not yet written, output shards already complete)``."""
    flow_dir, out_dir = source.root, Path(out_dir)
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
                                   source.schema, schema, flow_bound))
    return tasks, waiting, skipped


def up_to_date(source: Path, output: Path) -> bool:
    """Whether ``output`` is complete and newer than its input shard. An input shard rewritten after the output was
    built (``extract-flow --retry-failed`` recovering videos) makes the output stale, and it is rebuilt."""
    return output.exists() and output.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _read(handle: h5py.File, spec: FieldSpec, video: VideoEntry, start: int, stop: int,
          checksums: bool) -> np.ndarray:
    return decode_field(spec, read_checked(handle["videos"][video.key], spec, start, stop, checksums=checksums))


def _video_frames(handle: h5py.File, task: ShardTask, video: VideoEntry) -> dict[str, np.ndarray]:
    """All training frames of one video read from a flow shard.

    Raises RGBFError, or OSError / DamagedError when the input fails its checksums."""
    rgb_spec, flow_spec = task.source_schema.field("rgb"), task.source_schema.field("flow")
    n_pairs = handle["videos"][video.key]["flow"].shape[0]
    if n_pairs != video.n_frames - 1:
        raise RGBFError(f"{n_pairs} flow pairs for {video.n_frames} frames (expected {video.n_frames - 1})")
    checksums = task.source_schema.version >= 2
    return video_training_frames(video.n_frames, lambda a, b: _read(handle, rgb_spec, video, a, b, checksums),
                                 lambda a, b: _read(handle, flow_spec, video, a, b, checksums), task.schema,
                                 task.flow_bound)


def video_training_frames(n_frames: int, rgb_of, flow_of, schema: Schema, flow_bound: float
                          ) -> dict[str, np.ndarray | JpegFrames]:
    """All training frames of one video, ``CHUNK_FRAMES`` at a time: ``rgb_of(a, b)`` gives frames ``a:b`` and
    ``flow_of(a, b)`` flow pairs ``a:b`` as stored. JPEG fields are encoded step by step (whole-video images would
    cost more in page faults than in arithmetic), raw ones gathered. One function for build-rgbf (reading a flow
    shard) and extract-flow --train-dir (in memory), so both write the same training shards. Raises RGBFError."""
    pairing = paired_flow_index(n_frames)
    names = tuple(schema.field_names)
    out: dict[str, np.ndarray | JpegFrames] = {
        spec.name: JpegFrames() if spec.encoding == "jpeg" else
        np.empty((n_frames, schema.height, schema.width, 3), np.uint8) for spec in schema.fields}
    for start in range(0, n_frames, CHUNK_FRAMES):
        stop = min(start + CHUNK_FRAMES, n_frames)
        first = int(pairing[start])
        flow = flow_of(first, int(pairing[stop - 1]) + 1)[pairing[start:stop] - first]
        for name, frames in training_frames(rgb_of(start, stop), flow, names, flow_bound).items():
            if isinstance(out[name], JpegFrames):
                out[name].extend(encode_jpeg(schema.field(name), frames))
            else:
                out[name][start:stop] = frames
    return out


def process_shard(task: ShardTask) -> ShardResult:
    """Build one output shard from one input shard. Bad videos are recorded as failures; the shard is still written.

    Module-level and free of open handles, so joblib and dask can pickle it with its task.
    """
    output = Path(task.output)
    if up_to_date(Path(task.source), output):  # finished by an earlier run or a retried task
        return ShardResult(task.shard_index, 0, (), 0, skipped=True)
    recorded = {"libraries": library_versions()}
    ok = frames_done = 0
    with open_shard(task.source) as handle, ShardWriter(output, task.schema, task.shard_index, recorded) as writer:
        inherited = json.loads(handle.attrs.get("failures", "[]"))
        for failure in inherited:
            writer.add_failure(failure["video_id"], failure["path"], failure["reason"])
        for video in task.videos:
            try:
                frames = _video_frames(handle, task, video)
            except RGBFError as exc:
                writer.add_failure(video.video_id, video.source, f"build-rgbf: {exc}")
                continue
            except (OSError, DamagedError) as exc:  # the input fails its checksum or cannot be read
                reason = (f"build-rgbf: {task.source}: damaged input ({os_reason(exc)}); "
                          "see asym3d extract-flow --repair")
                writer.add_failure(video.video_id, video.source, reason)
                continue
            writer.add_video(VideoMeta(video.video_id, video.label, video.label_name, video.source, video.splits),
                             frames)
            ok += 1
            frames_done += video.n_frames
    return ShardResult(task.shard_index, ok, writer.failures, frames_done, skipped=False, inherited=len(inherited))


def build_rgbf(flow_dir: Path, out_dir: Path, cfg: BuildConfig = BuildConfig(), *, jobs: int = 1,
               scheduler: str | None = None, overwrite: bool = False, repair: bool = False,
               max_failures: int | float = BUILD_MAX_FAILURES, progress: bool = True) -> BuildSummary:
    """Run the stage (:class:`pipeline.stage.Stage`): check the input, declare ``out_dir``, build the missing shards
    with joblib (``jobs``) or dask (``scheduler``), write the manifest. Complete output shards are left untouched,
    so a rerun of a finished build does nothing; ``repair`` rebuilds exactly the output shards that fail
    verification. ``max_failures`` (a count, or a fraction of the planned videos) caps the videos this stage fails;
    failures carried over from the input are recorded but not counted."""
    source = read_source(flow_dir, out_dir)
    output = train_output(out_dir, source.schema, cfg)
    with Stage([output], source.dataset, source.plan, videos=sum(map(len, source.plan)), max_failures=max_failures,
               overwrite=overwrite, repair=repair) as stage:
        tasks, waiting, skipped = plan_build(source, out_dir, output.schema, cfg.flow_bound)
        results = stage.run(process_shard, tasks, desc="build-rgbf", jobs=jobs, scheduler=scheduler,
                            progress=progress)
    manifest = stage.manifests[0]
    failures = [{k: v.get(k, "") for k in ("video_id", "path", "reason")}
                for v in manifest["videos"] if v["status"] == "failed"]
    return BuildSummary(out_dir=Path(out_dir), shards_planned=manifest["summary"]["shards_planned"],
                        shards_built=sum(not r.skipped for r in results),
                        shards_skipped=skipped + sum(r.skipped for r in results), shards_waiting=waiting,
                        videos_ok=manifest["summary"]["videos_ok"], videos_failed=len(failures),
                        frames_built=sum(r.frames for r in results), failures=failures,
                        repaired=list(stage.repaired))
