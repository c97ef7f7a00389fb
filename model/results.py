"""What an evaluation produces for one split, and the metrics computed from it.

Metrics per split (video level): top-1, top-5 and mean class accuracy (the mean of per-class recalls, which weighs
small classes as much as large ones); over splits: the mean and the population standard deviation (ddof=0, so one
split has spread 0). Kept apart from the protocol (:mod:`model.evaluate`) and the report files
(:mod:`model.reports`) because fusion (:mod:`model.fusion`) makes results without running a network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.errors import Asym3dError, ConfigError

METRICS = ("top1", "top5", "mean_class")
METRIC_TITLES = {"top1": "top-1", "top5": "top-5", "mean_class": "mean class acc."}


class EvaluationError(Asym3dError):
    """An evaluation that cannot run: missing checkpoint, shards without the split's test videos, class mismatch."""


@dataclass
class SplitResult:
    """Per-video scores of one split and where they came from.

    ``scores`` is ``(videos, classes)``: the mean softmax over each video's views. ``views`` counts the views each
    video's score averages (clips x crops). ``absent`` lists planned videos the shards lack (failed or unfinished):
    their split membership is not stored, so they are reported, not counted as errors.
    """

    split: int
    video_ids: list[str]
    labels: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N, K) float32
    classes: list[str]
    views: np.ndarray  # (N,) int64
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, model, input, shards or fused runs
    absent: list[str] = field(default_factory=list)
    features: np.ndarray | None = None  # (N, D) per-video mean of a layer's activations, when asked for

    def metrics(self) -> dict[str, float]:
        return video_metrics(self.scores, self.labels)


def video_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-5 (top-K when there are fewer than 5 classes) and mean class accuracy, as fractions in [0, 1].

    Mean class accuracy averages the recall of the classes that have test videos; classes without any are left out
    rather than counted as 0.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
        raise ValueError(f"need scores (N, K) and labels (N,) with N > 0, got {scores.shape} and {labels.shape}")
    k = min(5, scores.shape[1])
    # stable sort on -scores: ties resolve to the lower class index, as argmax does
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top1 = topk[:, 0] == labels
    recalls = [top1[labels == c].mean() for c in np.unique(labels)]
    return {"top1": float(top1.mean()), "top5": float((topk == labels[:, None]).any(axis=1).mean()),
            "mean_class": float(np.mean(recalls))}


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts: row = true class, column = predicted class (argmax of the scores)."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(scores).argmax(axis=1)), 1)
    return matrix


def summarize(results: Sequence[SplitResult]) -> dict[str, Any]:
    """Per-split metrics and their mean and population std over the splits (the JSON report's body)."""
    per_split = {}
    for r in results:
        per_split[str(r.split)] = {**r.metrics(), "videos": len(r.video_ids),
                                   "views_per_video": _views_summary(r.views), "absent": len(r.absent),
                                   "source": r.source}
    table = np.array([[per_split[str(r.split)][m] for m in METRICS] for r in results])
    return {"splits": per_split,
            "mean": dict(zip(METRICS, map(float, table.mean(axis=0)))),
            "std": dict(zip(METRICS, map(float, table.std(axis=0))))}


def _views_summary(views: np.ndarray) -> int | list[int]:
    uniq = np.unique(views)
    return int(uniq[0]) if len(uniq) == 1 else [int(u) for u in uniq]


def markdown_table(summary: dict[str, Any], title: str = "") -> str:
    """The report as a markdown table: one row per split, then the mean and the spread (percent)."""
    header = "| split | videos | views/video | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    lines = [f"**{title}**", ""] if title else []
    lines += [header, "|" + "---|" * (3 + len(METRICS))]
    for split, row in summary["splits"].items():
        cells = " | ".join(f"{100 * row[m]:.2f}" for m in METRICS)
        lines.append(f"| {split} | {row['videos']} | {row['views_per_video']} | {cells} |")
    mean = " | ".join(f"{100 * summary['mean'][m]:.2f} ± {100 * summary['std'][m]:.2f}" for m in METRICS)
    lines.append(f"| mean ± std | | | {mean} |")
    absent = {s: row["absent"] for s, row in summary["splits"].items() if row["absent"]}
    if absent:
        lines += ["", "Videos planned but absent from the shards (failed or unfinished; their split is unknown): "
                  + ", ".join(f"split {s}: {n}" for s, n in absent.items())]
    return "\n".join(lines)


def parse_splits(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ConfigError on anything else."""
    try:
        splits = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"splits must be comma-separated integers, got {text!r}") from None
    if not splits or len(set(splits)) != len(splits) or min(splits) < 1:
        raise ConfigError(f"splits must be distinct positive integers, got {text!r}")
    return splits
