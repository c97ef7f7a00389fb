"""Pairs/s of every optical-flow backend on the same decoded frames, measured side by side in one run.

    .venv/bin/python bench/flow_backends.py [--video PATH] [--tvl1-pairs 20] [--threads 2] [--size 171x128]

Decodes a real video at the paper's 128x171 (or ``--size``), then times each backend on consecutive pairs and prints
a markdown table: pairs/s, the ratio to OpenCV's CPU TV-L1 (the reference), and the mean end-point difference from
the CPU TV-L1 flow on the pairs both computed (how far a backend's flow is from the paper's). Backends that cannot
run here (cuda without a CUDA OpenCV) are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.decode import DecodeConfig, decode_video
from pipeline.flow import FlowBackendUnavailable, make_backend
from sample_videos import sample_videos


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=sample_videos()[0],
                        help="default: ../shared/data/videos/bikes.mp4, else a real clip in tests/data")
    parser.add_argument("--tvl1-pairs", type=int, default=20, help="pairs for OpenCV's TV-L1 (cpu, cuda)")
    parser.add_argument("--torch-pairs", type=int, default=None,
                        help="pairs for the torch TV-L1; default 4 on a CPU (~15 s each on 2 busy cores), else 256")
    parser.add_argument("--fast-pairs", type=int, default=200, help="pairs for dis and farneback")
    parser.add_argument("--torch-device", default=None, help="default: cuda if torch sees a GPU, else cpu")
    parser.add_argument("--torch-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV and torch CPU threads")
    parser.add_argument("--size", default="171x128", help="WxH frames are decoded at (the paper's: 171x128)")
    parser.add_argument("--frames", type=int, default=DecodeConfig.max_frames, help="decode at most this many frames")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)

    width, height = (int(v) for v in args.size.lower().split("x"))
    decode = DecodeConfig(height=height, width=width, max_frames=args.frames)
    frames, decode_s = timed(decode_video, args.video, decode)
    print(f"video: {args.video}: {len(frames)} frames at {width}x{height} decoded in {decode_s:.2f} s "
          f"({len(frames) / decode_s:.0f} frames/s)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"OpenCV {cv2.__version__}, torch {torch.__version__}, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")

    torch_on_gpu = (args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    torch_pairs = args.torch_pairs or (256 if torch_on_gpu else 4)
    plan = [("cpu", args.tvl1_pairs), ("cuda", args.tvl1_pairs), ("torch", torch_pairs),
            ("dis", args.fast_pairs), ("farneback", args.fast_pairs)]
    reference: np.ndarray | None = None
    rows = []
    for name, n_pairs in plan:
        clip = frames[: n_pairs + 1]
        try:
            backend = make_backend(name, device=args.torch_device, batch_size=args.torch_batch)
        except FlowBackendUnavailable as err:
            rows.append(f"| {name} | skipped: {err} | | | |")
            continue
        if name == "torch" and torch_on_gpu:
            backend.compute(frames[:3])  # CUDA context and kernel start-up are not per-pair costs
        flow, seconds = timed(backend.compute, clip)
        rate = (len(clip) - 1) / seconds
        if reference is None:
            reference, reference_rate = flow, rate
        common = min(len(flow), len(reference))
        epe = np.linalg.norm(flow[:common] - reference[:common], axis=-1).mean()
        rows.append(f"| {name} ({backend.algorithm}, {backend.device}) | {len(clip) - 1} | {rate:.2f} | "
                    f"{rate / reference_rate:.2f}x | {epe:.3f} |")

    print("\n| backend | pairs | pairs/s | vs cpu TV-L1 | mean EPE vs cpu TV-L1 (px) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
