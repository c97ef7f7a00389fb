"""DDP for real: two processes launched by torchrun on the gloo backend (CPU) train the toy set.

With dropout off, two ranks of batch 2 see exactly the global batches of one process with batch 4 (the sampler
deals rank r the positions r, r+2, .. of one shared permutation) and DDP averages their gradients, so the run must
match a single-process run up to float rounding: same loss curve, same weights. Run as a script, this file is the
entry point torchrun starts in each process.

Both sides run one thread per process. The reference used to run on two threads while each rank ran on one; then 11
of the 9.4M weights differed by up to 1.7e-5 after 4 epochs (both of 2 runs here): the thread count changes how the
CPU kernels split their sums, and 8 SGD steps amplify that. With one thread on both sides, five runs of each (2 CPU
cores, torch 2.13) gave bit-identical reruns on each side and, DDP against one process, a largest weight difference
of 2.98e-8 (1 ulp at 0.25) and a largest relative train-loss difference of 1.3e-7: what remains is the order of the
batch sums (two half-batch means averaged by DDP against one batch of 4). The bounds below are those figures with a
margin of about 3x (weights) and 8x (losses).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    from test_train import write_toy_shards

    shards = write_toy_shards(tmp_path / "shards")
    common = dict(shard_dir=str(shards), model="c3d-b5", clip_len=16, crop=16, workers=0, epochs=4, lr=0.01,
                  dropout=0.0, device="cpu", progress=False)
    ddp_cfg = dict(common, out_dir=str(tmp_path / "ddp"), batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, json.dumps(ddp_cfg)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 4/4") == 1  # rank 0 alone logs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1 above, and the __main__ below)
    try:
        single = train(TrainConfig(**common, out_dir=str(tmp_path / "single"), batch_size=4))
    finally:
        torch.set_num_threads(threads)

    rows = list(csv.DictReader((tmp_path / "ddp" / "metrics.csv").open()))
    ddp_losses = [float(r["train_loss"]) for r in rows]
    assert len(ddp_losses) == 4 and ddp_losses[-1] < 0.5 * ddp_losses[0]
    assert ddp_losses == pytest.approx([r["train_loss"] for r in single["history"]], rel=1e-6, abs=0)
    a = load_checkpoint(tmp_path / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "last.pt")
    assert a["epoch"] == 4 and a["config"]["batch_size"] == 2
    for key, value in a["model_state"].items():
        torch.testing.assert_close(value, b["model_state"][key], rtol=0, atol=1e-7)
    assert (tmp_path / "ddp" / "best.pt").is_file() and (tmp_path / "ddp" / "curves.png").is_file()


if __name__ == "__main__":  # one torchrun process
    torch.set_num_threads(1)
    train(TrainConfig(**json.loads(sys.argv[1])))
