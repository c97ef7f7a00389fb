"""The extract-flow stage: decode every video, compute optical flow between consecutive frames, write flow shards.

``extract_flow`` plans shards (videos sorted by id, ``videos_per_shard`` each), declares the schema, and maps
``process_shard`` over the shards with the shared runner (joblib or dask). ``process_shard`` is a pure function of its
task: it skips a shard that is already complete, records each bad video as a failure instead of raising, and writes
the shard atomically, so a killed run loses at most the shards in flight and a rerun redoes only those.

Any exception while one video is decoded or its flow computed fails that video, with the reason, and the run goes
on: up to ``max_failures`` videos (a count, or a fraction of the run's videos), after which the run stops with
:class:`TooManyFailures`; the finished shards are kept for a rerun.

With ``train`` (``extract-flow --train-dir TRAIN_DIR``) each shard's training shard is made in memory by the same
worker (:func:`process_chained`): the flow rounded to its stored precision, the training frames computed from it and
the decoded frames, byte for byte the shard build-rgbf writes from the flow shard, which is never written (unless
``keep_flow``). The peak disk is the training shards alone, and the host does none of the flow shard's compression,
checksums, reading back and deletion (BENCHMARKS.md, issue 21). Both directories are declared, locked and resumed
by the stage driver (:mod:`pipeline.stage`). With ``encode_workers`` (``--jobs 1``, or per dask worker) the
process holding the flow backend keeps decoding ahead and computing flow while a pool of that many processes makes
the training images and JPEG, in a bounded window written back in order: one device owner fed and drained by CPU
pools.

The schema (the output's identity) holds the decoding and the flow algorithm with its parameters; the backend,
device, batch size, timeout and library versions are recorded beside it, so ``--retry-failed --timeout 60`` or a
rerun after a library upgrade continues the same output.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from pipeline.build_rgbf import FollowOn, shard_task, train_output, up_to_date, video_training_frames
from pipeline.build_rgbf import process_shard as build_shard
from pipeline.datasets import DatasetIndex, VideoRecord
from pipeline.decode import DecodeConfig, DecodeError, decode_video
from pipeline.errors import Asym3dError, ConfigError
from pipeline.flow import MIN_FRAME_SIDE, backend_record, flow_identity, make_backend
from pipeline.stage import DEFAULT_MAX_FAILURES, Output, ShardResult, Stage, TooManyFailures  # noqa: F401 - API
from pipeline.rgbf import RGBFError
from pipeline.runner import exit_with_parent
from pipeline.store import (FieldSpec, Schema, ShardWriter, StoreError, VideoMeta, damaged_shard, decode_field,
                            encode_values, library_versions, open_shard, os_reason, shard_name, stored_values)
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
    # --train-dir: processes that compute the training images and JPEG while this one decodes ahead and runs the
    # flow backend (0: in this process). One device owner, its CPU pools: see process_chained.
    encode_workers: int = 0

    def __post_init__(self) -> None:
        if self.encode_workers < 0:
            raise ConfigError(f"--encode-workers must be 0 or more, got {self.encode_workers}")
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
                "batch_size": self.batch_size, "solver": self.solver, "timeout_s": self.decode.timeout_s,
                "encode_workers": self.encode_workers}

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
    if path.exists():
        with _reading(path) as f:
            if not (task.retry_failed and f.attrs.get("failures", "[]") != "[]"):
                return _existing_result(task.index, f)
    backend = task.cfg.make_backend()
    recorded = {**task.recorded, **backend_record(backend)}
    ok = frames_done = 0
    with ShardWriter(path, task.schema, task.index, recorded) as writer:
        todo = _copy_finished(path if path.exists() else None, task.records, writer)
        ok = len(task.records) - len(todo)
        for record, frames, flow in _computed(todo, task.cfg, backend, writer):
            writer.add_video(_meta(record), {"rgb": frames, "flow": flow})
            ok += 1
            frames_done += len(frames)
    return ShardResult(task.index, ok, writer.failures, frames_done, skipped=False, ran=_ran(backend))


def _copy_finished(earlier: Path | None, records: tuple[VideoRecord, ...], writer: ShardWriter
                   ) -> list[VideoRecord]:
    """Copy the videos ``earlier`` (a complete shard being retried, or None) finished into ``writer`` byte for
    byte, in plan order; returns the records still to compute."""
    if earlier is None:
        return list(records)
    with _reading(earlier) as source:
        keep = {str(g.attrs["video_id"]): k for k, g in source["videos"].items()}
        for record in records:
            if record.video_id in keep:
                writer.copy_video(source, keep[record.video_id])
    return [record for record in records if record.video_id not in keep]


def _computed(records: list[VideoRecord], cfg: ExtractConfig, backend, writer: ShardWriter
              ) -> Iterator[tuple[VideoRecord, np.ndarray, np.ndarray]]:
    """``(record, frames, flow)`` for each video that decodes and whose flow computes, in order; each one that
    fails is recorded in ``writer`` with its reason. Decoding runs ahead of the backend (:func:`decode_ahead`)."""
    def decoded() -> Iterator[tuple[tuple[VideoRecord, np.ndarray], np.ndarray]]:
        for record, frames in decode_ahead(records, cfg.decode):
            if isinstance(frames, Exception):
                writer.add_failure(record.video_id, str(record.path), _reason(record, frames))
            else:
                yield (record, frames), frames

    for (record, frames), flow in backend.compute_videos(decoded()):
        if isinstance(flow, Exception):
            writer.add_failure(record.video_id, str(record.path), _reason(record, flow))
        else:
            yield record, frames, flow


def _meta(record: VideoRecord) -> VideoMeta:
    return VideoMeta(record.video_id, record.label, record.label_name, str(record.path), dict(record.splits))


@dataclass(frozen=True)
class ChainedTask:
    """One shard of ``extract-flow --train-dir``: its training shard, made in memory from the decoded frames (and
    its flow shard too with ``keep_flow``)."""

    flow: ShardTask
    train: FollowOn
    train_schema: Schema  # declared once for the run


def process_chained(task: ChainedTask) -> ShardResult:
    """The training shard build-rgbf would write from this shard's flow shard, byte for byte, made in memory: the
    flow is rounded to its stored precision (:data:`FLOW_FIELD`) and the training frames computed from it and the
    decoded frames, so no flow shard is written, read back and deleted (``keep_flow`` writes it too, closed just
    before the training shard).

    A shard is one file per directory, complete or absent, so a kill loses at most the shards in flight. A flow shard
    found on disk (``keep_flow``, or a run of an earlier version killed between its two steps) is built from as
    build-rgbf does, then deleted unless kept. Under ``retry_failed`` a training shard that recorded failures is
    rewritten: its good videos copied byte for byte (or, with ``keep_flow``, from the flow shard) and only the failed
    ones computed again.
    """
    flow_path = task.flow.out_dir / shard_name(task.flow.index)
    train_path = Path(task.train.out_dir) / flow_path.name
    if train_path.exists() and (not flow_path.exists() or up_to_date(flow_path, train_path)):
        done = _shard_result(train_path, task.flow.index)
        if not (task.flow.retry_failed and done.failures):
            _drop_flow(flow_path, task.train)
            return done
    if flow_path.exists():
        flow = process_shard(task.flow)
        built = build_shard(shard_task(flow_path, task.train.out_dir, task.flow.index, task.flow.schema,
                                       task.train.cfg))
        result = _shard_result(train_path, task.flow.index)
        _drop_flow(flow_path, task.train)
        return dataclasses.replace(result, frames=flow.frames, skipped=flow.skipped and built.skipped, ran=flow.ran)
    return _chained_in_memory(task, train_path if train_path.exists() and not task.train.keep_flow else None)


def _chained_in_memory(task: ChainedTask, earlier: Path | None) -> ShardResult:
    """Decode, compute flow, write the training shard (and with ``keep_flow`` the flow shard); ``earlier``: a
    complete training shard being retried, whose finished videos are copied."""
    flow_task, cfg = task.flow, task.flow.cfg
    backend = cfg.make_backend()
    names = tuple(task.train_schema.field_names)
    ok = frames_done = 0
    build_failures: list[tuple[VideoRecord, str]] = []  # recorded after the flow's, as build-rgbf records them
    with contextlib.ExitStack() as writers:  # closed in reverse: the flow shard first, then the training shard
        train = writers.enter_context(ShardWriter(Path(task.train.out_dir) / shard_name(flow_task.index),
                                                  task.train_schema, flow_task.index,
                                                  {"libraries": library_versions()}))
        flow_out = None
        if task.train.keep_flow:
            flow_out = writers.enter_context(ShardWriter(
                flow_task.out_dir / shard_name(flow_task.index), flow_task.schema, flow_task.index,
                {**flow_task.recorded, **backend_record(backend)}))
        todo = _copy_finished(earlier, flow_task.records, train)
        ok = len(flow_task.records) - len(todo)
        pool = _encode_pool(cfg.encode_workers) if cfg.encode_workers else None
        window: collections.deque = collections.deque()  # (record, training frames or their future), in order

        def write_oldest() -> None:
            nonlocal ok
            record, training = window.popleft()
            try:
                training = training.result() if pool is not None else training
            except RGBFError as exc:
                build_failures.append((record, f"build-rgbf: {exc}"))
                return
            train.add_video(_meta(record), {name: training[name] for name in names})
            ok += 1

        for record, frames, flow in _computed(todo, cfg, backend, flow_out or train):
            if flow_out is not None:
                flow_out.add_video(_meta(record), {"rgb": frames, "flow": flow})
            frames_done += len(frames)
            if pool is not None:  # int16 as stored: half the bytes to send, the same numbers read back
                window.append((record, pool.submit(_training_video, frames, encode_values(cfg.flow_field, flow),
                                                   cfg.flow_field, task.train_schema, task.train.cfg.flow_bound)))
            else:
                try:
                    window.append((record, _training_video(frames, flow, cfg.flow_field, task.train_schema,
                                                           task.train.cfg.flow_bound)))
                except RGBFError as exc:
                    build_failures.append((record, f"build-rgbf: {exc}"))
            while len(window) > (2 * cfg.encode_workers if pool is not None else 0):
                write_oldest()
        while window:
            write_oldest()
        if flow_out is not None:
            for failure in flow_out.failures:
                train.add_failure(failure["video_id"], failure["path"], failure["reason"])
        for record, reason in build_failures:
            train.add_failure(record.video_id, str(record.path), reason)
    return ShardResult(flow_task.index, ok, train.failures, frames_done, skipped=False, ran=_ran(backend))


def _training_video(frames: np.ndarray, flow: np.ndarray, field: FieldSpec, schema: Schema, flow_bound: float
                    ) -> dict:
    """One video's training frames from its decoded frames and its flow: float flow is rounded to ``field``'s stored
    precision step by step; integer flow is as ``field`` stores it. Module-level: the encode pool runs it."""
    if np.issubdtype(flow.dtype, np.floating):
        flow_of = (lambda a, b: stored_values(field, flow[a:b]))
    else:
        flow_of = (lambda a, b: decode_field(field, flow[a:b]))
    return video_training_frames(len(frames), lambda a, b: frames[a:b], flow_of, schema, flow_bound)


@functools.lru_cache(maxsize=1)
def _encode_pool(workers: int) -> ProcessPoolExecutor:
    """This process's pool for the training images and JPEG (``ExtractConfig.encode_workers``), started once and
    kept for every shard; its processes exit with this one (:func:`pipeline.runner.exit_with_parent`). A dask
    worker started as a daemonic process (dask's default) cannot have children: one line says how to start it."""
    if multiprocessing.current_process().daemon:
        raise ConfigError(f"--encode-workers {workers}: this worker process is daemonic and cannot start processes; "
                          "start the dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False")
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


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
            if record.refused:
                raise DecodeError(record.path, record.refused)
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
    if cfg.encode_workers and jobs != 1:
        # The pool is started by the process holding the backend; joblib's worker processes cannot start one.
        raise ConfigError("--encode-workers runs with --jobs 1 (one process holding the flow backend) or "
                          "--scheduler (each dask worker holding one), not with --jobs N")
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
        tasks = tasks if train is None else [ChainedTask(task, train, outputs[0].schema) for task in tasks]
        results = stage.run(work, tasks, desc="extract-flow", jobs=jobs, scheduler=scheduler, progress=progress)
    ran = ", ".join(sorted({r.ran for r in results if r.ran})) or f"{cfg.backend} (nothing left to compute)"
    return ExtractSummary(out_dir, ran, len(tasks), sum(r.skipped for r in results),
                          sum(r.videos_ok for r in results),
                          tuple(f for r in sorted(results, key=lambda r: r.index) for f in r.failures),
                          sum(r.frames for r in results), tuple(stage.warnings), tuple(stage.repaired), train)
