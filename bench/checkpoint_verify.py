"""What verifying checkpoints costs (issue 22): a save with the content digest against a bare ``torch.save``, and a
load with the zip CRC check and the digest against a bare ``torch.load``, on a checkpoint as the trainer writes it
(weights, SGD momentum, normalisation, RNG states). CPU seconds of this process (the best of ``--repeats``), so a
shared machine's load does not count.

    python bench/checkpoint_verify.py                      # c3d-b5, 101 classes, 16x112x112: a real run's size
    python bench/checkpoint_verify.py --clip 16x16x16 --classes 2 --repeats 1   # tiny (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import build_model  # noqa: E402
from model.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint  # noqa: E402


def trainer_state(name: str, classes: int, clip: tuple[int, int, int]) -> dict:
    torch.manual_seed(0)
    net = build_model(name, num_classes=classes, clip=clip)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    for p in net.parameters():  # one step, so the momentum buffers exist as in a real checkpoint
        p.grad = torch.randn_like(p)
    optimizer.step()
    return {"model_name": name, "model_kwargs": {"num_classes": classes, "clip": list(clip)},
            "model_state": net.state_dict(), "optimizer_state": optimizer.state_dict(), "scheduler_state": {},
            "epoch": 1, "config": {"split": 1}, "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3},
            "classes": [f"c{i}" for i in range(classes)], "metrics": {}, "rng_state": capture_rng_state()}


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="c3d-b5")
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--clip", default="16x112x112")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clip = tuple(int(s) for s in args.clip.split("x"))
    state = trainer_state(args.model, args.classes, clip)
    with tempfile.TemporaryDirectory() as tmp:
        bare, verified = Path(tmp) / "bare.pt", Path(tmp) / "verified.pt"

        def save_bare() -> None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            bare.write_bytes(buffer.getbuffer())

        rows = [("save", cpu_seconds(save_bare, args.repeats),
                 cpu_seconds(lambda: save_checkpoint(verified, state), args.repeats)),
                ("load", cpu_seconds(lambda: torch.load(bare, map_location="cpu", weights_only=True), args.repeats),
                 cpu_seconds(lambda: load_checkpoint(verified), args.repeats))]
        size = verified.stat().st_size / 2**20
    print(f"{args.model}, {args.classes} classes, clip {args.clip}: checkpoint {size:,.1f} MiB, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | bare torch CPU s | verified CPU s | verified / bare |")
    print("|---|---:|---:|---:|")
    for step, before, after in rows:
        print(f"| {step} | {before:.3f} | {after:.3f} | {after / max(before, 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
