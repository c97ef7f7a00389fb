"""The extract-flow stage: decode every video, compute optical flow between consecutive frames, write flow shards.

``extract_flow`` plans shards (videos sorted by id, ``videos_per_shard`` each), declares the schema, and maps
``process_shard`` over the shards with the shared runner (joblib or dask). ``process_shard`` is a pure function of its
task: it skips a shard that is already complete, records each bad video as a failure instead of raising, and writes
the shard atomically, so a killed run loses at most the shards in flight and a rerun redoes only those.

Any exception while one video is decoded or its flow computed fails that video, with the reason, and the run goes
on: up to ``max_failures`` videos (a count, or a fraction of the run's videos), after which the run stops with
:class:`TooManyFailures`; the finished shards are kept for a rerun.

With ``train`` (``extract-flow --train-dir TRAIN_DIR``) each shard's training shard is built by the same worker as
soon as its flow shard is complete, and the flow shard is then deleted (unless ``keep_flow``): the peak disk is the
training shards plus the flow shards in flight, not every flow shard (BENCHMARKS.md, issue 17). Both directories are
declared, locked and resumed as the two stages do them one after the other.

The schema (the output's identity) holds the decoding and the flow algorithm with its parameters; the backend,
device, batch size, timeout and library versions are recorded beside it, so ``--retry-failed --timeout 60`` or a
rerun after a library upgrade continues the same output.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from pipeline.build_rgbf import FollowOn, shard_task, train_output, up_to_date
from pipeline.build_rgbf import process_shard as build_shard
from pipeline.datasets import DatasetIndex, VideoRecord
from pipeline.decode import DecodeConfig, DecodeError, decode_video
from pipeline.errors import Asym3dError, ConfigError
from pipeline.flow import MIN_FRAME_SIDE, backend_record, flow_identity, make_backend
from pipeline.stage import DEFAULT_MAX_FAILURES, Output, ShardResult, Stage, TooManyFailures  # noqa: F401 - API
from pipeline.store import (FieldSpec, Schema, ShardWriter, StoreError, VideoMeta, damaged_shard, library_versions,
                            open_shard, os_reason, shard_name)
from pipeline.verify import Damage
from pipeline.tvl1_params import TVL1Params

# Flow is stored as int16 hundredths of a pixel with gzip: |error| <= 0.005 px per component (<= 0.0071 px in
# magnitude), range +-327 px, 0.18x the bytes of float32 where float16 gives 0.46x at best; TV-L1 runs at a few
# pairs/s, so gzip's write cost is invisible (bench/flow_storage.py, BENCHMARKS.md).
FLOW_FIELD = FieldSpec("flow", channels=2, dtype="int16", scale=100.0, compression="gzip", frames_offset=-1,
                       description="(u, v) displacement in pixels at the stored resolution, frame t -> t+1")
RGB_FIELD = FieldSpec("rgb", channels=3, dtype="uint8", compression="lzf",
                      description="decoded RGB frames, lossless (build-rgbf multiplies them by the flow magnitude)")
# Videos decoded at once by each shard's worker, ahead of the flow: ffmpeg decodes ~600-1800 frames/s per process
# here, a GPU solves more pairs than one process decodes.
DECODE_THREADS = 2


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract flow. The decoding (but its timeout), the algorithm and its parameters and the shard size make
    the schema a resume must match; backend, device, batch size and timeout are recorded (:meth:`recorded`)."""

    decode: DecodeConfig = DecodeConfig()
    backend: str = "auto"
    tvl1: TVL1Params = TVL1Params()
    device: str | None = None  # torch backend only
    batch_size: int | None = None  # torch backend only: frame pairs per batch, across videos (None: fill the device)
    solver: str = "auto"  # torch backend only: pipeline.flow.TORCH_SOLVERS
    videos_per_shard: int = 50
    flow_field: FieldSpec = FLOW_FIELD
    rgb_field: FieldSpec = RGB_FIELD

    def __post_init__(self) -> None:
        if min(self.decode.height, self.decode.width) < MIN_FRAME_SIDE:
            raise ConfigError(f"--size {self.decode.height}x{self.decode.width}: optical flow needs frames of at "
                              f"least {MIN_FRAME_SIDE} pixels a side")

    def schema(self) -> Schema:
        """The identity: no backend is built here, so a CPU login node can plan a run its GPU workers carry out."""
        decode = {k: v for k, v in dataclasses.asdict(self.decode).items() if k != "timeout_s"}
        return Schema(kind="flow", height=self.decode.height, width=self.decode.width,
                      fields=(self.rgb_field, self.flow_field),
                      config={"decode": decode, "flow": flow_identity(self.backend, self.tvl1),
                              "videos_per_shard": self.videos_per_shard})

    def recorded(self) -> dict:
        """What is asked (never compared on resume): library versions, backend options and limits. Each shard adds
        what really ran there (:func:`pipeline.flow.backend_record`), resolved by the worker that wrote it."""
        return {"libraries": library_versions(), "backend": self.backend, "device": self.device,
                "batch_size": self.batch_size, "solver": self.solver, "timeout_s": self.decode.timeout_s}

    def make_backend(self):
        """This worker's backend: ``auto`` and the device are resolved where the work runs, not where it was planned."""
        return make_backend(self.backend, self.tvl1, device=self.device, batch_size=self.batch_size,
                            solver=self.solver)


@dataclass(frozen=True)
class ShardTask:
    index: int
    out_dir: Path
    records: tuple[VideoRecord, ...]
    cfg: ExtractConfig
    schema: Schema  # declared once for the run, so every worker writes exactly what was declared
    recorded: dict  # what ran, stored in the shard
    retry_failed: bool = False


def process_shard(task: ShardTask) -> ShardResult:
    """Decode and compute flow for one shard's videos, unless the shard is already complete.

    With ``retry_failed``, a complete shard that recorded failures is rebuilt: its good videos are copied byte for
    byte and only the failed ones are tried again.
    """
    path = task.out_dir / shard_name(task.index)
    keep: dict[str, str] = {}  # video id -> key of a finished video in the existing shard
    if path.exists():
        with _reading(path) as f:
            failed = f.attrs.get("failures", "[]") != "[]"
            if not (task.retry_failed and failed):
                return _existing_result(task.index, f)
            keep = {str(g.attrs["video_id"]): k for k, g in f["videos"].items()}
    backend = task.cfg.make_backend()
    recorded = {**task.recorded, **backend_record(backend)}
    ok = frames_done = 0
    source = open_shard(path) if keep else None
    try:
        with ShardWriter(path, task.schema, task.index, recorded) as writer:
            todo = []
            for record in task.records:
                if record.video_id in keep:
                    writer.copy_video(source, keep[record.video_id])
                    ok += 1
                else:
                    todo.append(record)

            def decoded() -> Iterator[tuple[tuple[VideoRecord, np.ndarray], np.ndarray]]:
                """Decoded videos for the backend (decoding runs ahead); a video that fails to decode fails here."""
                for record, frames in decode_ahead(todo, task.cfg.decode):
                    if isinstance(frames, Exception):
                        writer.add_failure(record.video_id, str(record.path), _reason(record, frames))
                    else:
                        yield (record, frames), frames

            for (record, frames), flow in backend.compute_videos(decoded()):
                if isinstance(flow, Exception):
                    writer.add_failure(record.video_id, str(record.path), _reason(record, flow))
                    continue
                writer.add_video(VideoMeta(record.video_id, record.label, record.label_name, str(record.path),
                                           dict(record.splits)), {"rgb": frames, "flow": flow})
                ok += 1
                frames_done += len(frames)
    finally:
        if source is not None:
            source.close()
    return ShardResult(task.index, ok, writer.failures, frames_done, skipped=False, ran=_ran(backend))


@dataclass(frozen=True)
class ChainedTask:
    """One shard of ``extract-flow --train-dir``: its flow shard, then the training shard made from it."""

    flow: ShardTask
    train: FollowOn


def process_chained(task: ChainedTask) -> ShardResult:
    """Flow shard, then its training shard (what build-rgbf would write), then, unless ``keep_flow``, the flow shard
    deleted: the disk holds the training shards and only the flow shards in flight.

    Each step leaves a complete file or none, in this order, so a kill at any point loses at most this shard's work:
    a rerun finds the flow shard (and builds from it), the training shard (and deletes the flow shard left behind) or
    neither (and starts over). Under ``retry_failed`` a training shard that recorded failures is redone; its flow
    shard, if it was deleted, is recomputed whole (the good videos' flow is not kept anywhere else).
    """
    flow_path = task.flow.out_dir / shard_name(task.flow.index)
    train_path = Path(task.train.out_dir) / flow_path.name
    if train_path.exists() and (not flow_path.exists() or up_to_date(flow_path, train_path)):
        done = _shard_result(train_path, task.flow.index)
        if not (task.flow.retry_failed and done.failures):
            _drop_flow(flow_path, task.train)
            return done
    flow = process_shard(task.flow)
    built = build_shard(shard_task(flow_path, task.train.out_dir, task.flow.index, task.flow.schema, task.train.cfg))
    result = _shard_result(train_path, task.flow.index)
    _drop_flow(flow_path, task.train)
    return dataclasses.replace(result, frames=flow.frames, skipped=flow.skipped and built.skipped, ran=flow.ran)


def _shard_result(path: Path, index: int) -> ShardResult:
    """A complete shard's videos and failures (a training shard's failures include its flow shard's)."""
    with _reading(path) as f:
        return _existing_result(index, f)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[h5py.File]:
    """An existing shard opened for reading; what a damaged one raises while read becomes one DamagedError line."""
    with open_shard(path) as f:
        try:
            yield f
        except (OSError, KeyError, ValueError) as exc:
            raise damaged_shard(path, exc) from None


def _drop_flow(flow_path: Path, train: FollowOn) -> None:
    """Delete a flow shard whose training shard is complete, unless asked to keep it."""
    if not train.keep_flow:
        try:
            flow_path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"{flow_path}: cannot delete ({os_reason(exc)})") from None


def _ran(backend) -> str:
    """What computed a shard, for the summary (from its record): e.g. "torch on cuda:0 (compiled)" or "cpu"."""
    ran = backend_record(backend)
    return ran["backend"] + (f" on {ran['device']} ({ran['solver']})" if "solver" in ran else "")


def decode_ahead(records: list[VideoRecord], cfg: DecodeConfig, threads: int = DECODE_THREADS
                 ) -> Iterator[tuple[VideoRecord, np.ndarray | Exception]]:
    """Each record with its decoded frames (or the exception that stopped it), in order, decoding up to ``2 *
    threads`` videos ahead in threads (ffmpeg runs in its own process), so flow never waits for decoding."""
    def decode(record: VideoRecord) -> np.ndarray | Exception:
        try:
            frames = decode_video(record.path, cfg)
            if len(frames) < 2:
                raise DecodeError(record.path, f"{len(frames)} frame(s); optical flow needs at least 2")
            return frames
        except Exception as err:  # noqa: BLE001 - any failure fails this video only, with its reason
            return err

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures: collections.deque = collections.deque()
        for record in records:
            futures.append((record, pool.submit(decode, record)))
            if len(futures) > 2 * threads:
                done, future = futures.popleft()
                yield done, future.result()
        while futures:
            done, future = futures.popleft()
            yield done, future.result()


def _reason(record: VideoRecord, err: Exception) -> str:
    """One line: our own errors already name the file; anything else (a backend's cv2.error, a bug) gets the path
    and the exception type, so the failure list says what to look at."""
    if isinstance(err, Asym3dError):
        return str(err)
    text = " ".join(str(err).split()) or "no message"
    return f"{record.path}: {type(err).__name__}: {text[:240]}"


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
    repaired: tuple[Damage, ...] = ()  # damage found by --repair in shards that were then recomputed
    train: FollowOn | None = None  # --train-dir: where the training shards were built


def plan_shards(records: list[VideoRecord], videos_per_shard: int) -> list[tuple[VideoRecord, ...]]:
    """Videos sorted by id, cut into shards of ``videos_per_shard``: the same index gives the same plan."""
    if videos_per_shard < 1:
        raise ValueError("videos_per_shard must be at least 1")
    ordered = sorted(records, key=lambda r: r.video_id)
    return [tuple(ordered[i:i + videos_per_shard]) for i in range(0, len(ordered), videos_per_shard)]


def extract_flow(index: DatasetIndex, out_dir: Path, cfg: ExtractConfig, *, jobs: int = 1,
                 scheduler: str | None = None, overwrite: bool = False, retry_failed: bool = False,
                 repair: bool = False, progress: bool = True,
                 max_failures: int | float = DEFAULT_MAX_FAILURES,
                 train: FollowOn | None = None) -> ExtractSummary:
    """Run the stage over a dataset index; see the module docstring for the guarantees.

    The run holds ``out_dir``'s lock (:mod:`pipeline.lock`) throughout. ``repair`` first verifies every complete
    shard (:mod:`pipeline.verify`) and sets the damaged ones aside, so exactly those are recomputed.
    ``max_failures``: a count (int) or a fraction of the index's videos (float); more failed videos stop the run
    with :class:`TooManyFailures`. ``train``: build each shard's training shard as soon as its flow shard is
    complete (:func:`process_chained`), holding that directory's lock too; failures count the build's as well.
    """
    if not index.records:
        raise StoreError(f"{index.root}: the {index.kind} index holds no videos")
    schema, recorded = cfg.schema(), cfg.recorded()
    if scheduler is None:
        cfg.make_backend()  # the workers are this machine: refuse a backend it cannot run before writing anything
    plan = plan_shards(index.records, cfg.videos_per_shard)
    dataset = {"kind": index.kind, "classes": list(index.classes), "extra": index.extra}
    outputs = []
    if train is not None:
        if Path(train.out_dir).resolve() == Path(out_dir).resolve():
            raise StoreError(f"{train.out_dir}: the training-shard directory must differ from the flow directory")
        # so that `inspect FLOW_DIR` can say where its shards went
        recorded = {**recorded, "train_dir": str(Path(train.out_dir).resolve()), "keep_flow": train.keep_flow}
        outputs = [train_output(train.out_dir, schema, train.cfg)]
    with Stage([Output(out_dir, schema, recorded), *outputs], dataset, [[r.video_id for r in s] for s in plan],
               videos=len(index.records), max_failures=max_failures, overwrite=overwrite, repair=repair) as stage:
        tasks = [ShardTask(i, out_dir, shard, cfg, schema, recorded, retry_failed) for i, shard in enumerate(plan)]
        work = process_shard if train is None else process_chained
        tasks = tasks if train is None else [ChainedTask(task, train) for task in tasks]
        results = stage.run(work, tasks, desc="extract-flow", jobs=jobs, scheduler=scheduler, progress=progress)
    ran = ", ".join(sorted({r.ran for r in results if r.ran})) or f"{cfg.backend} (nothing left to compute)"
    return ExtractSummary(out_dir, ran, len(tasks), sum(r.skipped for r in results),
                          sum(r.videos_ok for r in results),
                          tuple(f for r in sorted(results, key=lambda r: r.index) for f in r.failures),
                          sum(r.frames for r in results), tuple(stage.warnings), tuple(stage.repaired), train)
