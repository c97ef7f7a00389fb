"""extract-flow against a bare decode + OpenCV loop over the same videos, and its scaling with --jobs, in one run.

The bare loop is what a user would write by hand: decode each video with the same settings, run the same flow
backend over consecutive frames, keep the result in memory. The stage adds indexing, HDF5 shards (gzip flow,
lzf RGB), the manifest and the progress bar; the goal is that it keeps >= 0.9x the bare loop's frames/s.

    python bench/extract_overhead.py [--backend cpu] [--videos 4] [--frames 9] [--jobs 1,2]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig, decode_video
from pipeline.extract import ExtractConfig, extract_flow
from pipeline.flow import make_backend
from sample_videos import sample_videos


def make_dataset(root: Path, sources: list[Path], count: int) -> None:
    """``count`` videos in two classes, cycling over the real source videos (``sample_videos``)."""
    for i in range(count):
        src = sources[i % len(sources)]
        dst = root / f"class{i % 2}" / f"{src.stem}_{i}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def bare_loop(root: Path, decode: DecodeConfig, backend_name: str) -> int:
    backend = make_backend(backend_name)
    frames_done = 0
    for path in sorted(root.rglob("*.*")):
        frames = decode_video(path, decode)
        backend.compute(frames)
        frames_done += len(frames)
    return frames_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=9, help="frames decoded per video (pairs = frames - 1)")
    parser.add_argument("--jobs", default="1,2")
    args = parser.parse_args()
    sources = sample_videos()
    decode = DecodeConfig(max_frames=args.frames)
    print(f"machine: {platform.processor() or platform.machine()}, {cv2.getNumberOfCPUs()} cores, "
          f"opencv {cv2.__version__}, cv2 threads {cv2.getNumThreads()}; backend {args.backend}; "
          f"{args.videos} videos x {args.frames} frames at 128x171")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        make_dataset(root, sources, args.videos)
        index = index_dataset("folder", root)
        start = time.perf_counter()
        frames = bare_loop(root, decode, args.backend)
        bare = frames / (time.perf_counter() - start)
        print("| run | frames/s | vs bare loop |")
        print("|---|---|---|")
        print(f"| bare decode + flow loop | {bare:.1f} | 1.00 |")
        for jobs in (int(j) for j in args.jobs.split(",")):
            out = Path(tmp) / f"out{jobs}"
            cfg = ExtractConfig(decode=decode, backend=args.backend, videos_per_shard=1)
            start = time.perf_counter()
            summary = extract_flow(index, out, cfg, jobs=jobs, progress=False)
            rate = summary.frames_decoded / (time.perf_counter() - start)
            print(f"| extract-flow --jobs {jobs} | {rate:.1f} | {rate / bare:.2f} |")
            assert np.isfinite(rate) and not summary.failures


if __name__ == "__main__":
    main()
