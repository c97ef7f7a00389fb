"""What a training run writes beside its checkpoints, for people: ``metrics.csv``, ``curves.png`` and TensorBoard
events (when tensorboard is installed). Every file is written under a temporary name and renamed."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from pipeline.store import atomic_output

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "clips_per_s", "seconds")


def write_metrics(out: Path, history: list[dict[str, float]]) -> None:
    with atomic_output(out / "metrics.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(out: Path, history: list[dict[str, float]], title: str) -> None:
    """Loss and accuracy per epoch. Uses matplotlib's Figure directly: no pyplot state, no display needed."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.5), tight_layout=True)
    for ax, what in zip(fig.subplots(1, 2), ("loss", "acc")):
        ax.plot(epochs, [row[f"train_{what}"] for row in history], "o-", label="train")
        if any(not math.isnan(row[f"val_{what}"]) for row in history):
            ax.plot(epochs, [row[f"val_{what}"] for row in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    with atomic_output(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def tensorboard_writer(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
