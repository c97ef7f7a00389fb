"""Training-shard storage options measured side by side on real frames (issue 4; table in BENCHMARKS.md).

For each modality (RGB, flow image, RGBF) and each storage option (raw uint8 chunked per frame, lzf, gzip, JPEG
q90/q95 bytes per frame) this writes a real shard with ``pipeline.store.ShardWriter`` and reports bytes per frame,
the ratio to raw uint8, the mean absolute error after decoding, and random 16-frame windows read and decoded per
second through ``ShardSet.read`` in this one process (so per core), both per wall-clock second and per second of
this process's CPU time (the fairer per-core figure on a machine shared with other work).

Frames: every video in ``--videos`` (default: ../shared/data/videos, else the real clips in tests/data) decoded at
128x171 by ``pipeline.decode``, at most ``--frames`` of each. Flow: OpenCV DIS (medium preset), not
TV-L1: TV-L1 does ~5 pairs/s here, too slow for a benchmark, and the flow only has to be realistic flow for the
storage measurement. Flow images and RGBF are then made by ``pipeline.rgbf`` exactly as build-rgbf makes them.

    .venv/bin/python bench/storage.py [--videos '/work/shared/data/videos/*.mp4'] [--seconds 2] [--frames 20000]
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.decode import DecodeConfig, decode_video
from pipeline.rgbf import DEFAULT_FLOW_BOUND, paired_flow_index, training_frames
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, VideoMeta, prepare_output, shard_name
from sample_videos import sample_videos

WINDOW = 16
OPTIONS: dict[str, dict[str, object]] = {
    "raw": {},
    "lzf": {"compression": "lzf"},
    "gzip": {"compression": "gzip"},
    "jpeg q90": {"encoding": "jpeg", "quality": 90},
    "jpeg q90 4:2:0": {"encoding": "jpeg", "quality": 90, "subsampling": "420"},
    "jpeg q95": {"encoding": "jpeg", "quality": 95},
}


def dis_flow(frames: np.ndarray) -> np.ndarray:
    """DIS optical flow t -> t+1 of ``(T, H, W, 3)`` RGB frames: ``(T-1, H, W, 2)`` float32 pixels."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return np.stack([dis.calc(a, b, None) for a, b in zip(gray[:-1], gray[1:])])


def modalities_of(frames: np.ndarray) -> dict[str, np.ndarray]:
    flow = dis_flow(frames)
    return training_frames(frames, flow[paired_flow_index(len(frames))], bound=DEFAULT_FLOW_BOUND)


def measure(root: Path, name: str, videos: list[dict[str, np.ndarray]], option: dict[str, object],
            seconds: float, rng: np.random.Generator) -> dict[str, float]:
    """Write one shard holding field ``name`` of every video with ``option``; return size, error and read speed."""
    h, w = videos[0][name].shape[1:3]
    schema = Schema(kind="train", height=h, width=w, fields=(FieldSpec(name, 3, **option),))
    ids = [[f"v{i}" for i in range(len(videos))]]
    prepare_output(root, schema, {"kind": "bench"}, ids)
    with ShardWriter(root / shard_name(0), schema, 0) as writer:
        for vid, arrays in zip(ids[0], videos):
            writer.add_video(VideoMeta(vid, 0, "bench"), {name: arrays[name]})
    n_frames = sum(len(v[name]) for v in videos)
    size = (root / shard_name(0)).stat().st_size
    shards = ShardSet(root)
    error = np.mean([np.abs(shards.read(vid, name).astype(np.int16) - arrays[name]).mean()
                     for vid, arrays in zip(ids[0], videos)])
    entries = shards.videos
    windows, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            video = entries[rng.integers(len(entries))]
            first = int(rng.integers(video.n_frames - WINDOW + 1))
            shards.read(video, name, first, first + WINDOW)
        windows += 50
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    shards.close()
    return {"bytes": size / n_frames, "ratio": size / (n_frames * h * w * 3), "error": float(error),
            "wall_rate": windows / wall, "cpu_rate": windows / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", help="glob of videos [default: ../shared/data/videos/*.mp4, else tests/data's]")
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent reading windows per measurement")
    parser.add_argument("--frames", type=int, default=DecodeConfig.max_frames, help="frames decoded per video, at most")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    paths = sorted(glob.glob(args.videos)) if args.videos else [str(p) for p in sample_videos()]
    if not paths:
        raise SystemExit(f"no videos match {args.videos}")
    config = DecodeConfig(height=128, width=171, max_frames=args.frames)
    videos = [modalities_of(decode_video(p, config)) for p in paths]
    n_frames = sum(len(v["rgb"]) for v in videos)
    print(f"{len(paths)} videos, {n_frames} frames at 128x171 ({', '.join(Path(p).name for p in paths)}); "
          f"flow: OpenCV DIS medium, bound {DEFAULT_FLOW_BOUND:g} px; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; one process\n")
    print("| modality | storage | bytes/frame | ratio to raw | mean abs error (0..255) "
          "| windows/s (wall) | windows per CPU-second |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("rgb", "flow", "rgbf"):
            for label, option in OPTIONS.items():
                r = measure(Path(tmp) / f"{name}-{label.replace(' ', '')}", name, videos, option, args.seconds, rng)
                print(f"| {name} | {label} | {r['bytes']:,.0f} | {r['ratio']:.3f} | {r['error']:.2f} | "
                      f"{r['wall_rate']:,.0f} | {r['cpu_rate']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
