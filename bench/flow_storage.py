"""Flow-shard storage options side by side: bytes per flow frame, write speed, random 16-frame window reads, error.

Real frames (a video from ../shared/data/videos, else from tests/data/real_clips, decoded at 128x171), real OpenCV
TV-L1 flow (``--backend``: another backend of pipeline.flow, e.g. the fast ``dis`` for a smoke run), real HDF5 shards
written and read through pipeline.store. Run: ``python bench/flow_storage.py [--pairs 24]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.decode import DecodeConfig, decode_video
from pipeline.flow import make_backend
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, VideoMeta, prepare_output, shard_name
from sample_videos import sample_videos

OPTIONS = {
    "float32 raw": dict(dtype="float32"),
    "float16 raw": dict(dtype="float16"),
    "float16 lzf": dict(dtype="float16", compression="lzf"),
    "float16 gzip": dict(dtype="float16", compression="gzip"),
    "int16 x100 raw": dict(dtype="int16", scale=100.0),
    "int16 x100 lzf": dict(dtype="int16", scale=100.0, compression="lzf"),
    "int16 x100 gzip": dict(dtype="int16", scale=100.0, compression="gzip"),
}


def measure(flow: np.ndarray, options: dict, work: Path, copies: int, windows: int) -> dict[str, float]:
    spec = FieldSpec("flow", channels=2, frames_offset=0, **options)
    schema = Schema(kind="bench", height=flow.shape[1], width=flow.shape[2], fields=(spec,))
    work.mkdir()
    prepare_output(work, schema, {}, [[str(i) for i in range(copies)]])
    start = time.perf_counter()
    with ShardWriter(work / shard_name(0), schema, 0) as writer:
        for i in range(copies):
            writer.add_video(VideoMeta(str(i), 0, "x"), {"flow": flow})
    write_s = time.perf_counter() - start
    size = (work / shard_name(0)).stat().st_size
    shards = ShardSet(work)
    back = shards.read("0", "flow")
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(windows):
        first = int(rng.integers(0, len(flow) - 16 + 1))
        shards.read(str(int(rng.integers(copies))), "flow", first, first + 16)
    read_s = time.perf_counter() - start
    shards.close()
    frames = copies * len(flow)
    return {"bytes_per_frame": size / frames, "write_frames_s": frames / write_s,
            "windows_s": windows / read_s, "max_err_px": float(np.abs(back - flow).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--video", type=Path, default=sample_videos()[0],
                        help="default: ../shared/data/videos/bikes.mp4, else a real clip in tests/data")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--copies", type=int, default=8, help="videos per shard (copies of the same flow)")
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--backend", default="cpu", help="flow backend (default cpu: OpenCV TV-L1)")
    args = parser.parse_args()
    frames = decode_video(args.video, DecodeConfig(max_frames=args.pairs + 1))
    backend = make_backend(args.backend)
    flow = backend.compute(frames)
    print(f"{args.video.name}: {len(flow)} {backend.algorithm} flow frames at {flow.shape[1]}x{flow.shape[2]}, "
          f"mean |F| {np.hypot(flow[..., 0], flow[..., 1]).mean():.2f} px")
    raw = None
    print("| option | bytes/frame | vs float32 | write frames/s | 16-frame windows/s | max error px |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(OPTIONS.items()):
            r = measure(flow, options, Path(tmp) / str(i), args.copies, args.windows)
            raw = raw or r["bytes_per_frame"]
            print(f"| {name} | {r['bytes_per_frame']:,.0f} | {r['bytes_per_frame'] / raw:.2f} | "
                  f"{r['write_frames_s']:,.0f} | {r['windows_s']:,.0f} | {r['max_err_px']:.4f} |")


if __name__ == "__main__":
    main()
