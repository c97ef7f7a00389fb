"""The extract-flow stage: decode every video, compute optical flow between consecutive frames, write flow shards.

``extract_flow`` plans shards (videos sorted by id, ``videos_per_shard`` each), declares the schema, and maps
``process_shard`` over the shards with the shared runner (joblib or dask). ``process_shard`` is a pure function of its
task: it skips a shard that is already complete, records each bad video as a failure instead of raising, and writes
the shard atomically, so a killed run loses at most the shards in flight and a rerun redoes only those.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.datasets import DatasetIndex, VideoRecord
from pipeline.decode import DecodeConfig, DecodeError, decode_video
from pipeline.flow import backend_metadata, make_backend, resolve_backend
from pipeline.lock import DirectoryLock
from pipeline.runner import run_tasks
from pipeline.store import (DamagedError, FieldSpec, Schema, ShardWriter, StoreError, VideoMeta, library_versions,
                            open_shard, prepare_output, shard_name, write_manifest)
from pipeline.verify import Damage, set_aside_damaged
from pipeline.tvl1_params import TVL1Params

# Flow is stored as int16 hundredths of a pixel with gzip: |error| <= 0.005 px per component (<= 0.0071 px in
# magnitude), range +-327 px, 0.18x the bytes of float32 where float16 gives 0.46x at best; TV-L1 runs at a few
# pairs/s, so gzip's write cost is invisible (bench/flow_storage.py, BENCHMARKS.md).
FLOW_FIELD = FieldSpec("flow", channels=2, dtype="int16", scale=100.0, compression="gzip", frames_offset=-1,
                       description="(u, v) displacement in pixels at the stored resolution, frame t -> t+1")
RGB_FIELD = FieldSpec("rgb", channels=3, dtype="uint8", compression="lzf",
                      description="decoded RGB frames, lossless (build-rgbf multiplies them by the flow magnitude)")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines the bytes of a flow shard (stored in the schema; a resume must match it)."""

    decode: DecodeConfig = DecodeConfig()
    backend: str = "auto"
    tvl1: TVL1Params = TVL1Params()
    device: str | None = None  # torch backend only
    batch_size: int = 32  # torch backend only: frame pairs per batch
    videos_per_shard: int = 50
    flow_field: FieldSpec = FLOW_FIELD
    rgb_field: FieldSpec = RGB_FIELD

    def schema(self) -> Schema:
        backend = make_backend(self.backend, self.tvl1, device=self.device, batch_size=self.batch_size)
        return Schema(kind="flow", height=self.decode.height, width=self.decode.width,
                      fields=(self.rgb_field, self.flow_field),
                      config={"decode": dataclasses.asdict(self.decode), "flow": backend_metadata(backend),
                              "videos_per_shard": self.videos_per_shard, "libraries": library_versions()})


@dataclass(frozen=True)
class ShardTask:
    index: int
    out_dir: Path
    records: tuple[VideoRecord, ...]
    cfg: ExtractConfig
    schema: Schema  # declared once for the run, so every worker writes exactly what was declared
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
        with open_shard(path) as f:
            try:
                failed = f.attrs.get("failures", "[]") != "[]"
                if not (task.retry_failed and failed):
                    return _existing_result(task.index, f)
                keep = {str(g.attrs["video_id"]): k for k, g in f["videos"].items()}
            except (OSError, KeyError, ValueError) as exc:
                raise DamagedError(f"{path}: damaged shard ({exc}); rerun with --repair") from None
    backend = make_backend(task.cfg.backend, task.cfg.tvl1, device=task.cfg.device, batch_size=task.cfg.batch_size)
    ok = frames_done = 0
    source = open_shard(path) if keep else None
    try:
        with ShardWriter(path, task.schema, task.index) as writer:
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
                except DecodeError as err:
                    writer.add_failure(record.video_id, str(record.path), str(err))
                    continue
                writer.add_video(VideoMeta(record.video_id, record.label, record.label_name, str(record.path),
                                           dict(record.splits)), {"rgb": frames, "flow": flow})
                ok += 1
                frames_done += len(frames)
    finally:
        if source is not None:
            source.close()
    return ShardResult(task.index, ok, writer.failures, frames_done, skipped=False)


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
    repaired: tuple[Damage, ...] = ()  # damage found by --repair in shards that were then recomputed


def plan_shards(records: list[VideoRecord], videos_per_shard: int) -> list[tuple[VideoRecord, ...]]:
    """Videos sorted by id, cut into shards of ``videos_per_shard``: the same index gives the same plan."""
    if videos_per_shard < 1:
        raise ValueError("videos_per_shard must be at least 1")
    ordered = sorted(records, key=lambda r: r.video_id)
    return [tuple(ordered[i:i + videos_per_shard]) for i in range(0, len(ordered), videos_per_shard)]


def extract_flow(index: DatasetIndex, out_dir: Path, cfg: ExtractConfig, *, jobs: int = 1,
                 scheduler: str | None = None, overwrite: bool = False, retry_failed: bool = False,
                 repair: bool = False, progress: bool = True) -> ExtractSummary:
    """Run the stage over a dataset index; see the module docstring for the guarantees.

    The run holds ``out_dir``'s lock (:mod:`pipeline.lock`) throughout. ``repair`` first verifies every complete
    shard (:mod:`pipeline.verify`) and sets the damaged ones aside, so exactly those are recomputed.
    """
    if not index.records:
        raise StoreError(f"{index.root}: the {index.kind} index holds no videos")
    cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg.backend))
    schema = cfg.schema()
    plan = plan_shards(index.records, cfg.videos_per_shard)
    dataset = {"kind": index.kind, "classes": list(index.classes), "extra": index.extra}
    with DirectoryLock(out_dir):
        prepare_output(out_dir, schema, dataset, [[r.video_id for r in shard] for shard in plan],
                       overwrite=overwrite)
        repaired = tuple(set_aside_damaged(out_dir)) if repair else ()
        tasks = [ShardTask(i, out_dir, shard, cfg, schema, retry_failed) for i, shard in enumerate(plan)]
        results = run_tasks(process_shard, tasks, jobs=jobs, scheduler=scheduler, desc="extract-flow",
                            frames_of=lambda r: r.frames, progress=progress)
        write_manifest(out_dir)
    return ExtractSummary(out_dir, cfg.backend, len(tasks), sum(r.skipped for r in results),
                          sum(r.videos_ok for r in results),
                          tuple(f for r in sorted(results, key=lambda r: r.index) for f in r.failures),
                          sum(r.frames for r in results), repaired)

