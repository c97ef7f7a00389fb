"""Videos to training shards end to end, timed from inside: `extract-flow --train-dir` pairs/s, the solver's share.

The clips under CLIPS (``CLIPS/<class>/<video>``) are linked ``--repeat`` times under new names into a folder
dataset (so a few carried clips make tens of thousands of real pairs), then ``asym3d extract-flow DATASET FLOW
--train-dir TRAIN OPTIONS...`` runs in this process (``--jobs 1``: the solver is in this process), with the torch
TV-L1 solver's calls timed (synchronised on the device, so the time is the solver's own). Prints one JSON line:
pairs, wall seconds, solver seconds, peak host memory (this process; ffmpeg children separately) and peak device
memory. Used by the device check (bench/gpu_check.py, section extract); runs anywhere torch runs.

    python bench/extract_e2e.py CLIPS WORK --repeat 14 -- --backend torch --device cuda --solver compiled
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def link_dataset(clips: Path, root: Path, repeat: int) -> int:
    """``repeat`` copies of every clip under new names (hard links where the filesystem allows); returns videos."""
    count = 0
    for clip in sorted(p for p in clips.rglob("*") if p.is_file()):
        for r in range(repeat):
            target = root / clip.parent.name / f"{clip.stem}_r{r:03d}{clip.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(clip, target)
            except OSError:
                shutil.copyfile(clip, target)
            count += 1
    return count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--repeat", type=int, default=1)
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, options = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: extract-flow's options

    import torch
    from click.testing import CliRunner

    import cli
    from pipeline import tvl1_torch
    from pipeline.store import ShardSet

    root, flow, train = args.work / "videos", args.work / "flow", args.work / "train"
    videos = link_dataset(args.clips, root, args.repeat)
    solve = tvl1_torch.tvl1_flow_torch
    solver = {"seconds": 0.0, "calls": 0}

    def timed(prev, nxt, *a, **k):
        start = time.perf_counter()
        out = solve(prev, nxt, *a, **k)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        solver["seconds"] += time.perf_counter() - start
        solver["calls"] += 1
        return out

    tvl1_torch.tvl1_flow_torch = timed  # the backend's batches call it by this name
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = CliRunner().invoke(cli.main, ["extract-flow", str(root), str(flow), "--dataset", "folder", "--jobs", "1",
                                           "--train-dir", str(train), *options])
    wall = time.perf_counter() - start
    tvl1_torch.tvl1_flow_torch = solve
    if result.exit_code != 0 and not train.is_dir():
        raise SystemExit(f"extract-flow failed (exit {result.exit_code}): {result.output[-2000:]}")
    shards = ShardSet(train)
    report = {
        "exit": result.exit_code, "output": result.output.strip().splitlines()[-3:],
        "videos": videos, "videos_ok": len(shards), "pairs": sum(v.n_frames - 1 for v in shards),
        "wall_s": round(wall, 2), "solver_s": round(solver["seconds"], 2), "solver_calls": solver["calls"],
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_ffmpeg_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "peak_device_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
                            else None),
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
