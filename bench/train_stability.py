"""Why from-scratch training is unstable: loss and gradient norm per SGD step under initialisation, warm-up,
batch norm and input scale (issue 16). Results in BENCHMARKS.md ("Training from scratch").

Each variant trains the same network on the same clips in the same order (the trainer's own data classes, seed 0:
``model.data.TrainClips`` + ``EpochSampler``, inputs normalised per channel as the trainer does) with the paper's
SGD (momentum 0.9, weight decay 5e-4), and records per step the cross-entropy and the global gradient norm (before
the step; nothing is clipped). At the end one centre clip per test video gives a validation accuracy. A variant is
a comma-separated list of ``key=value``:

    init=he-torchfc|he-smallfc|he|c3d|torch  (model.WEIGHT_INITS)     bn=0|1    BatchNorm after every conv
    lr=1e-3             base learning rate                         warmup=N  linear warm-up over the first N steps
    scale=unit|caffe    unit: the trainer's (x - mean) / std; caffe: x - mean only, on the 0..255 scale
                        (Caffe's C3D subtracts a mean image and does not divide), to see its init as it was meant

    .venv/bin/python bench/train_stability.py SHARDS --input rgb --model asym3d --clip 16x32x32 --batch 4 \\
        --steps 24 --variants "init=he;init=he,warmup=24;init=he-torchfc;init=c3d,scale=caffe" [--csv per_step.csv]

Prints one markdown row per variant, with this process's CPU seconds beside the wall time (the machine may be
shared) and the load average at the end.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model import build_model
from model.data import (CentreClips, EpochSampler, TrainClips, channel_statistics, collate_readable,
                        open_training_shards, split_videos)

DEFAULTS = {"init": "he-torchfc", "bn": "0", "lr": "1e-3", "warmup": "0", "scale": "unit"}


def parse_variant(text: str) -> dict[str, str]:
    variant = dict(DEFAULTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown variant key {key!r}; valid: {', '.join(DEFAULTS)}")
        variant[key] = value
    return variant


def grad_norms(net: torch.nn.Module) -> dict[str, float]:
    """Global L2 gradient norm and its share per part: conv features, fc6, fc7, fc8."""
    parts: dict[str, float] = {"features": 0.0, "fc6": 0.0, "fc7": 0.0, "fc8": 0.0}
    for name, p in net.named_parameters():
        if p.grad is not None:
            parts[name.split(".")[0]] += float(p.grad.detach().pow(2).sum())
    norms = {key: value ** 0.5 for key, value in parts.items()}
    norms["total"] = sum(parts.values()) ** 0.5
    return norms


def run_variant(args: argparse.Namespace, variant: dict[str, str], data: dict) -> tuple[dict, list[dict]]:
    torch.manual_seed(args.seed)
    net = build_model(args.model, num_classes=data["classes"], clip=args.clip, batch_norm=variant["bn"] == "1",
                      dropout=args.dropout, weight_init=variant["init"])
    lr, warmup = float(variant["lr"]), int(variant["warmup"])
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scale = data["std"] if variant["scale"] == "caffe" else torch.ones(1, 3, 1, 1, 1)
    sampler = EpochSampler(len(data["train"]), args.seed)
    loader = DataLoader(data["train"], sampler=sampler, batch_size=args.batch, collate_fn=collate_readable)
    rows: list[dict] = []
    wall, cpu = time.perf_counter(), time.process_time()
    net.train()
    epoch = 0
    while len(rows) < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            if len(rows) == args.steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (len(rows) + 1) / (warmup + 1)) if warmup else lr
            x, y = batch[args.input] * scale, batch["label"]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms = grad_norms(net)
            opt.step()
            rows.append({"step": len(rows) + 1, "lr": opt.param_groups[0]["lr"], "loss": float(loss.detach()),
                         "acc": float((logits.argmax(1) == y).float().mean()),
                         "logit_std": float(logits.detach().std()), **{f"grad_{k}": v for k, v in norms.items()}})
        epoch += 1
    net.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in DataLoader(data["val"], batch_size=16, collate_fn=collate_readable):
            pred = net(batch[args.input] * scale).argmax(1)
            correct += int((pred == batch["label"]).sum())
            seen += len(pred)
    losses = np.array([r["loss"] for r in rows])
    grads = np.array([r["grad_total"] for r in rows])
    tail = max(1, len(rows) // 5)
    summary = {
        "parts_1": "/".join(f"{rows[0]['grad_' + k]:.1f}" for k in ("features", "fc6", "fc7", "fc8")),
        "grad_1": grads[0], "grad_fc_1": (rows[0]["grad_fc6"] ** 2 + rows[0]["grad_fc7"] ** 2) ** 0.5,
        "grad_max": grads.max(), "grad_med": float(np.median(grads)), "logit_std_1": rows[0]["logit_std"],
        "loss_1": losses[0], "loss_max": losses.max(), "loss_head": losses[:tail].mean(),
        "loss_tail": losses[-tail:].mean(), "acc_tail": float(np.mean([r["acc"] for r in rows[-tail:]])),
        "val_acc": correct / max(seen, 1), "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
    }
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("--input", default="rgb")
    parser.add_argument("--model", default="asym3d")
    parser.add_argument("--clip", default="16x32x32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--split", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="init=he;init=he-torchfc", help="';'-separated variants")
    parser.add_argument("--csv", help="write every step of every variant here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.clip = tuple(int(v) for v in args.clip.split("x"))

    shards = open_training_shards(args.shards, args.input)
    videos = split_videos(shards, args.split, args.input, 0.0)
    mean, std = channel_statistics(shards, videos.train, args.input)
    common = (shards, videos.train, args.input, args.clip[0], args.clip[1], mean, std)
    data = {"classes": len(shards.classes), "train": TrainClips(*common, seed=args.seed),
            "val": CentreClips(shards, videos.test or videos.train, args.input, args.clip[0], args.clip[1], mean,
                               std),
            "std": torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1)}
    print(f"{args.model} {args.input} on {args.shards}: {len(videos.train)} train / {len(videos.test)} test videos, "
          f"{data['classes']} classes (ln K = {np.log(data['classes']):.2f}), clip {args.clip}, batch {args.batch}, "
          f"dropout {args.dropout}, {args.steps} steps; validation on "
          + ("the test videos" if videos.test else "the training videos (no test set)"))
    print("| variant | grad norm step 1 (conv/fc6/fc7/fc8) | grad norm median / max | logit std step 1 | loss step 1 / max | "
          "loss first / last fifth | train acc last fifth | val acc | wall / CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    all_rows = []
    for text in args.variants.split(";"):
        variant = parse_variant(text)
        s, rows = run_variant(args, variant, data)
        all_rows += [{"variant": text, **r} for r in rows]
        print(f"| {text} | {s['grad_1']:.2f} ({s['parts_1']}) | {s['grad_med']:.2f} / {s['grad_max']:.2f} | "
              f"{s['logit_std_1']:.3f} | {s['loss_1']:.2f} / {s['loss_max']:.2f} | {s['loss_head']:.2f} / "
              f"{s['loss_tail']:.2f} | {s['acc_tail']:.2f} | {s['val_acc']:.2f} | {s['wall']:.0f} / {s['cpu']:.0f} |",
              flush=True)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)


if __name__ == "__main__":
    main()
