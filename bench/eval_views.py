"""Evaluation throughput (issue 6; table in BENCHMARKS.md): views/s of the 25-clip x 10-crop protocol.

First the host's share (issue 23, item 6), on training shards of real videos as build-rgbf stores them by default
(JPEG q90 4:2:0, 128x171, the first ``--frames`` frames of each sample video: 188 is about UCF-101's mean length):
reading the 25 clips of each test video as the evaluator did before, one shard read (and JPEG decode) per clip, and
as it does now, ``model.evaluate.ClipViews`` (the distinct frames of a video read once) with the clips cut by index
(``model.evaluate.clip_batches``); CPU time per view of this process, the two side by side and their ratio.

Then three figures per network, on the same shards:

- view building alone: ``ViewProtocol.views`` (10 crops/flips + normalisation, done on the network's device: here
  the CPU, so the cost is shown apart);
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

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this script

from model import build_model  # noqa: E402
from model.clips import ViewProtocol, clip_indices, evenly_spaced_starts  # noqa: E402
from model.evaluate import ClipViews, clip_batches, score_videos  # noqa: E402
from model.runtime import Runtime  # noqa: E402
from pipeline.decode import DecodeConfig, decode_video  # noqa: E402
from pipeline.store import ShardSet, VideoMeta  # noqa: E402
from sample_videos import sample_videos  # noqa: E402
from train_shards import write_train_shards  # noqa: E402

UCF101_TEST_VIDEOS = 3783  # split 1 test list
VIEWS_PER_VIDEO = 250


def real_shards(root: Path, frames: int) -> ShardSet:
    """The sample videos' first ``frames`` frames at 128x171 as JPEG training shards, every one a test video of
    split 1 (bench.train_shards writes them as build-rgbf does)."""
    videos = []
    for i, path in enumerate(sample_videos()):
        decoded = decode_video(path, DecodeConfig(max_frames=frames))
        videos.append((VideoMeta(f"v{i}", 0, "c0", splits={1: "test"}), decoded))
    write_train_shards(root, videos, [f"c{i}" for i in range(101)], n_shards=1)
    return ShardSet(root)


def clip_views(shards: ShardSet, clips: int, crop: int = 112) -> ClipViews:
    spec = ViewProtocol("rgb", clip_len=16, num_clips=clips, crop_size=crop, crops=10, mean=(100.0,) * 3,
                        std=(50.0,) * 3)
    return ClipViews(shards, shards.split_videos(1, "test"), spec)


class Timer:
    """Wall-clock and process CPU seconds of a block: on a shared machine views per CPU-second is the steadier
    figure (it counts every thread of this process, so with 2 torch threads it is per 2 cores' worth of work)."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def host_reading(shards: ShardSet, clips: int, repeats: int = 2) -> dict[str, tuple[float, float, int]]:
    """(views/s, views per CPU-second, frames decoded) of making every test video's ``clips`` clips into uint8
    batches of 3 clips (30 views, ``asym3d evaluate``'s default): one shard read per clip, stacked into batches as
    the loader's collate did (before); one read per video (the ``ClipViews`` items), then the clips cut by index on
    the CPU (after; on a GPU the cutting is the device's, so the host's share is the items alone, the last row).
    Each is timed ``repeats`` times, alternating, and its fastest (least CPU) run kept: caches warm alike."""
    views = clip_views(shards, clips)
    n_views = len(views) * clips * 10

    def per_clip() -> int:
        decoded, pending = 0, []
        for video in views.videos:
            for start in evenly_spaced_starts(video.n_frames, 16, clips):
                index = clip_indices(video.n_frames, int(start), 16)
                decoded += len(np.unique(index))  # the store reads each distinct index of a call once
                pending.append(torch.from_numpy(shards.read(video, "rgb", index=index)))
                if len(pending) == 3:
                    torch.stack(pending)
                    pending = []
        return decoded

    best: dict[str, Timer] = {}
    for _ in range(repeats):
        with Timer() as before:
            decoded = per_clip()
        with Timer() as items_only:
            items = [views[i] for i in range(len(views))]
        with Timer() as cutting:
            for _ in clip_batches(items, 3, torch.device("cpu")):
                pass
        both = Timer()
        both.wall, both.cpu = items_only.wall + cutting.wall, items_only.cpu + cutting.cpu
        for name, timer in (("before", before), ("after", both), ("items", items_only)):
            if name not in best or timer.cpu < best[name].cpu:
                best[name] = timer
    decoded_after = sum(len(item["frames"]) for item in items)
    frames = {"before": decoded, "after": decoded_after, "items": decoded_after}
    return {name: (n_views / t.wall, n_views / t.cpu, frames[name]) for name, t in best.items()}


def build_rate(shards: ShardSet, clips: int) -> tuple[float, float]:
    """Views/s of building the 10 views of uint8 clips on the CPU (a GPU's part when evaluating there)."""
    views = clip_views(shards, clips)
    batch = torch.cat([c for _, c in clip_batches([views[i] for i in range(len(views))], 10 ** 6,
                                                  torch.device("cpu"))])
    with Timer() as build:
        n = views.spec.views(batch).shape[0]
    return n / build.wall, n / build.cpu


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
    parser.add_argument("--frames", type=int, default=188, help="frames per test video (UCF-101's mean is ~186)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        shards = real_shards(Path(tmp) / "shards", frames=args.frames)
        reading = host_reading(shards, clips=25)
        build = build_rate(shards, clips=25)
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
    videos = len(shards.split_videos(1, "test"))
    print(f"Machine: {where}; torch {torch.__version__}. Host reading of {videos} test videos x 25 clips x 10 crops "
          f"from JPEG q90 shards, 128x171, {args.frames} frames a video at most, one process:\n")
    print("| host reading | frames decoded | views/s | views per CPU-s | CPU ms per view |")
    print("|---|---|---|---|---|")
    reading_rows = (("before", "one read per clip, stacked in batches (before)"),
            ("after", "one read per video, clips cut by index on the CPU (after)"),
            ("items", "one read per video, the host's share when a GPU cuts (after)"))
    for name, label in reading_rows:
        wall, cpu, frames = reading[name]
        print(f"| {label} | {frames} | {wall:.0f} | {cpu:.0f} | {1000 / cpu:.3f} |")
    ratios = (("after", "CPU per view, after / before"), ("items", "host CPU per view on a GPU, after / before"))
    for name, label in ratios:
        print(f"| {label} | {reading[name][2] / reading['before'][2]:.2f}x | | | "
              f"{reading['before'][1] / reading[name][1]:.2f}x |")
    print(f"\nBuilding the 10 views (3x16x112x112) from uint8 clips on the CPU (a GPU's part when evaluating there): "
          f"{build[0]:.0f} / {build[1]:.0f} views/s. Networks take views of 3x16x{args.crop}x{args.crop}; each cell: "
          f"per wall-clock second / per CPU-second of this process.\n")
    print("| network | device | batch | network views/s | end-to-end views/s | one UCF-101 split (3,783 x 250 views) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
