"""Host CPU per frame beyond the flow solver, videos to training shards, measured side by side in one run (issue 21).

What a GPU user waits for once the solver is fast is the host: decoding, the flow's storage, the training images,
JPEG and HDF5. Each path runs as the user runs it, ``python -m cli ...`` with ``--jobs 1``, on the same real clips:

- **two stages**: ``extract-flow`` (flow shards), then ``build-rgbf`` (training shards);
- **--train-dir**: ``extract-flow --train-dir`` (training shards made in memory, no flow shard);
- with ``--before REPO`` (a checkout of an earlier version, e.g. ``git archive`` of the merge base), the same
  commands run from that checkout too, so the earlier figures are measured in the same run, on the same load.

Host CPU beyond the solver = (CPU seconds of the commands and their children, ffmpeg included) - (CPU of the same
commands rerun on their finished output: start-up, indexing, locking, manifests) - (the flow backend's own CPU on
the same decoded frames, timed alone in this process), per frame. Decoding alone (ffmpeg's CPU) is printed beside
it: it is included in the host figure.

    .venv/bin/python bench/host_cost.py [--clips ../shared/data/real_clips/ucf101] [--backend dis] [--before DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.datasets import VIDEO_EXTENSIONS  # noqa: E402
from pipeline.decode import DecodeConfig, decode_video  # noqa: E402
from pipeline.flow import make_backend  # noqa: E402
from pipeline.store import ShardSet  # noqa: E402


def cpu_seconds() -> tuple[float, float]:
    """(this process, its waited-for children) user + system CPU seconds so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def run_cli(repo: Path, *args: str) -> float:
    """CPU seconds of ``python -m cli ARGS`` run from ``repo`` (with every process it waited for)."""
    before = cpu_seconds()[1]
    subprocess.run([sys.executable, "-m", "cli", *args], cwd=repo, check=False, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(repo)))
    return cpu_seconds()[1] - before


def make_dataset(root: Path, clips: list[Path]) -> None:
    """A folder dataset of the clips, one class per source folder."""
    for clip in clips:
        (root / clip.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, root / clip.parent.name / clip.name)


def solver_and_decode(clips: list[Path], decode: DecodeConfig, backend: str) -> tuple[float, float, int]:
    """(decoding CPU s, the backend's own CPU s, frames) on the clips, each timed alone."""
    start = cpu_seconds()
    videos = [decode_video(clip, decode) for clip in clips]
    decoded = cpu_seconds()
    flow = make_backend(backend)
    for frames in videos:
        flow.compute(frames)
    solved = cpu_seconds()
    return (sum(decoded) - sum(start), solved[0] - decoded[0], sum(len(v) for v in videos))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, default=REPO.parent / "shared" / "data" / "real_clips" / "ucf101")
    parser.add_argument("--backend", default="dis")
    parser.add_argument("--max-frames", type=int, default=20000, help="frames decoded per video at most")
    parser.add_argument("--videos-per-shard", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout of an earlier version to measure in the same run")
    args = parser.parse_args(argv)
    clips = sorted(p for p in args.clips.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    decode = DecodeConfig(max_frames=args.max_frames)
    flags = ["--backend", args.backend, "--max-frames", str(args.max_frames), "--videos-per-shard",
             str(args.videos_per_shard), "--jobs", "1"]
    decode_s, solver_s, frames = solver_and_decode(clips, decode, args.backend)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; python "
          f"{platform.python_version()}; {len(clips)} clips, {frames} frames at {decode.height}x{decode.width}; "
          f"backend {args.backend} alone: {1000 * solver_s / frames:.2f} CPU-ms/frame; decoding alone (ffmpeg): "
          f"{1000 * decode_s / frames:.2f} CPU-ms/frame")
    versions = [("", REPO)] + ([(" (before)", args.before.resolve())] if args.before else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        make_dataset(root, clips)
        for label, repo in versions:
            for path in ("two stages", "--train-dir"):
                out = Path(tmp) / f"{path}{label}".replace(" ", "_")
                flow, train = out / "flow", out / "train"
                if path == "two stages":
                    commands = [["extract-flow", str(root), str(flow), *flags], ["build-rgbf", str(flow), str(train)]]
                else:
                    commands = [["extract-flow", str(root), str(flow), *flags, "--train-dir", str(train)]]
                total = sum(run_cli(repo, *command) for command in commands)
                startup = sum(run_cli(repo, *command) for command in commands)  # reruns: nothing left to compute
                done = ShardSet(train)
                if sum(v.n_frames for v in done.videos) != frames:
                    raise SystemExit(f"{path}{label}: {sum(v.n_frames for v in done.videos)} frames written of "
                                     f"{frames}")
                beyond = (total - startup - solver_s) / frames
                rows.append((f"{path}{label}", total, startup, beyond))
    base = rows[0][3]
    print("| path | CPU s | start-up CPU s (rerun) | host CPU-ms/frame beyond the solver | vs two stages |")
    print("|---|---|---|---|---|")
    for name, total, startup, beyond in rows:
        print(f"| {name} | {total:.1f} | {startup:.1f} | {1000 * beyond:.2f} | {beyond / base:.2f} |")


if __name__ == "__main__":
    main()
