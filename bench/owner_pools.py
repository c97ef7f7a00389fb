"""One flow-backend process fed and drained by CPU pools, against one process doing it all and against --jobs,
measured side by side in one run on real clips (issue 21).

On a GPU the solver is fast and the host work around it (decoding, training images, JPEG, HDF5) decides the rate;
``--encode-workers N`` moves the training images and JPEG of ``extract-flow --train-dir`` into N processes while the
backend's process decodes ahead (ffmpeg processes) and computes the next videos' flow. DIS stands in for a fast
solver here (~2 ms per pair on this CPU, the same order as the host work). Each row is the command as a user runs
it, ``python -m cli extract-flow ... --train-dir``; wall time is what a GPU user waits for, CPU time what it costs.

    .venv/bin/python bench/owner_pools.py [--clips ../shared/data/real_clips/ucf101] [--rows 0,1,2,jobs2]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from host_cost import make_dataset  # noqa: E402
from pipeline.datasets import VIDEO_EXTENSIONS  # noqa: E402
from pipeline.store import ShardSet  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, default=REPO.parent / "shared" / "data" / "real_clips" / "ucf101")
    parser.add_argument("--backend", default="dis")
    parser.add_argument("--max-frames", type=int, default=20000)
    parser.add_argument("--videos-per-shard", type=int, default=5)
    parser.add_argument("--rows", default="0,1,2,jobs2", help="encode-worker counts, and jobsN for --jobs N alone")
    args = parser.parse_args(argv)
    clips = sorted(p for p in args.clips.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {len(clips)} clips; "
          f"backend {args.backend}; {args.videos_per_shard} videos per shard")
    print("| structure | wall s | frames/s | CPU s | vs one process |")
    print("|---|---:|---:|---:|---:|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        make_dataset(root, clips)
        for row in args.rows.split(","):
            jobs = int(row[4:]) if row.startswith("jobs") else 1
            workers = 0 if row.startswith("jobs") else int(row)
            out = Path(tmp) / row
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cli", "extract-flow", str(root), str(out / "flow"), "--backend",
                            args.backend, "--max-frames", str(args.max_frames), "--videos-per-shard",
                            str(args.videos_per_shard), "--jobs", str(jobs), "--train-dir", str(out / "train"),
                            *(["--encode-workers", str(workers)] if workers else [])],
                           cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True, capture_output=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            frames = sum(v.n_frames for v in ShardSet(out / "train").videos)
            base = base or wall
            name = f"--jobs {jobs}, one process per shard" if jobs > 1 else (
                f"one backend process + {workers} encode workers" if workers else "one process")
            print(f"| {name} | {wall:.1f} | {frames / wall:.1f} | {cpu:.1f} | {base / wall:.2f}x |")


if __name__ == "__main__":
    main()
