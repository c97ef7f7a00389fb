"""DDP for real: two processes launched by torchrun on the gloo backend (CPU) train the toy set.

With dropout off, two ranks of batch 2 see exactly the global batches of one process with batch 4 (the sampler
deals rank r the positions r, r+2, .. of one shared permutation) and DDP averages their gradients, so the run must
match a single-process run up to float rounding: same loss curve, same weights. Run as a script, this file is the
entry point torchrun starts in each process.
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

    torch.set_num_threads(2)
    single = train(TrainConfig(**common, out_dir=str(tmp_path / "single"), batch_size=4))

    rows = list(csv.DictReader((tmp_path / "ddp" / "metrics.csv").open()))
    ddp_losses = [float(r["train_loss"]) for r in rows]
    assert len(ddp_losses) == 4 and ddp_losses[-1] < 0.5 * ddp_losses[0]
    assert ddp_losses == pytest.approx([r["train_loss"] for r in single["history"]], rel=1e-4)
    a = load_checkpoint(tmp_path / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "last.pt")
    assert a["epoch"] == 4 and a["config"]["batch_size"] == 2
    for key, value in a["model_state"].items():
        torch.testing.assert_close(value, b["model_state"][key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp" / "best.pt").is_file() and (tmp_path / "ddp" / "curves.png").is_file()


if __name__ == "__main__":  # one torchrun process
    torch.set_num_threads(1)
    train(TrainConfig(**json.loads(sys.argv[1])))
