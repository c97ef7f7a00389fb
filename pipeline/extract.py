"""The extract-flow stage: decode every video, compute optical flow between consecutive frames, write flow shards.

``extract_flow`` plans shards (videos sorted by id, ``videos_per_shard`` each), declares the schema, and maps
``process_shard`` over the shards with the shared runner (joblib or dask). ``process_shard`` is a pure function of its
task: it skips a shard that is already complete, records each bad video as a failure instead of raising, and writes
the shard atomically, so a killed run loses at most the shards in flight and a rerun redoes only those.

Any exception while one video is decoded or its flow computed fails that video, with the reason, and the run goes
on: up to ``max_failures`` videos (a count, or a fraction of the run's videos), after which the run stops with
:class:`TooManyFailures`; the finished shards are kept for a rerun.

The schema (the output's identity) holds the decoding and the flow algorithm with its parameters; the backend,
device, batch size, timeout and library versions are recorded beside it, so ``--retry-failed --timeout 60`` or a
rerun after a library upgrade continues the same output.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.datasets import DatasetIndex, VideoRecord
from pipeline.decode import DecodeConfig, DecodeError, decode_video
from pipeline.errors import Asym3dError, ConfigError
from pipeline.flow import MIN_FRAME_SIDE, backend_metadata, backend_record, make_backend, resolve_backend
from pipeline.runner import run_tasks
from pipeline.store import (FieldSpec, Schema, ShardWriter, StoreError, VideoMeta, library_versions,
                            prepare_output, shard_name, write_manifest)
from pipeline.tvl1_params import TVL1Params

# Flow is stored as int16 hundredths of a pixel with gzip: |error| <= 0.005 px per component (<= 0.0071 px in
# magnitude), range +-327 px, 0.18x the bytes of float32 where float16 gives 0.46x at best; TV-L1 runs at a few
# pairs/s, so gzip's write cost is invisible (bench/flow_storage.py, BENCHMARKS.md).
FLOW_FIELD = FieldSpec("flow", channels=2, dtype="int16", scale=100.0, compression="gzip", frames_offset=-1,
                       description="(u, v) displacement in pixels at the stored resolution, frame t -> t+1")
RGB_FIELD = FieldSpec("rgb", channels=3, dtype="uint8", compression="lzf",
                      description="decoded RGB frames, lossless (build-rgbf multiplies them by the flow magnitude)")
# The default --max-failures: a run in which most videos fail points at a wrong setting, not at a few bad files.
DEFAULT_MAX_FAILURES = 0.5


class TooManyFailures(Asym3dError):
    """More videos failed than ``max_failures`` allows; the run stopped (finished shards are kept)."""


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract flow. The decoding (but its timeout), the algorithm and its parameters and the shard size make
    the schema a resume must match; backend, device, batch size and timeout are recorded (:meth:`recorded`)."""

    decode: DecodeConfig = DecodeConfig()
    backend: str = "auto"
    tvl1: TVL1Params = TVL1Params()
    device: str | None = None  # torch backend only
    batch_size: int = 32  # torch backend only: frame pairs per batch
    videos_per_shard: int = 50
    flow_field: FieldSpec = FLOW_FIELD
    rgb_field: FieldSpec = RGB_FIELD

    def __post_init__(self) -> None:
        if min(self.decode.height, self.decode.width) < MIN_FRAME_SIDE:
            raise ConfigError(f"--size {self.decode.height}x{self.decode.width}: optical flow needs frames of at "
                              f"least {MIN_FRAME_SIDE} pixels a side")

    def schema(self) -> Schema:
        backend = make_backend(self.backend, self.tvl1, device=self.device, batch_size=self.batch_size)
        decode = {k: v for k, v in dataclasses.asdict(self.decode).items() if k != "timeout_s"}
        return Schema(kind="flow", height=self.decode.height, width=self.decode.width,
                      fields=(self.rgb_field, self.flow_field),
                      config={"decode": decode, "flow": backend_metadata(backend),
                              "videos_per_shard": self.videos_per_shard})

    def recorded(self) -> dict:
        """What runs (never compared on resume): library versions, backend, device and limits."""
        backend = make_backend(self.backend, self.tvl1, device=self.device, batch_size=self.batch_size)
        return {"libraries": library_versions(), **backend_record(backend), "batch_size": self.batch_size,
                "timeout_s": self.decode.timeout_s}


@dataclass(frozen=True)
class ShardTask:
    index: int
    out_dir: Path
    records: tuple[VideoRecord, ...]
    cfg: ExtractConfig
    schema: Schema  # declared once for the run, so every worker writes exactly what was declared
    recorded: dict  # what ran, stored in the shard
    retry_failed: bool = False


@dataclass(frozen=True)
class ShardResult:
    index: int
    videos_ok: int
    failures: tuple[dict[str, str], ...]
    frames: int  # frames decoded in this run (0 when the shard was already complete)
    skipped: bool


def process_shard(task: ShardTask) -> ShardResult:
    """Decode and compute flow for one shard's videos, unless the shard is already complete.

    With ``retry_failed``, a complete shard that recorded failures is rebuilt: its good videos are copied byte for
    byte and only the failed ones are tried again.
    """
    path = task.out_dir / shard_name(task.index)
    keep: dict[str, str] = {}  # video id -> key of a finished video in the existing shard
    if path.exists():
        with h5py.File(path, "r") as f:
            failed = f.attrs.get("failures", "[]") != "[]"
            if not (task.retry_failed and failed):
                return _existing_result(task.index, f)
            keep = {str(g.attrs["video_id"]): k for k, g in f["videos"].items()}
    backend = make_backend(task.cfg.backend, task.cfg.tvl1, device=task.cfg.device, batch_size=task.cfg.batch_size)
    ok = frames_done = 0
    source = h5py.File(path, "r") if keep else None
    try:
        with ShardWriter(path, task.schema, task.index, task.recorded) as writer:
            for record in task.records:
                if record.video_id in keep:
                    writer.copy_video(source, keep[record.video_id])
                    ok += 1
                    continue
                try:
                    frames = decode_video(record.path, task.cfg.decode)
                    if len(frames) < 2:
                        raise DecodeError(record.path, f"{len(frames)} frame(s); optical flow needs at least 2")
                    flow = backend.compute(frames)
                except Exception as err:  # noqa: BLE001 - any failure fails this video only, with its reason
                    writer.add_failure(record.video_id, str(record.path), _reason(record, err))
                    continue
                writer.add_video(VideoMeta(record.video_id, record.label, record.label_name, str(record.path),
                                           dict(record.splits)), {"rgb": frames, "flow": flow})
                ok += 1
                frames_done += len(frames)
    finally:
        if source is not None:
            source.close()
    return ShardResult(task.index, ok, writer.failures, frames_done, skipped=False)


def _reason(record: VideoRecord, err: Exception) -> str:
    """One line: our own errors already name the file; anything else (a backend's cv2.error, a bug) gets the path
    and the exception type, so the failure list says what to look at."""
    if isinstance(err, Asym3dError):
        return str(err)
    text = " ".join(str(err).split()) or "no message"
    return f"{record.path}: {type(err).__name__}: {text[:240]}"


def failure_limit(max_failures: int | float, videos: int) -> int:
    """The number of failed videos a run may have: an int is a count, a float a fraction (0 to 1) of ``videos``
    (1.0 never stops a run)."""
    if isinstance(max_failures, int) and max_failures >= 0:
        return max_failures
    if isinstance(max_failures, float) and 0 <= max_failures <= 1:  # NaN fails both comparisons
        return math.floor(max_failures * videos)
    raise ConfigError(f"--max-failures must be a count or a fraction from 0 to 1, got {max_failures}")


def _existing_result(index: int, f: h5py.File) -> ShardResult:
    return ShardResult(index, len(f["videos"]), tuple(json.loads(f.attrs.get("failures", "[]"))), 0, skipped=True)


@dataclass(frozen=True)
class ExtractSummary:
    out_dir: Path
    backend: str
    shards_total: int
    shards_skipped: int
    videos_ok: int
    failures: tuple[dict[str, str], ...]
    frames_decoded: int
    warnings: tuple[str, ...] = ()  # e.g. library versions changed since the earlier run into out_dir


def plan_shards(records: list[VideoRecord], videos_per_shard: int) -> list[tuple[VideoRecord, ...]]:
    """Videos sorted by id, cut into shards of ``videos_per_shard``: the same index gives the same plan."""
    if videos_per_shard < 1:
        raise ValueError("videos_per_shard must be at least 1")
    ordered = sorted(records, key=lambda r: r.video_id)
    return [tuple(ordered[i:i + videos_per_shard]) for i in range(0, len(ordered), videos_per_shard)]


def extract_flow(index: DatasetIndex, out_dir: Path, cfg: ExtractConfig, *, jobs: int = 1,
                 scheduler: str | None = None, overwrite: bool = False, retry_failed: bool = False,
                 progress: bool = True, max_failures: int | float = DEFAULT_MAX_FAILURES) -> ExtractSummary:
    """Run the stage over a dataset index; see the module docstring for the guarantees.

    ``max_failures``: a count (int) or a fraction of the index's videos (float); more failed videos stop the run
    with :class:`TooManyFailures`.
    """
    if not index.records:
        raise StoreError(f"{index.root}: the {index.kind} index holds no videos")
    cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg.backend))
    schema, recorded = cfg.schema(), cfg.recorded()
    limit = failure_limit(max_failures, len(index.records))
    plan = plan_shards(index.records, cfg.videos_per_shard)
    dataset = {"kind": index.kind, "classes": list(index.classes), "extra": index.extra}
    warnings = prepare_output(out_dir, schema, dataset, [[r.video_id for r in shard] for shard in plan],
                              overwrite=overwrite, recorded=recorded)
    tasks = [ShardTask(i, out_dir, shard, cfg, schema, recorded, retry_failed) for i, shard in enumerate(plan)]
    failures: list[dict[str, str]] = []

    def stop_on_too_many(result: ShardResult) -> None:
        failures.extend(result.failures)
        if len(failures) > limit:
            raise TooManyFailures(f"{out_dir}: stopped after {len(failures)} of {len(index.records)} videos failed "
                                  f"(--max-failures {max_failures:g} allows {limit}); first: {failures[0]['reason']}")

    try:
        results = run_tasks(process_shard, tasks, jobs=jobs, scheduler=scheduler, desc="extract-flow",
                            frames_of=lambda r: r.frames, progress=progress, on_result=stop_on_too_many)
    finally:
        write_manifest(out_dir)
    return ExtractSummary(out_dir, cfg.backend, len(tasks), sum(r.skipped for r in results),
                          sum(r.videos_ok for r in results),
                          tuple(f for r in sorted(results, key=lambda r: r.index) for f in r.failures),
                          sum(r.frames for r in results), tuple(warnings))

