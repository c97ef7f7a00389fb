"""The device check: every CUDA path of asym3d run, checked and timed in one short call (issue 12).

Why one script: CI has no GPU, and a GPU machine is lent to only some sessions, for minutes, bare (no internet, no
package registry). So the inputs are made here, travel with the tree, and one command on the device runs every
section under its own time limit, printing progress as it goes, and writes one Markdown report (``OUT/gpu_check.md``)
that goes into BENCHMARKS.md verbatim. ``--smoke`` runs the same code on the CPU at tiny sizes; the test suite runs it,
so the script cannot rot between the sessions that have a GPU.

Sections (each checks, then times; a failed check or an error fails its section, the others still run):

- tvl1: torch TV-L1 (``pipeline.tvl1_torch``) on the device against OpenCV's CPU TV-L1 computed here, on real frames
  at 171x128 and 340x256 (mean end-point error <= 0.05 px) for every solver; pairs/s and peak memory over batch
  sizes.
- extract: videos to training shards on the device (issue 21): ``extract-flow --train-dir --backend torch`` end to
  end on >= 20,000 real pairs (the carried clips linked under new names), pairs/s, the solver's share of the wall
  time, peak host and device memory (``bench/extract_e2e.py``); then the solver alone at batch 1024, compiled with
  and without CUDA graphs (torch.compile's reduce-overhead).
- train: the trainer itself (``model.train.train``: bf16 autocast, channels_last_3d and cuDNN autotuning on CUDA)
  overfits c3d-b5, b5-asyConv345, b5-M2 and asym3d on real clips, eager and with ``--compile`` (loss finite and
  falling); one resumed epoch; a checkpoint round trip.
- steps (issue 25): training-step time at 16x112x112 of the b5 family, c3d-b8, b8-asyConv345 and asym3d as a ratio
  to the baseline, beside the MAC ratio and the paper's Table 2 ratio, per cell of precision (fp32, tf32, bf16) x
  batch (16, 64) x mode (eager, CUDA graph, compiled) -- :class:`SpeedPlan` orders them and says what they cost.
- stages: each conv stage's forward + backward alone, c3d-b5 vs b5-asyConv345 and c3d-b8 vs b8-asyConv345, beside
  its arithmetic and fewest-bytes floors, with the profiler's kernel list.
- fused: the fused cascade's Triton kernel against the eager cascade (agreement on fresh random inputs of the real
  stage shapes), then per stage and per training step beside the eager cascade.
- loader: training clips/s from the carried JPEG shards with N DataLoader workers against the trainer's demand.
- evaluate: a checkpoint trained on the device evaluated on the device and on the CPU (same predictions); views/s of
  the paper's 25 clips x 10 crops protocol.
- predict: ``asym3d predict``'s views/s on the device (issue 23): real clips decoded, their input made as the run's
  shards were (an RGB run; an RGBF run with the torch TV-L1 on the device) and scored with 25 clips x 10 crops.
- ddp: one DistributedDataParallel training step in a one-process group (NCCL on CUDA, gloo on CPU) against the same
  step without DDP.

Here (the project's .venv; needs ffmpeg, OpenCV contrib and ``../shared/data/real_clips``):

    make gpu-check-inputs    # bench/gpu_check.py --prepare .gpu_check, plus the four wheels the device lacks
                             # (GPU_WHEELS: simplejpeg, ffmpeg-python, its dependency future, imageio-ffmpeg)

On the device (the device tool's ``run``): carry ``[".gpu_check"]`` (inputs and wheels, 49 MiB; the tree itself is
~5 MiB), command ``make gpu-check GPU_OUT=$OUT GPU_SECTIONS=...``. A session has 15 minutes of device time in all
(the machine's start included) and one call runs at most 600 s, while the sections' limits add up to 915 s; a
section cut by its limit skips its last cells (each section orders them by priority) and says so. So, per session:

1. ``GPU_SECTIONS=extract,steps`` (issues 21 and 25: 440 s, timeout_s 500);
2. at once, on the still-warm machine, ``GPU_SECTIONS=stages,fused`` (130 s, timeout_s 170), then ``give_back``;
3. the regression sections ``tvl1,train,loader,evaluate,ddp,predict`` (345 s, timeout_s ~420) in a later session.

Everything else it imports (torch, triton, numpy, h5py, joblib, tqdm, matplotlib, opencv-python-headless) is in the
device's image; OpenCV contrib is never imported there (its TV-L1 references are computed here).

Smoke (what the tests run): ``bench/gpu_check.py --prepare DIR --smoke && bench/gpu_check.py --inputs DIR --smoke
--out OUT`` (under 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # run as a file from anywhere: the project and its bench helpers

import model  # noqa: E402
import step_time  # noqa: E402
from loader_vs_trainer import loader_rate  # noqa: E402
from model.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from model.evaluate import evaluate_split  # noqa: E402
from model.train import TrainConfig, train  # noqa: E402
from pipeline.store import VideoMeta  # noqa: E402
from pipeline.tvl1_torch import TVL1Params, rgb_to_gray, tvl1_flow_frames, tvl1_flow_torch  # noqa: E402
from train_shards import write_train_shards  # noqa: E402

# The paper's Table 2 training speed (s/iter, batch 16 on its GPU), for the ratio to each family's baseline.
PAPER_S_PER_ITER = {
    "c3d-b5": 1.10, "b5-asyConv3": 0.85, "b5-asyConv4": 0.94, "b5-asyConv5": 0.94, "b5-asyConv34": 0.82,
    "b5-asyConv35": 0.82, "b5-asyConv45": 0.83, "b5-asyConv345": 0.81,
    "c3d-b8": 1.28, "b8-asyConv3": 0.99, "b8-asyConv4": 1.00, "b8-asyConv5": 1.03, "b8-asyConv34": 0.95,
    "b8-asyConv35": 0.97, "b8-asyConv45": 0.97, "b8-asyConv345": 0.93,
}
COMPILE_NEEDS_S = 30.0  # a compiled overfit run starts only with this much of the section left (compile time)
FUSED_FP32_BOUND = 1e-5  # of the output's scale: the CPU interpreter measured 2e-7 (tests/test_fused_cascade.py)
FUSED_BF16_EXTRA = 2 ** -9  # of the scale, above the eager bf16 cascade's own error (as in the tests)
EPE_BOUND = 0.05  # px, mean end-point error against OpenCV's CPU TV-L1 (issue 11's exactness contract)
REAL_CLIPS = [REPO.parent / "shared" / "data" / "real_clips", REPO / "tests" / "data" / "real_clips"]


# ------------------------------------------------------------------------------------------------ speed plan


Cell = tuple[str, int, str, tuple[str, ...]]  # (precision, batch, mode, nets): one round-robin of training steps
B5_FAMILY = tuple(n for n in model.list_models() if n == "c3d-b5" or n.startswith("b5-"))
PAIRS = ("c3d-b5", "b5-asyConv345", "c3d-b8", "b8-asyConv345", "asym3d")  # issue 25's goal networks


@dataclass(frozen=True)
class SpeedPlan:
    """What the speed sections measure (issue 25), cells in priority order: a section's time limit cuts the last.

    Estimate for FULL from the H200's run 2 (bf16, batch 16, eager: 10-14 ms per step, 21 nets in 34 s with building
    and cuDNN autotuning, ~1.6 s a net): bf16 eager cells ~25 s (batch 16) and ~35 s (batch 64) for 16 nets; graph
    cells ~2 s a net; tf32 and fp32 eager cells ~15-30 s for 5 nets (fp32 without tensor cores: ~40-300 ms a step);
    a compiled cell ~15 s of compiling a net (run 1: 9-15 s more than eager per overfit run). steps' 200 s cover
    the bf16, tf32 and fp32 eager and graph cells and the first compiled cell; the later compiled cells run if time
    is left. stages ~30 s a batch size, fused ~60 s with Triton's compiling. With ~20 s of start-up each, steps
    (beside extract) and stages + fused fit the session's two calls (see the module docstring)."""

    clip: tuple[int, int, int]
    rounds: int  # timed rounds
    warmup: int  # untimed rounds first
    cells: tuple[Cell, ...]
    stage_pairs: tuple[tuple[str, str], ...]  # (baseline, variant) broken down per stage
    stage_batches: tuple[int, ...]
    stage_kernels: int  # profiler kernels listed per stage and net (at the first stage batch)
    fused_shapes: tuple[tuple[int, int, int, int, int, int], ...]  # (C, N, T, H, W, k) at batch 2; k 3: ASYM_3
    fused_stage_nets: tuple[str, ...]  # eager vs fused cascade per stage, bf16 at the first stage batch
    fused_cells: tuple[Cell, ...]  # training steps with "<net> fused" beside the eager nets


SPEED_FULL = SpeedPlan(
    clip=(16, 112, 112), rounds=10, warmup=2,
    cells=(("bf16", 16, "eager", B5_FAMILY + PAIRS[2:]), ("bf16", 64, "eager", B5_FAMILY + PAIRS[2:]),
           ("bf16", 16, "graphs", PAIRS), ("bf16", 64, "graphs", PAIRS),
           ("tf32", 16, "eager", PAIRS), ("tf32", 64, "eager", PAIRS),
           ("fp32", 16, "eager", PAIRS), ("fp32", 64, "eager", PAIRS),
           ("tf32", 16, "graphs", PAIRS), ("fp32", 16, "graphs", PAIRS),
           ("bf16", 16, "compiled", PAIRS),
           ("tf32", 64, "graphs", PAIRS), ("fp32", 64, "graphs", PAIRS),
           ("bf16", 64, "compiled", PAIRS), ("tf32", 16, "compiled", PAIRS), ("fp32", 16, "compiled", PAIRS)),
    stage_pairs=(("c3d-b5", "b5-asyConv345"), ("c3d-b8", "b8-asyConv345")), stage_batches=(16, 64),
    stage_kernels=8,
    # the cascades of b5 conv3-5, b8 conv3-5 and asym3d's MicroNets (M2's left column, M3's middle) at batch 2
    fused_shapes=((128, 256, 8, 28, 28, 3), (256, 256, 4, 14, 14, 3), (256, 256, 2, 7, 7, 3),
                  (128, 256, 8, 28, 28, 5), (256, 512, 4, 14, 14, 5), (512, 512, 2, 7, 7, 5),
                  (16, 32, 8, 28, 28, 5), (192, 256, 2, 7, 7, 3)),
    fused_stage_nets=("b5-asyConv345", "b8-asyConv345"),
    fused_cells=(("bf16", 16, "eager", ("c3d-b5", "b5-asyConv345", "b5-asyConv345 fused", "c3d-b8", "b8-asyConv345",
                                        "b8-asyConv345 fused", "asym3d", "asym3d fused")),
                 ("bf16", 16, "graphs", ("b5-asyConv345", "b5-asyConv345 fused", "b8-asyConv345",
                                         "b8-asyConv345 fused")),
                 ("bf16", 64, "eager", ("b5-asyConv345", "b5-asyConv345 fused", "b8-asyConv345",
                                        "b8-asyConv345 fused"))),
)
SPEED_SMOKE = SpeedPlan(
    clip=(16, 32, 32), rounds=1, warmup=0,
    cells=(("bf16", 2, "eager", ("c3d-b5", "b5-asyConv3", "b5-M2", "c3d-b8", "b8-asyConv3", "asym3d")),
           ("fp32", 2, "eager", ("c3d-b5", "b5-asyConv345")), ("bf16", 2, "graphs", ("c3d-b5", "b5-asyConv345"))),
    stage_pairs=(("c3d-b5", "b5-asyConv345"),), stage_batches=(2,), stage_kernels=3,
    fused_shapes=((5, 16, 3, 4, 5, 3), (20, 24, 2, 3, 17, 5)),
    # b5-M4's cascades are small (conv5 at 2x2x2): the interpreter runs its fused step in seconds, not minutes
    fused_stage_nets=(), fused_cells=(("fp32", 1, "eager", ("b5-M4", "b5-M4 fused")),),
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: ``FULL`` fills a GPU within the budget, ``SMOKE`` runs the same code on 2 CPU cores."""

    flow_sources: dict[str, list[tuple[str, int, int]]]  # WxH -> (clip, first frame, frames) for the references
    shard_sources: list[str]  # one class per clip: windows of it become that class's videos
    shard_windows: int  # videos per class (the last tests, the others train)
    shard_frames: int
    tvl1_batches: dict[str, list[int]]
    overfit_models: list[str]
    compile_models: list[str]
    overfit: dict[str, Any]  # TrainConfig fields of the overfit runs
    speed: SpeedPlan  # the sections steps, stages and fused (issue 25)
    loader_workers: list[int]
    loader_batches: int
    eval_compare_clips: int
    eval_batches: list[int]
    eval_workers: int
    tvl1_solvers: list[str]
    extract_clips: list[str]  # real videos carried for extract-flow, one class per clip's folder
    extract_solvers: list[str]
    extract_max_frames: int
    extract_pairs: int  # real pairs end to end: the carried clips repeated under new names until there are this many
    extract_encode_workers: list[int]  # --encode-workers per end-to-end run (0: the backend's process does it all)
    solver_batch: int  # the solver alone, per solver mode (see section_extract)
    solver_modes: list[str]
    limits: dict[str, float] = field(default_factory=dict)  # section -> seconds


UCF = "ucf101/{0}/v_{0}_{1}.avi".format
TAI_CHI = "other/kinetics400_tai_chi/ta_chi.mp4"
FULL = Plan(
    flow_sources={"171x128": [(UCF("Basketball", "g01_c01"), 20, 9), (UCF("PushUps", "g02_c03"), 20, 9),
                              (UCF("Punch", "g03_c01"), 20, 9)],
                  "340x256": [(TAI_CHI, 40, 5),
                              ("other/kinetics400_clean_and_jerk/clean_and_jerk.mp4", 40, 5)]},
    shard_sources=[UCF("ApplyEyeMakeup", "g01_c01"), UCF("Basketball", "g01_c01"), UCF("PushUps", "g02_c03"),
                   UCF("Punch", "g03_c01")],
    shard_windows=3, shard_frames=48,
    tvl1_batches={"171x128": [256, 1024, 4096], "340x256": [256, 1024]},
    overfit_models=["c3d-b5", "b5-asyConv345", "b5-M2", "asym3d"],
    compile_models=["c3d-b5", "b5-asyConv345", "b5-M2", "asym3d"],
    overfit={"clip_len": 16, "crop": 112, "batch_size": 4, "epochs": 8, "lr": 1e-4, "dropout": 0.0, "workers": 4},
    speed=SPEED_FULL,
    loader_workers=[0, 2, 4, 8, 16], loader_batches=40,
    eval_compare_clips=2, eval_batches=[30, 250], eval_workers=8,
    tvl1_solvers=["eager", "compiled", "fused"],
    extract_clips=[UCF(c, g) for c, g in (("ApplyEyeMakeup", "g01_c01"), ("Archery", "g01_c01"),
                                           ("BaseballPitch", "g01_c01"), ("Basketball", "g01_c01"),
                                           ("Basketball", "g02_c03"), ("Biking", "g05_c02"), ("HeadMassage", "g02_c05"),
                                           ("PlayingGuitar", "g16_c02"), ("Punch", "g03_c01"), ("PushUps", "g02_c03"),
                                           ("Shotput", "g05_c02"))],
    # encode workers 8 (the host path issue 21 builds) first, so that the limit cuts the single-process row
    extract_solvers=["compiled"], extract_max_frames=20000, extract_pairs=20000, extract_encode_workers=[8, 0],
    solver_batch=1024, solver_modes=["compiled", "reduce-overhead"],
    limits={"tvl1": 110, "extract": 240, "train": 130, "steps": 200, "stages": 60, "fused": 70, "loader": 20,
            "evaluate": 30, "ddp": 15, "predict": 40},
)
SMOKE = Plan(
    flow_sources={"171x128": [(UCF("PushUps", "g02_c03"), 20, 3)], "340x256": [(TAI_CHI, 40, 2)]},
    shard_sources=[UCF("PushUps", "g02_c03"), TAI_CHI],
    shard_windows=3, shard_frames=16,
    tvl1_batches={"171x128": [1, 2], "340x256": [1]},
    overfit_models=["c3d-b5", "asym3d"],
    compile_models=[],
    overfit={"clip_len": 16, "crop": 16, "batch_size": 2, "epochs": 8, "lr": 1e-4, "dropout": 0.0, "workers": 1},
    speed=SPEED_SMOKE,
    loader_workers=[0, 1], loader_batches=2,
    eval_compare_clips=1, eval_batches=[30], eval_workers=0,
    tvl1_solvers=["eager", "fused"],
    extract_clips=[UCF("PushUps", "g02_c03"), TAI_CHI], extract_solvers=["eager"], extract_max_frames=3,
    extract_pairs=8, extract_encode_workers=[1], solver_batch=2, solver_modes=["eager"],
    limits={"tvl1": 60, "extract": 150, "train": 60, "steps": 60, "stages": 60, "fused": 90, "loader": 20,
            "evaluate": 30, "ddp": 20, "predict": 60},
)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ inputs (here)


def find_clip(relative: str) -> Path:
    for root in REAL_CLIPS:
        if (root / relative).is_file():
            return root / relative
    raise SystemExit(f"{relative}: not found under {' or '.join(map(str, REAL_CLIPS))}")


def prepare(dest: Path, plan: Plan) -> None:
    """Write the inputs the device cannot make: decoded real frames with OpenCV CPU TV-L1 references, and shards."""
    from pipeline.decode import DecodeConfig, decode_video  # ffmpeg: here only
    from pipeline.flow import make_backend  # OpenCV contrib's TV-L1: here only

    dest.mkdir(parents=True, exist_ok=True)
    opencv = make_backend("cpu", TVL1Params())
    for size, sources in plan.flow_sources.items():
        width, height = (int(v) for v in size.split("x"))
        arrays: dict[str, np.ndarray] = {}
        for i, (clip, first, count) in enumerate(sources):
            frames = decode_video(find_clip(clip), DecodeConfig(height=height, width=width,
                                                                max_frames=first + count))[first:]
            start = time.perf_counter()
            arrays[f"frames{i}"], arrays[f"flow{i}"] = frames, opencv.compute(frames)
            log(f"prepare: {clip} at {size}: {len(frames) - 1} OpenCV TV-L1 pairs in "
                f"{time.perf_counter() - start:.1f} s")
        np.savez_compressed(dest / f"tvl1_{size}.npz", **arrays)
    videos = []
    classes = [f"{Path(clip).parent.name}{i}" for i, clip in enumerate(plan.shard_sources)]
    for label, clip in enumerate(plan.shard_sources):
        frames = decode_video(find_clip(clip), DecodeConfig(max_frames=400))
        starts = np.linspace(0, len(frames) - plan.shard_frames, plan.shard_windows).astype(int)
        for w, start in enumerate(starts):
            subset = "test" if w == plan.shard_windows - 1 else "train"
            meta = VideoMeta(f"{classes[label]}/w{w}", label, classes[label], splits={1: subset})
            videos.append((meta, frames[start:start + plan.shard_frames]))
    write_train_shards(dest / "shards", videos, classes)
    frames = {}
    for clip in plan.extract_clips:  # extract-flow's input, as a folder dataset ROOT/<class>/<video>
        target = dest / "videos" / Path(clip).parent.name / Path(clip).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(find_clip(clip), target)
        frames[clip] = len(decode_video(target, DecodeConfig(max_frames=plan.extract_max_frames)))
    (dest / "videos.json").write_text(json.dumps(frames, indent=1))  # how often to repeat them for extract_pairs
    log(f"prepare: {len(videos)} videos of {plan.shard_frames} frames in {dest / 'shards'}")


# ------------------------------------------------------------------------------------------------ sections


class Section:
    """One section's report lines, its verdict and its time limit (checked between steps: GPU work is not cut)."""

    def __init__(self, name: str, limit_s: float):
        self.name, self.limit_s = name, limit_s
        self.start = time.monotonic()
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.limit_s - (time.monotonic() - self.start)

    def has_time(self, what: str, needs_s: float = 0.0) -> bool:
        """False (and the step recorded as skipped) once the limit is reached or ``needs_s`` would pass it."""
        if self.left() > needs_s:
            return True
        self.skipped.append(what)
        log(f"{self.name}: skipped {what} (section limit {self.limit_s:.0f} s)")
        return False

    def check(self, ok: bool, what: str) -> str:
        if not ok:
            self.failures.append(what)
        return "ok" if ok else "**FAILED**"

    def attempt(self, what: str, step: Callable[[], Any]) -> Any:
        """Run one step; an exception fails the step (traceback in the report) and the section goes on."""
        try:
            return step()
        except Exception as exc:  # one broken step must not hide the steps after it
            self.failures.append(f"{what}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
            self.lines += ["", f"{what} raised:", "```", *traceback.format_exc().strip().splitlines()[-20:], "```", ""]
            log(f"{self.name}: {what}: ERROR {type(exc).__name__}: {exc}")
            traceback.print_exc()
            return None

    @property
    def status(self) -> str:
        if self.failures:
            return "FAILED: " + "; ".join(self.failures)
        return "ok" + (f" (skipped at the time limit: {', '.join(self.skipped)})" if self.skipped else "")


@dataclass
class Context:
    plan: Plan
    device: torch.device
    inputs: Path
    work: Path
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # results one section leaves for a later one

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> str:
        if self.device.type != "cuda":
            return "n/a"
        return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f}"


def end_point_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(axis=-1))


def section_tvl1(ctx: Context, sec: Section) -> None:
    solvers = ctx.plan.tvl1_solvers
    sec.lines += ["Correctness: `tvl1_flow_frames` (the torch backend's path: uint8 to the device, batched pairs) "
                  f"against OpenCV's CPU TV-L1 computed at preparation, default parameters; bound mean EPE <= "
                  f"{EPE_BOUND} px for every solver.", "",
                  "| size | pairs | solver | mean EPE px | max EPE px | EPE to eager px | check |",
                  "|---|---:|---|---:|---:|---:|---|"]
    grays: dict[str, np.ndarray] = {}
    for size in ctx.plan.tvl1_batches:
        data = np.load(ctx.inputs / f"tvl1_{size}.npz")
        clips = [data[k] for k in sorted(data.files) if k.startswith("frames")]
        refs = np.concatenate([data[k.replace("frames", "flow")] for k in sorted(data.files) if k.startswith("frames")])
        grays[size] = np.stack([g for c in clips for g in zip(rgb_to_gray(c)[:-1], rgb_to_gray(c)[1:])])
        eager = None
        for solver in solvers:
            if not sec.has_time(f"tvl1 correctness {size} {solver}"):
                continue
            ours = np.concatenate([tvl1_flow_frames(c, device=ctx.device, batch_size=len(c), solver=solver)
                                   for c in clips])
            eager = ours if solver == "eager" else eager
            errors = end_point_error(ours, refs)
            to_eager = f"{end_point_error(ours, eager).mean():.4f}" if eager is not None else ""
            ok = sec.check(errors.mean() <= EPE_BOUND, f"{size} {solver} mean EPE {errors.mean():.4f} px")
            sec.lines.append(f"| {size} | {len(refs)} | {solver} | {errors.mean():.4f} | {errors.max():.3f} | "
                             f"{to_eager} | {ok} |")
            log(f"tvl1: {size} {solver} mean EPE {errors.mean():.4f} px")
    sec.lines += ["", "Speed: `tvl1_flow_torch` on batches of real pairs (the prepared pairs repeated) already on the "
                  "device, one call per batch after a warm-up call per size and solver (the compiled solver's compile "
                  "time is in the warm-up); peak = the allocator's peak in the call.", "",
                  "| size | batch | solver | s per batch | pairs/s | peak GiB |", "|---|---:|---|---:|---:|---:|"]
    params = TVL1Params()
    for size, batches in ctx.plan.tvl1_batches.items():
        pairs = torch.from_numpy(grays[size]).to(ctx.device).float()  # (P, 2, H, W)
        for solver in solvers:
            if not sec.has_time(f"tvl1 speed at {size} ({solver})"):
                continue
            start = time.perf_counter()
            tvl1_flow_torch(pairs[:2, 0], pairs[:2, 1], params, solver=solver)  # warm-up: kernels, compile
            log(f"tvl1: {size} {solver} warm-up {time.perf_counter() - start:.1f} s")
            last_rate = 0.0
            for batch in batches:
                if not sec.has_time(f"{size} {solver} batch {batch}", needs_s=batch / last_rate if last_rate else 0.0):
                    break
                index = torch.arange(batch, device=ctx.device) % len(pairs)
                prev, nxt = pairs[index, 0], pairs[index, 1]
                ctx.sync()
                ctx.reset_peak()
                start = time.perf_counter()
                tvl1_flow_torch(prev, nxt, params, solver=solver)
                ctx.sync()
                seconds = time.perf_counter() - start
                last_rate = batch / seconds
                sec.lines.append(f"| {size} | {batch} | {solver} | {seconds:.2f} | {last_rate:.1f} | "
                                 f"{ctx.peak_gib()} |")
                log(f"tvl1: {size} {solver} batch {batch}: {last_rate:.1f} pairs/s")
                del prev, nxt


def section_extract(ctx: Context, sec: Section) -> None:
    """Videos to training shards on the device (issue 21): ``asym3d extract-flow --train-dir --backend torch`` end to
    end on at least ``extract_pairs`` real pairs (the carried clips linked under new names, bench/extract_e2e.py),
    with the solver's share of the wall time and peak memory; then the solver alone at ``solver_batch`` pairs per
    mode, CUDA graphs (torch.compile's reduce-overhead) against the default compile."""
    frames = json.loads((ctx.inputs / "videos.json").read_text())
    repeat = max(1, math.ceil(ctx.plan.extract_pairs / sum(n - 1 for n in frames.values())))
    sec.lines += [f"`asym3d extract-flow ROOT FLOW --train-dir TRAIN --dataset folder --backend torch --solver S "
                  f"--device {ctx.device.type} --jobs 1 --max-frames {ctx.plan.extract_max_frames} --encode-workers "
                  "W` in one process "
                  f"(bench/extract_e2e.py): {len(frames)} real clips x {repeat} names, from the videos to JPEG training "
                  "shards. Solver = the TV-L1 calls, synchronised; share = solver / wall (wall includes start-up, "
                  "the compile of a cold cache, decoding, writing). Peak host = the process's max RSS (its children "
                  "apart: the largest ffmpeg is the next column, encode workers are not counted); peak device = the "
                  "allocator's peak.", "",
                  "| solver | encode workers | videos ok | pairs | wall s | pairs/s | solver s | solver share | "
                  "peak host GiB | peak ffmpeg GiB | peak device GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for solver, workers in ((s, w) for s in ctx.plan.extract_solvers for w in ctx.plan.extract_encode_workers):
        what = f"--solver {solver} --encode-workers {workers}"
        if not sec.has_time(f"extract-flow --train-dir {what}"):
            continue
        command = [sys.executable, str(BENCH / "extract_e2e.py"), str(ctx.inputs / "videos"),
                   str(ctx.work / f"e2e-{solver}-{workers}"), "--repeat", str(repeat), "--", "--backend", "torch",
                   "--solver", solver, "--device", ctx.device.type, "--max-frames", str(ctx.plan.extract_max_frames),
                   "--encode-workers", str(workers)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(sec.left(), 10))
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        ran = report is not None and report["exit"] == 0
        sec.check(ran, f"extract-flow --train-dir {what}")
        if not ran:
            sec.lines += [f"| {solver} | {workers} | failed | | | | | | | | |", "", "```",
                          *(done.stdout + done.stderr).strip().splitlines()[-15:], "```", ""]
            continue
        sec.check(report["videos_ok"] == report["videos"] and report["pairs"] >= ctx.plan.extract_pairs,
                  f"{what}: {report['videos_ok']} of {report['videos']} videos, {report['pairs']} pairs")
        sec.lines.append(f"| {solver} | {workers} | {report['videos_ok']} | {report['pairs']} | "
                         f"{report['wall_s']:.1f} | {report['pairs'] / report['wall_s']:.1f} | {report['solver_s']:.1f} | "
                         f"{report['solver_s'] / report['wall_s']:.2f} | {report['peak_host_gib']} | "
                         f"{report['peak_ffmpeg_gib']} | {report['peak_device_gib'] or 'n/a'} |")
        log(f"extract: --train-dir {what}: {report['pairs']} pairs in {report['wall_s']:.1f} s "
            f"(solver {report['solver_s']:.1f} s)")
    solver_alone(ctx, sec)


@contextlib.contextmanager
def compile_mode(mode: str | None):
    """The solver's steps compiled with torch.compile ``mode`` (None: the default), compiled anew inside."""
    from pipeline import tvl1_torch

    original = torch.compile
    torch.compile = functools.partial(original, mode=mode) if mode else original
    tvl1_torch._steps.cache_clear()
    try:
        yield
    finally:
        torch.compile = original
        tvl1_torch._steps.cache_clear()


def solver_alone(ctx: Context, sec: Section) -> None:
    """``tvl1_flow_torch`` on ``solver_batch`` real 171x128 pairs already on the device, per mode: a solver name, or
    "reduce-overhead" = the compiled solver with CUDA graphs (issue 21's first lever on the launch-bound loop)."""
    data = np.load(ctx.inputs / "tvl1_171x128.npz")
    grays = np.concatenate([np.stack([rgb_to_gray(data[k])[:-1], rgb_to_gray(data[k])[1:]], axis=1)
                            for k in sorted(data.files) if k.startswith("frames")])
    pairs = torch.from_numpy(grays).to(ctx.device).float()
    index = torch.arange(ctx.plan.solver_batch, device=ctx.device) % len(pairs)
    prev, nxt = pairs[index, 0], pairs[index, 1]
    sec.lines += ["", f"The solver alone: `tvl1_flow_torch` on {ctx.plan.solver_batch} real 171x128 pairs on the "
                  "device, after a warm-up call at the same batch (compile and CUDA-graph recording there).", "",
                  "| mode | batch | warm-up s | s | pairs/s | peak GiB | warnings |", "|---|---:|---:|---:|---:|---:|---|"]
    for mode in ctx.plan.solver_modes:
        if not sec.has_time(f"solver alone ({mode})"):
            continue
        solver = "compiled" if mode == "reduce-overhead" else mode
        with compile_mode("reduce-overhead" if mode == "reduce-overhead" else None), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            tvl1_flow_torch(prev, nxt, TVL1Params(), solver=solver)
            ctx.sync()
            warm = time.perf_counter() - start
            ctx.reset_peak()
            start = time.perf_counter()
            tvl1_flow_torch(prev, nxt, TVL1Params(), solver=solver)
            ctx.sync()
            seconds = time.perf_counter() - start
        said = "; ".join(sorted({str(w.message).splitlines()[0][:120] for w in caught}))
        sec.lines.append(f"| {mode} | {ctx.plan.solver_batch} | {warm:.1f} | {seconds:.2f} | "
                         f"{ctx.plan.solver_batch / seconds:.1f} | {ctx.peak_gib()} | {said} |")
        log(f"extract: solver alone {mode}: {ctx.plan.solver_batch / seconds:.1f} pairs/s")


def overfit_config(ctx: Context, name: str, compiled: bool) -> TrainConfig:
    out = ctx.work / "runs" / f"{name}{'-compiled' if compiled else ''}"
    return TrainConfig(shard_dir=str(ctx.inputs / "shards"), out_dir=str(out), model=name, device=ctx.device.type,
                       compile=compiled, progress=False, **ctx.plan.overfit)


def section_train(ctx: Context, sec: Section) -> None:
    plan = ctx.plan
    sec.lines += [f"Overfit: `model.train.train` on {len(plan.shard_sources)} classes of real clips (split 1), "
                  + ", ".join(f"{k} {v}" for k, v in plan.overfit.items())
                  + "; loss must be finite and its last epoch below its first.", "",
                  "| network | compile | loss first -> last epoch | train acc last | s | check |",
                  "|---|---|---|---:|---:|---|"]
    runs = [(n, False) for n in plan.overfit_models] + [(n, True) for n in plan.compile_models]
    for name, compiled in runs:
        what = f"overfit {name}{' compiled' if compiled else ''}"
        if sec.has_time(what, needs_s=COMPILE_NEEDS_S if compiled else 0.0):
            sec.attempt(what, lambda: overfit(ctx, sec, name, compiled))
    first = plan.overfit_models[0]
    if first in ctx.shared.get("checkpoints", {}) and sec.has_time("resume"):
        sec.attempt("resume and checkpoint round trip", lambda: resume_and_round_trip(ctx, sec, first))


def resume_and_round_trip(ctx: Context, sec: Section, name: str) -> None:
    cfg = dataclasses.replace(overfit_config(ctx, name, False), epochs=ctx.plan.overfit["epochs"] + 1, resume=True)
    history = train(cfg)["history"]
    ok = sec.check(len(history) == cfg.epochs and math.isfinite(history[-1]["train_loss"]), "resume")
    sec.lines += ["", f"Resume: {name} continued for one more epoch from its last.pt (optimizer state back onto "
                  f"{ctx.device.type}): {len(history)} epochs, last loss {history[-1]['train_loss']:.3f}: {ok}.", ""]
    sec.lines.append(checkpoint_round_trip(ctx, sec, ctx.shared["checkpoints"][name]))


def overfit(ctx: Context, sec: Section, name: str, compiled: bool) -> None:
    start = time.perf_counter()
    summary = train(overfit_config(ctx, name, compiled))
    losses = [row["train_loss"] for row in summary["history"]]
    falling = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    ok = sec.check(falling, f"{name}{' compiled' if compiled else ''} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    sec.lines.append(f"| {name} | {'yes' if compiled else 'no'} | {losses[0]:.3f} -> {losses[-1]:.3f} | "
                     f"{summary['history'][-1]['train_acc']:.2f} | {seconds:.1f} | {ok} |")
    log(f"train: {name} compile={compiled}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {seconds:.1f} s")
    if not compiled:
        ctx.shared.setdefault("checkpoints", {})[name] = Path(summary["run_dir"]) / "last.pt"


def checkpoint_round_trip(ctx: Context, sec: Section, path: Path) -> str:
    """Load a device-trained checkpoint on the CPU, save it again, reload: same weights, same outputs on the device."""
    state = load_checkpoint(path)
    copy_path = ctx.work / "round_trip.pt"
    save_checkpoint(copy_path, state)
    again = load_checkpoint(copy_path)
    same_weights = all(torch.equal(v, again["model_state"][k]) for k, v in state["model_state"].items())
    nets = [build_model_from_checkpoint(s).to(ctx.device).eval() for s in (state, again)]
    clip = state["model_kwargs"]["clip"]
    x = torch.randn(2, 3, *clip, device=ctx.device)
    with torch.no_grad():
        same_outputs = torch.equal(nets[0](x), nets[1](x))
    ok = sec.check(same_weights and same_outputs, "checkpoint round trip")
    return (f"Checkpoint round trip: {path.name} loaded on the CPU (weights_only), saved, reloaded: weights equal "
            f"{same_weights}, outputs on {ctx.device.type} equal {same_outputs}: {ok}.")


def speed_setup(ctx: Context, precision: str, batch: int, mode: str = "eager") -> step_time.Setup:
    """A step as the trainer runs it on this device: channels_last_3d and cuDNN autotuning on CUDA."""
    cuda = ctx.device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    step_time.use_precision(precision)
    return step_time.Setup(ctx.device, batch, ctx.plan.speed.clip, precision, mode, channels_last=cuda)


def release(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_cell(ctx: Context, sec: Section, cell: Cell) -> dict[str, float] | None:
    """One round-robin of training steps: a table row per net with its ratio to its family's baseline."""
    precision, batch, mode, nets = cell
    speed = ctx.plan.speed
    if mode == "graphs" and ctx.device.type != "cuda":
        sec.lines += [f"#### {precision}, batch {batch}, {mode}", "", "Not run: CUDA graphs need a CUDA device.", ""]
        return None
    setup = speed_setup(ctx, precision, batch, mode)
    steps = {}
    for label in nets:
        net, path = step_time.build(label, speed.clip)
        steps[label] = step_time.train_step(net, dataclasses.replace(setup, cascade=path))
    times = step_time.round_robin(steps, speed.rounds, speed.warmup, ctx.device)
    del steps
    release(ctx)
    step_s = {label: step_time.cost(t, ctx.device) for label, t in times.items()}
    sec.lines += [f"#### {setup.describe()}", "",
                  "| network | GMACs | MAC ratio | step ms | time ratio | paper ratio (Table 2) | clips/s | x eager "
                  "cascade |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in nets:
        name = label.split(" ")[0]
        baseline = model.get_spec(name).baseline
        macs, base_macs = (model.count(n, clip=speed.clip)[1] for n in (name, baseline))
        ratio = f"{step_s[label] / step_s[baseline]:.2f}" if baseline in step_s else ""
        paper = f"{PAPER_S_PER_ITER[name] / PAPER_S_PER_ITER[baseline]:.2f}" if name in PAPER_S_PER_ITER else ""
        fused = f"{step_s[label] / step_s[name]:.2f}" if label != name and name in step_s else ""
        sec.lines.append(f"| {label} | {macs / 1e9:.2f} | {macs / base_macs:.2f} | {step_s[label] * 1e3:.1f} | "
                         f"{ratio} | {paper} | {batch / step_s[label]:.1f} | {fused} |")
    sec.lines.append("")
    log(f"{sec.name}: {setup.describe()}: {len(nets)} networks timed")
    return step_s


def cell_needs_s(cell: Cell) -> float:
    """Time a cell must have left to start: a compiled one compiles every net first (~15 s each on the H200)."""
    return 15.0 * len(cell[3]) if cell[2] == "compiled" else 0.0


def section_steps(ctx: Context, sec: Section) -> None:
    """Training steps per (precision, batch, mode) cell, each net against its baseline; then the ratios side by side."""
    speed = ctx.plan.speed
    sec.lines += [f"Forward + cross-entropy + backward + fused SGD step at {'x'.join(map(str, speed.clip))}"
                  f"{', channels_last_3d, cuDNN autotuning' if ctx.device.type == 'cuda' else ''}; fastest of "
                  f"{speed.rounds} round-robin rounds after {speed.warmup} warm-up rounds (bench/step_time.py). fp32: "
                  "TF32 off; tf32: TF32 on for convolutions and matmuls; bf16: autocast. graphs: the whole step "
                  "captured in one CUDA graph and replayed; compiled: torch.compile (compiling in the warm-up).", ""]
    ratios: dict[str, dict[str, float]] = {}
    for cell in speed.cells:
        what = f"{cell[0]} batch {cell[1]} {cell[2]}"
        if not sec.has_time(what, needs_s=cell_needs_s(cell)):
            continue
        step_s = sec.attempt(what, lambda: run_cell(ctx, sec, cell))
        if not step_s:
            continue
        for name in step_s:
            baseline = model.get_spec(name).baseline
            if baseline in step_s and name != baseline:
                ratios.setdefault(name, {})[what] = step_s[name] / step_s[baseline]
        if cell[:3] == ("bf16", 16, "eager") or not ctx.shared.get("clips_per_s"):  # the trainer's default
            ctx.shared["clips_per_s"] = {n: cell[1] / t for n, t in step_s.items()}
    goal_nets = [n for n in PAIRS if n in ratios]
    if goal_nets:
        columns = list(dict.fromkeys(c for n in goal_nets for c in ratios[n]))
        sec.lines += ["Step-time ratio to the baseline in every cell measured, beside the MAC ratio + 0.05 "
                      "(issue 25's goal: at most that in bf16).", "",
                      "| network | MAC ratio + 0.05 | " + " | ".join(columns) + " |",
                      "|---|---:|" + "---:|" * len(columns)]
        for name in goal_nets:
            macs = model.count(name, clip=speed.clip)[1] / model.count(model.get_spec(name).baseline,
                                                                      clip=speed.clip)[1]
            cells = [f"{ratios[name][c]:.2f}" if c in ratios[name] else "" for c in columns]
            sec.lines.append(f"| {name} | {macs + 0.05:.2f} | " + " | ".join(cells) + " |")


def stage_table(ctx: Context, sec: Section, nets: list[str], setup: step_time.Setup, kernels: int) -> None:
    """Forward + backward of each conv stage (with its pool) of ``nets``, timed round-robin, beside its floors."""
    peak = step_time.device_peak(ctx.device)
    rows, kernel_lists = step_time.stage_costs(nets, setup, ctx.plan.speed.rounds, ctx.plan.speed.warmup, kernels)
    release(ctx)
    total = {net: sum(row[i].seconds for row in rows) for i, net in enumerate(nets)}
    sec.lines += [f"#### {' vs '.join(nets)}: {setup.describe()}", "",
                  "| stage | network | what | GMACs/clip | min MB | ms | share | MAC ratio | time ratio | "
                  "MAC floor ms | bytes floor ms | x floor |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = row[0]
        for cost in row:
            floors = cost.floors(setup, peak)
            floor_cells = (f"{floors[0] * 1e3:.3f} | {floors[1] * 1e3:.3f} | {cost.seconds / max(floors):.1f}"
                           if floors else "n/a | n/a | n/a")
            sec.lines.append(
                f"| {cost.stage} | {cost.net} | {cost.label} | {cost.macs / 1e9:.2f} | "
                f"{cost.min_bytes(setup.batch, setup.precision) / 1e6:.0f} | {cost.seconds * 1e3:.2f} | "
                f"{cost.seconds / total[cost.net]:.0%} | {cost.macs / base.macs:.2f} | "
                f"{cost.seconds / base.seconds:.2f} | {floor_cells} |")
    if kernel_lists:
        sec.lines += ["", f"Top {kernels} kernels of each stage by their own "
                      f"{'device' if ctx.device.type == 'cuda' else 'CPU'} time, per step (torch.profiler):", ""]
        for (stage, net), top in kernel_lists.items():
            sec.lines.append(f"- {stage} {net}: " + "; ".join(f"`{name[:90]}` x{calls} {us:.0f} us"
                                                             for name, calls, us in top))
    sec.lines.append("")
    log(f"{sec.name}: {' vs '.join(nets)} per stage at {setup.describe()}")


def section_stages(ctx: Context, sec: Section) -> None:
    """Where the step's time goes: each conv stage alone, baseline against its asymmetric variant, with floors."""
    speed = ctx.plan.speed
    peak = step_time.device_peak(ctx.device)
    sec.lines += ["Forward + backward of each conv stage and its pool alone, at that stage's input size, eager, "
                  "timed round-robin (bench/step_time.py --stages). MAC floor: 6 x MACs x batch at the card's "
                  "dense peak; bytes floor: the fewest bytes any implementation moves (forward reads x and the "
                  "weights, writes y; backward reads dy, x and the weights, writes dx and the weight gradients) at "
                  "peak bandwidth; x floor: measured / the larger floor. "
                  + (f"Peaks: {peak.source}." if peak else "No peak figures for this device: floors n/a."), ""]
    for batch in speed.stage_batches:
        setup = speed_setup(ctx, "bf16" if ctx.device.type == "cuda" else "fp32", batch)
        for baseline, variant in speed.stage_pairs:
            if sec.has_time(f"stages {baseline} vs {variant} batch {batch}"):
                kernels = speed.stage_kernels if batch == speed.stage_batches[0] else 0
                sec.attempt(f"stages {variant} batch {batch}",
                            lambda: stage_table(ctx, sec, [baseline, variant], setup, kernels))


def fused_agreement(ctx: Context, sec: Section, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The fused kernel against the eager cascade on fresh random inputs (float64 reference of the same inputs)."""
    from model import fused_cascade

    c, n, t, h, w, k = shape
    x = torch.randn(2, c, t, h, w, device=ctx.device).contiguous(memory_format=torch.channels_last_3d)
    weights = [torch.randn(n, c, 1, k, 1) / (c * k) ** 0.5, torch.randn(n), torch.randn(n, n, 1, 1, k) / (n * k) ** 0.5,
               torch.randn(n), torch.randn(n, n, 3, 1, 1) / (3 * n) ** 0.5, torch.randn(n)]
    tensors = [p.to(ctx.device, dtype) for p in (x, *weights)]
    ours = fused_cascade.cascade_forward(*tensors)
    eager = fused_cascade.eager_cascade(*tensors)
    exact = fused_cascade.eager_cascade(*(p.double() for p in tensors))
    scale = exact.abs().max().item()
    ours_err, eager_err = ((y.double() - exact).abs().max().item() / scale for y in (ours, eager))
    bound = FUSED_FP32_BOUND if dtype == torch.float32 else eager_err + FUSED_BF16_EXTRA
    ok = sec.check(ours_err <= bound, f"fused {shape} {dtype} error {ours_err:.2e} > {bound:.2e}")
    name = str(dtype).replace("torch.", "")
    sec.lines.append(f"| {c} | {n} | {t}x{h}x{w} | {k} | {name} | {ours_err:.2e} | {eager_err:.2e} | {ok} |")


def section_fused(ctx: Context, sec: Section) -> None:
    """The fused cascade (model/fused_cascade.py) on the device: agreement with eager, then its time per stage and
    per training step beside the eager cascade."""
    from model import fused_cascade

    speed = ctx.plan.speed
    precisions = [torch.float32, torch.bfloat16]
    runs_here = fused_cascade.available(torch.empty(0, device=ctx.device))
    sec.check(runs_here, "the fused cascade cannot run here (Triton missing, or neither CUDA nor its interpreter)")
    if not runs_here:
        return
    sec.lines += ["Agreement: the Triton kernel against the eager cascade on fresh random inputs (batch 2, "
                  "channels_last_3d), both against a float64 cascade of the same inputs; error = max |difference| / "
                  f"max |float64|. Bound: float32 (TF32 off) {FUSED_FP32_BOUND:.0e}; bfloat16: eager's own error + "
                  f"{FUSED_BF16_EXTRA:.1e}.", "",
                  "| C | N | TxHxW | k | dtype | fused error | eager error | check |",
                  "|---:|---:|---|---:|---|---:|---:|---|"]
    step_time.use_precision("fp32")
    for shape in speed.fused_shapes:
        for dtype in precisions:
            if sec.has_time(f"fused agreement {shape} {dtype}"):
                sec.attempt(f"fused agreement {shape} {dtype}", lambda: fused_agreement(ctx, sec, shape, dtype))
    sec.lines.append("")
    release(ctx)
    batch = speed.stage_batches[0]
    for net in speed.fused_stage_nets:
        if sec.has_time(f"fused stages {net}"):
            setup = speed_setup(ctx, "bf16", batch)
            sec.attempt(f"fused stages {net}", lambda: stage_table(ctx, sec, [net, f"{net} fused"], setup, 0))
    for cell in speed.fused_cells:
        what = f"fused {cell[0]} batch {cell[1]} {cell[2]}"
        if sec.has_time(what):
            sec.attempt(what, lambda: run_cell(ctx, sec, cell))


def section_loader(ctx: Context, sec: Section) -> None:
    demand = {n: r for n, r in ctx.shared.get("clips_per_s", {}).items() if n in ("c3d-b5", "asym3d")}
    sec.lines += [f"Training DataLoader (`model.data.TrainClips`, batch 16, random 16x112x112 uint8 crops with "
                  f"their flip flags, from the carried JPEG q90 4:2:0 shards; mirroring and normalisation happen on "
                  f"the trainer's device) against the trainer's demand (clips/s of one "
                  f"training process from the step-time table above). Host: {os.cpu_count()} CPUs.", "",
                  "| " + " | ".join(["workers", "loader clips/s", *(f"x {n} demand" for n in demand)]) + " |",
                  "|---:|---:|" + "---:|" * len(demand)]
    torch.set_num_threads(1)  # as in DataLoader workers: workers=0 is not charged for intra-op threads
    try:
        for workers in ctx.plan.loader_workers:
            if not sec.has_time(f"loader with {workers} workers"):
                break
            rate = loader_rate(ctx.inputs / "shards", workers, ctx.plan.loader_batches)
            cells = [str(workers), f"{rate:.1f}", *(f"{rate / d:.2f}" for d in demand.values())]
            sec.lines.append("| " + " | ".join(cells) + " |")
            log(f"loader: {workers} workers: {rate:.1f} clips/s")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def section_evaluate(ctx: Context, sec: Section) -> None:
    if not ctx.shared.get("checkpoints"):  # run alone: train the first overfit network here
        overfit(ctx, sec, ctx.plan.overfit_models[0], False)
        sec.lines.append("")
    checkpoints = ctx.shared["checkpoints"]
    name, path = next(iter(checkpoints.items()))
    shards = ctx.inputs / "shards"
    clips = ctx.plan.eval_compare_clips
    results = {dev: evaluate_split(path, shards, 1, clips=clips, crops=10, device=dev, progress=False)
               for dev in (ctx.device.type, "cpu")}
    here, cpu = results[ctx.device.type], results["cpu"]
    diff = float(np.abs(here.scores - cpu.scores).max())
    ranked = np.sort(cpu.scores, axis=1)
    margin = ranked[:, -1] - ranked[:, -2]  # a prediction may flip only where rounding can bridge the top-2 gap
    same = (here.scores.argmax(1) == cpu.scores.argmax(1)) | (margin <= 2 * diff)
    ok = sec.check(bool(same.all()) and diff < 0.05, f"{ctx.device.type} and CPU predictions differ")
    sec.lines += [f"Device against CPU: {name} trained above ({path.name}), split 1's {len(cpu.video_ids)} test "
                  f"videos, {clips} clips x 10 crops: {int((here.scores.argmax(1) == cpu.scores.argmax(1)).sum())} of "
                  f"{len(same)} predictions equal (smallest CPU top-2 margin {margin.min():.4f}), largest softmax "
                  f"difference {diff:.4f} (autocast on the device, float32 on the CPU): {ok}.", "",
                  "Throughput: `evaluate_split`, 25 clips x 10 crops per test video (the paper's protocol), "
                  f"{ctx.plan.eval_workers} loader workers; views/s of the whole call (views built, moved, scored).",
                  "", "| network | batch (views) | views | s | views/s |", "|---|---:|---:|---:|---:|"]
    for name, path in checkpoints.items():
        for batch in ctx.plan.eval_batches:
            if not sec.has_time(f"evaluate {name} batch {batch}"):
                return
            sec.attempt(f"evaluate {name} batch {batch}", lambda: evaluation_rate(ctx, sec, name, path, batch))


def evaluation_rate(ctx: Context, sec: Section, name: str, path: Path, batch: int) -> None:
    start = time.perf_counter()
    result = evaluate_split(path, ctx.inputs / "shards", 1, batch_size=batch, device=ctx.device.type,
                            workers=ctx.plan.eval_workers, progress=False)
    seconds = time.perf_counter() - start
    views = int(result.views.sum())
    sec.lines.append(f"| {name} | {batch} | {views} | {seconds:.2f} | {views / seconds:.0f} |")
    log(f"evaluate: {name} batch {batch}: {views / seconds:.0f} views/s")


def section_ddp(ctx: Context, sec: Section) -> None:
    """One DDP step in a group of one (NCCL on CUDA, as torchrun runs the trainer) must equal the plain step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{ctx.work / 'ddp_store'}", rank=0, world_size=1)
    try:
        clip = (16, 32, 32)
        torch.manual_seed(0)
        plain = model.build_model("c3d-b5", num_classes=4, clip=clip, dropout=0.0).to(ctx.device)
        wrapped = copy.deepcopy(plain)
        ddp = DistributedDataParallel(wrapped, device_ids=[ctx.device.index or 0] if ctx.device.type == "cuda"
                                      else None)
        x = torch.randn(4, 3, *clip, device=ctx.device)
        y = torch.tensor([0, 1, 2, 3], device=ctx.device)
        for net in (plain, ddp):
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        pairs = zip(plain.state_dict().values(), wrapped.state_dict().values())
        worst = max(float((a - b).abs().max()) for a, b in pairs)
        total = torch.ones(1, device=ctx.device)
        dist.all_reduce(total)
        ok = sec.check(worst < 1e-5 and float(total) == 1.0, f"DDP step differs from the plain step by {worst:.2e}")
        sec.lines.append(f"{backend} process group of one, c3d-b5 at {'x'.join(map(str, clip))}, one SGD step: largest "
                         f"weight difference to the plain step {worst:.2e}; all_reduce {float(total):.0f}: {ok}.")
        log(f"ddp: {backend} step matches the plain step ({worst:.2e})")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ predict (issue 23)


def section_predict(ctx: Context, sec: Section) -> None:
    """``model.predict.predict_videos`` on the carried real clips: an RGB run and an RGBF run (flow by the torch
    TV-L1 on the device), 25 clips x 10 crops each (smoke: 1 clip), untrained c3d-b5 at 16x112x112 (speed does not
    depend on the weights); the schema is the pipeline's default (128x171, OpenCV TV-L1 parameters, JPEG q90)."""
    from model.predict import InputRecipe, Run, predict_videos
    from pipeline.build_rgbf import BuildConfig, train_schema
    from pipeline.decode import DecodeConfig
    from pipeline.extract import ExtractConfig

    decode = DecodeConfig(max_frames=ctx.plan.extract_max_frames)
    schema = train_schema(dataclasses.replace(ExtractConfig(), decode=decode).schema(), BuildConfig()).to_dict()
    videos = sorted((ctx.inputs / "videos").rglob("*.*"))
    crop, clips = ctx.plan.speed.clip[1], 25 if ctx.plan is FULL else 1  # smoke: 1 clip x 10 crops
    flow = "the torch TV-L1 (compiled; its compile time included)" if ctx.device.type == "cuda" else "OpenCV TV-L1"
    sec.lines += [f"`predict_videos` on {len(videos)} real clips (decoded at 128x171, at most "
                  f"{ctx.plan.extract_max_frames} frames), c3d-b5 (untrained) on 16x{crop}x{crop} views, "
                  f"{clips} clips x 10 crops, one video at a time as `asym3d predict` runs; RGBF's flow by "
                  f"{flow} on {ctx.device.type}. Each video's views are one `score_clips` call (batch 250).", "",
                  "| input | videos | views | s | views/s | s per video |", "|---|---:|---:|---:|---:|---:|"]
    for modality in ("rgb", "rgbf"):
        if not sec.has_time(f"predict {modality}"):
            return
        net = model.build_model("c3d-b5", num_classes=101, clip=(16, crop, crop)).eval()
        kwargs = {k: list(v) if k == "clip" else v for k, v in net.arch.items() if k != "name"}
        state = {"model_name": "c3d-b5", "model_kwargs": kwargs, "model_state": net.state_dict(), "epoch": 0,
                 "config": {"input": modality, "clip_len": 16, "crop": crop},
                 "classes": [f"c{i}" for i in range(101)], "normalization": {"mean": [100.0] * 3, "std": [60.0] * 3},
                 "schema": schema}
        run = Run(modality, state, InputRecipe.from_schema(schema, modality, modality), net)
        backend = "torch" if ctx.device.type == "cuda" else "cpu"
        start = time.perf_counter()
        done = [p for p in predict_videos([run], videos, clips=clips, batch_size=250, device=ctx.device.type,
                                          flow_backend_name=backend) if sec.check(p.error is None, f"{p.error}")]
        seconds = time.perf_counter() - start
        views = sum(p.views for p in done)
        sec.lines.append(f"| {modality} | {len(done)} | {views} | {seconds:.1f} | {views / seconds:.0f} | "
                         f"{seconds / max(len(done), 1):.2f} |")
        log(f"predict: {modality}: {views / seconds:.0f} views/s")


SECTIONS: dict[str, Callable[[Context, Section], None]] = {
    "tvl1": section_tvl1, "extract": section_extract, "train": section_train, "steps": section_steps,
    "stages": section_stages, "fused": section_fused, "loader": section_loader, "evaluate": section_evaluate,
    "ddp": section_ddp, "predict": section_predict,
}


# ------------------------------------------------------------------------------------------------ report


def machine_lines(device: torch.device) -> list[str]:
    lines = [f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            driver = "unknown (no nvidia-smi)"
        lines.insert(0, f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                        f"{props.multi_processor_count} SMs, driver {driver}")
    else:
        lines.insert(0, "- device: CPU (no CUDA device)")
    return lines


def run(args: argparse.Namespace, plan: Plan) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke and device.type == "cpu":  # the fused cascade runs on a CPU only interpreted (read at its import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    chosen = [s for s in (args.sections.split(",") if args.sections else SECTIONS)]
    for name in chosen:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; valid: {', '.join(SECTIONS)}")
    if not (args.inputs / "shards").is_dir():
        raise SystemExit(f"{args.inputs}: no prepared inputs (run bench/gpu_check.py --prepare {args.inputs} here)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    header = [f"# asym3d device check ({'smoke, ' if args.smoke else ''}{device.type})", "", *machine_lines(device)]
    body: list[str] = []
    total_limit = sum(plan.limits[n] for n in chosen) * args.time_scale
    verdicts: list[tuple[str, str, float]] = []

    def write_report() -> list[str]:
        summary = ["", "| section | status | s |", "|---|---|---:|",
                   *(f"| {n} | {s} | {t:.0f} |" for n, s, t in verdicts),
                   "", f"Total {time.monotonic() - started:.0f} s; the sections' limits add up to {total_limit:.0f} s."]
        (args.out / "gpu_check.md").write_text("\n".join(header + summary + body) + "\n")
        return summary

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(plan, device, args.inputs, Path(work))
        for name in chosen:
            sec = Section(name, plan.limits[name] * args.time_scale)
            log(f"{name}: start (limit {sec.limit_s:.0f} s)")
            sec.attempt(name, lambda: SECTIONS[name](ctx, sec))
            seconds = time.monotonic() - sec.start
            verdicts.append((name, sec.status, seconds))
            body += ["", f"## {name}: {sec.status} ({seconds:.0f} s of {sec.limit_s:.0f})", "", *sec.lines]
            write_report()  # kept current: a run killed later still leaves the sections done so far
            log(f"{name}: {sec.status} in {seconds:.0f} s")
    print("\n".join(write_report()), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps({n: s for n, s, _ in verdicts}, indent=1))
    return 0 if all(s.startswith("ok") for _, s, _ in verdicts) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="write the inputs into DIR (here, not the device)")
    parser.add_argument("--inputs", type=Path, default=Path(".gpu_check"), help="prepared inputs (default .gpu_check)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="report directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--sections", help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.prepare:
        prepare(args.prepare, plan)
        return
    sys.exit(run(args, plan))


if __name__ == "__main__":
    main()
