"""Torch TV-L1 (pipeline/tvl1_torch.py) against OpenCV's CPU TV-L1: speed and agreement, in one run.

For each frame size and video: decode the first ``--pairs + 1`` frames with ffmpeg, compute TV-L1 between
consecutive frames with OpenCV (``cv2.optflow.DualTVL1OpticalFlow``, one pair at a time) and with the torch backend
(all pairs in batches of ``--batch-size`` on ``--device``), with OpenCV's default parameters on both sides. Reports
pairs/s for each and their ratio, the mean end-point error (EPE) between the two, and, on a synthetic pair with known
flow (the first frame warped by a smooth field), each method's EPE against the truth. Prints a Markdown table.

Rates are given per wall-clock second and per CPU-second of this process (``time.process_time``); on a shared
machine the second is the steadier comparison (with one thread each, it is the per-core speed).

    python bench/flow_torch_vs_opencv.py                        # CPU, 171x128 and 340x256, 8 pairs per video,
                                                                # eager and compiled solvers side by side
    python bench/flow_torch_vs_opencv.py --device cuda --pairs 240 --batch-size 128 --sizes 171x128

On CUDA the torch time includes the host->device copy and the flow's copy back, after a warm-up call (CUDA context
and kernel caches), and the peak memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.decode import DecodeConfig, decode_video
from pipeline.tvl1_torch import TVL1Params, known_flow_pair, tvl1_flow_frames, tvl1_flow_torch

# Real action clips: ../shared/data/real_clips when present, else the copies in tests/data (a fresh clone).
_CLIPS = next((root for root in (Path(__file__).resolve().parents[2] / "shared" / "data" / "real_clips",
                                 Path(__file__).resolve().parents[1] / "tests" / "data" / "real_clips")
               if root.is_dir()), Path("real_clips"))
DEFAULT_VIDEOS = [_CLIPS / "ucf101" / "PushUps" / "v_PushUps_g02_c03.avi",
                  _CLIPS / "ucf101" / "Basketball" / "v_Basketball_g01_c02.mp4"]


def _size(text: str) -> tuple[int, int]:
    """'171x128' (W x H, as ffmpeg writes sizes) -> (height, width)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def _epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=-1).mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_video(path: Path, height: int, width: int, args: argparse.Namespace, device: torch.device) -> dict:
    """One row of the table: speeds and errors for one video at one size."""
    params = TVL1Params()
    frames = decode_video(path, DecodeConfig(height=height, width=width, max_frames=args.pairs + 1))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    n_pairs = len(frames) - 1

    start, cpu_start = time.perf_counter(), time.process_time()
    ref = np.stack([params.to_opencv().calc(a, b, None) for a, b in zip(gray[:-1], gray[1:])])
    opencv_s, opencv_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    solvers = {}
    for solver in args.solvers:
        # warm-up: CUDA context, allocator, kernel caches, and the compiled solver's compilation
        tvl1_flow_frames(frames[:3], params, device=device, solver=solver)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        ours = tvl1_flow_frames(frames, params, device=device, batch_size=args.batch_size, solver=solver)
        _sync(device)
        torch_s, torch_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        solvers[solver] = {"pps": n_pairs / torch_s, "ratio": opencv_s / torch_s, "cpu_pps": n_pairs / torch_cpu,
                           "epe_vs_opencv": _epe(ours, ref), "peak_mib": peak_mib}

    source, truth = known_flow_pair(gray[0])
    opencv_syn = params.to_opencv().calc(source, gray[0], None)
    pair = torch.from_numpy(np.stack([source, gray[0]])).float().to(device)
    torch_syn = tvl1_flow_torch(pair[:1], pair[1:], params)[0].permute(1, 2, 0).cpu().numpy()

    return {
        "video": path.name,
        "size": f"{width}x{height}",
        "pairs": n_pairs,
        "opencv_pps": n_pairs / opencv_s,
        "opencv_cpu_pps": n_pairs / opencv_cpu,
        "mean_flow": float(np.linalg.norm(ref, axis=-1).mean()),
        "syn_opencv": _epe(opencv_syn, truth),
        "syn_torch": _epe(torch_syn, truth),
        "solvers": solvers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=Path, nargs="+", default=DEFAULT_VIDEOS)
    parser.add_argument("--sizes", type=_size, nargs="+", default=[_size("171x128"), _size("340x256")])
    parser.add_argument("--pairs", type=int, default=8, help="frame pairs per video and size")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--solvers", default="eager,compiled", type=lambda t: t.split(","),
                        help="torch TV-L1 solvers to time side by side (pipeline.tvl1_torch.SOLVERS)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch and OpenCV CPU threads (same for both; on a shared machine 1 is fastest and least noisy)",
    )
    args = parser.parse_args()
    for video in args.videos:
        if not video.is_file():
            parser.error(f"{video}: no such video file")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    device = torch.device(args.device)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores visible"
    print(f"# {card}; torch {torch.__version__}, OpenCV {cv2.__version__}, "
          f"{args.threads} thread(s), batch {args.batch_size}, device {device}")
    print("| video | size | pairs | solver | OpenCV CPU pairs/s | torch pairs/s | torch / OpenCV "
          "| pairs per CPU-s OpenCV / torch | mean flow (px) | EPE torch vs OpenCV | synthetic EPE OpenCV "
          "| synthetic EPE torch (eager) | peak GPU MiB |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for height, width in args.sizes:
        for video in args.videos:
            r = bench_video(video, height, width, args, device)
            for solver, t in r["solvers"].items():
                peak = "-" if np.isnan(t["peak_mib"]) else f"{t['peak_mib']:.0f}"
                print(
                    f"| {r['video']} | {r['size']} | {r['pairs']} | {solver} | {r['opencv_pps']:.2f} | "
                    f"{t['pps']:.2f} | {t['ratio']:.2f} | {r['opencv_cpu_pps']:.2f} / {t['cpu_pps']:.2f} | "
                    f"{r['mean_flow']:.2f} | {t['epe_vs_opencv']:.3f} | {r['syn_opencv']:.3f} | {r['syn_torch']:.3f} "
                    f"| {peak} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
