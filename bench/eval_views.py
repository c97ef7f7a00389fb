"""Evaluation throughput (issue 6; table in BENCHMARKS.md): views/s of the 25-clip x 10-crop protocol.

Three figures per network, measured side by side in one run on the same synthetic training shard (128x171 RGB
frames, raw uint8, written with ``pipeline.store``):

- view preparation alone, as the host does it: ``model.evaluate.ClipViews`` items (HDF5 read of one whole-frame
  uint8 clip), then ``ClipViews.views`` (10 crops/flips + normalisation, done on the network's device: here the
  CPU, so the cost is shown apart);
- the network alone: forward passes of ``--batch`` views of 3x16x112x112 (``--crop``) under ``torch.inference_mode``;
- end to end: ``model.evaluate.score_videos`` (what ``asym3d evaluate`` runs), in this one process (workers=0).

The end-to-end rate is extrapolated to one UCF-101 split (3,783 test videos x 250 views). Weights are untrained:
speed does not depend on them. The precision is ``asym3d evaluate``'s (model.runtime: bf16 on a GPU, fp32 on a CPU).

    .venv/bin/python bench/eval_views.py [--models c3d-b5,asym3d] [--threads 2] [--batch 10] [--device cpu]
        [--crop 112]  # a smaller crop (the network built for it) only to smoke-test the script quickly
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model import build_model
from model.evaluate import ClipViews, score_videos
from model.runtime import Runtime
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, VideoMeta, prepare_output, shard_name

UCF101_TEST_VIDEOS = 3783  # split 1 test list
VIEWS_PER_VIDEO = 250


def synthetic_shards(root: Path, frames: int) -> ShardSet:
    """One video of random 128x171 frames in a real training shard (a test video of split 1)."""
    schema = Schema(kind="train", height=128, width=171, fields=(FieldSpec("rgb", 3),))
    prepare_output(root, schema, {"classes": [f"c{i}" for i in range(101)]}, [["v0"]])
    rng = np.random.default_rng(0)
    with ShardWriter(root / shard_name(0), schema, 0) as writer:
        writer.add_video(VideoMeta("v0", 0, "c0", splits={1: "test"}),
                         {"rgb": rng.integers(0, 256, (frames, 128, 171, 3), dtype=np.uint8)})
    return ShardSet(root)


def clip_views(shards: ShardSet, clips: int, crop: int = 112) -> ClipViews:
    return ClipViews(shards, shards.split_videos(1, "test"), "rgb", clip_len=16, num_clips=clips, crop_size=crop,
                     crops=10, mean=[100.0] * 3, std=[50.0] * 3)


class Timer:
    """Wall-clock and process CPU seconds of a block: on a shared machine views per CPU-second is the steadier
    figure (it counts every thread of this process, so with 2 torch threads it is per 2 cores' worth of work)."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def preparation_rates(shards: ShardSet, clips: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Views/s of (reading the uint8 clips, what loader workers do) and (building the views from them on the CPU)."""
    views = clip_views(shards, clips)
    with Timer() as read:
        batch = torch.stack([views[i]["clip"] for i in range(len(views))])
    with Timer() as build:
        n = views.views(batch).shape[0]
    return (n / read.wall, n / read.cpu), (n / build.wall, n / build.cpu)


def forward_rate(net: torch.nn.Module, batch: int, crop: int, repeats: int, device: torch.device
                 ) -> tuple[float, float]:
    """Views/s of the network alone, with ``score_videos``'s precision and memory format (``model.runtime``)."""
    runtime = Runtime.choose(device)
    net = runtime.prepare(net)
    x = runtime.inputs(torch.randn(batch, 3, 16, crop, crop, device=device))
    with torch.inference_mode(), runtime.autocast():
        net(x)  # warm-up: allocator, kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        with Timer() as t:
            for _ in range(repeats):
                net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
    return batch * repeats / t.wall, batch * repeats / t.cpu


def end_to_end_rate(net: torch.nn.Module, shards: ShardSet, clips: int, batch: int, crop: int,
                    device: torch.device) -> tuple[float, float]:
    views = clip_views(shards, clips, crop)
    with Timer() as t:
        counts = score_videos(net, views, batch_size=batch, device=device, progress=False).views
    return int(counts.sum()) / t.wall, int(counts.sum()) / t.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="c3d-b5,asym3d")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=10, help="views per forward pass (reduced on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per network")
    parser.add_argument("--clips", type=int, default=2, help="clips (x10 views) in the end-to-end run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--crop", type=int, default=112, help="view size (the protocol's 112; smaller to smoke-test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp) / "shards", frames=120)
        read, build = preparation_rates(shards, clips=25)
        rows = []
        for name in args.models.split(","):
            net = build_model(name, clip=(16, args.crop, args.crop)).to(device).eval()
            fwd = forward_rate(net, args.batch, args.crop, args.repeats, device)
            e2e = end_to_end_rate(net, shards, args.clips, args.batch, args.crop, device)
            hours = [UCF101_TEST_VIDEOS * VIEWS_PER_VIDEO / rate / 3600 for rate in e2e]
            rows.append(f"| {name} | {device.type} | {args.batch} | {fwd[0]:.2f} / {fwd[1]:.2f} | "
                        f"{e2e[0]:.2f} / {e2e[1]:.2f} | {hours[0]:,.0f} h / {hours[1]:,.0f} h |")
        shards.close()
    where = f"{platform.machine()}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    print(f"Machine: {where}; torch {torch.__version__}; the networks take views of 3x16x{args.crop}x{args.crop}. "
          f"Each cell: per wall-clock second / per CPU-second of this process. View preparation (3x16x112x112), "
          f"one process: reading the uint8 clips (the loader's part) {read[0]:.0f} / {read[1]:.0f} views/s; "
          f"building the 10 views from them on the CPU (a GPU's part when evaluating there) "
          f"{build[0]:.0f} / {build[1]:.0f} views/s.\n")
    print("| network | device | batch | network views/s | end-to-end views/s | one UCF-101 split (3,783 x 250 views) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
