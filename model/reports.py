"""The report files of ``asym3d evaluate`` and ``--fuse``: per split ``scores_split{N}.npz`` (video ids, labels,
scores, classes, where they came from), a per-class accuracy CSV, a confusion-matrix PNG (and fc6 features when kept),
then ``results.json`` and ``results.md`` over the splits.

A report directory is never silently replaced by one of other splits, checkpoints or protocol (its score files would
be left beside the new ones and fused later by mistake): the caller checks :func:`check_report_identity` before it
starts and again under the directory's lock (:mod:`pipeline.lock`), which it holds until the report is written.
"""
from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.store import StoreError, atomic_output, read_json, write_text_atomic

from .results import EvaluationError, SplitResult, confusion_matrix, markdown_table, summarize


def write_reports(results: Sequence[SplitResult], out: Path, title: str = "",
                  identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``scores_split{N}.npz``, ``per_class_split{N}.csv``, ``confusion_split{N}.png`` (and
    ``features_split{N}.npz`` when features were kept), ``results.json`` and ``results.md`` into ``out``.

    ``identity`` (the splits, checkpoints and protocol that made the report) is stored in results.json; a report of
    another identity already in ``out`` is refused, never silently replaced (its score files would be left beside
    the new ones). The caller holds ``out``'s lock (see the module docstring).
    Returns the summary (see :func:`summarize`) with the markdown table under "table" and ``out``."""
    check_report_identity(out, identity)
    for r in results:
        save_scores(r, out / f"scores_split{r.split}.npz")
        write_per_class_csv(r, out / f"per_class_split{r.split}.csv")
        plot_confusion(r, out / f"confusion_split{r.split}.png")
        if r.features is not None:
            save_features(r, out / f"features_split{r.split}.npz")
    summary = summarize(results)
    summary["title"] = title
    summary["identity"] = identity
    table = markdown_table(summary, title)
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "results.md", table + "\n")
    return {**summary, "table": table, "out": str(out)}


def check_report_identity(out: Path, identity: dict[str, Any] | None) -> None:
    """Refuse to replace a report in ``out`` made from other splits, checkpoints (choice, epoch, digest) or
    protocol; the same identity again is a rerun and may replace it."""
    path = out / "results.json"
    if not path.exists():
        return
    try:
        old = read_json(path).get("identity")
    except (StoreError, AttributeError):
        old = "unreadable"
    if old != json.loads(json.dumps(identity)):
        raise EvaluationError(f"{path}: holds a report of {old}, not {identity}; refusing to replace it (pass "
                              "another --out, or delete that directory)")


def _save_npz(result: SplitResult, path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` plus the video ids, labels, classes, split and the checkpoint's choice and digest, as plain arrays
    (loadable without pickle)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, video_ids=np.array(result.video_ids, dtype=str), labels=result.labels,
                 classes=np.array(result.classes, dtype=str), split=np.int64(result.split),
                 choice=np.array(str(result.source.get("choice", ""))),
                 digest=np.array(str(result.source.get("digest", ""))), **arrays)


def save_scores(result: SplitResult, path: Path) -> None:
    """Per-video mean softmax scores ``(N, K)`` and view counts, for reports and later fusion."""
    _save_npz(result, path, scores=result.scores.astype(np.float32), views=result.views)


def save_features(result: SplitResult, path: Path) -> None:
    """Per-video mean features ``(N, D)`` of the layer asked for, for a linear classifier (C3D's net + SVM)."""
    _save_npz(result, path, features=result.features)


def load_scores(path: Path) -> SplitResult:
    """A ``scores_split{N}.npz`` back as a :class:`SplitResult` (allow_pickle=False: score files stay data)."""
    if not path.is_file():
        raise EvaluationError(f"{path}: no saved scores (run asym3d evaluate on that run first)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return SplitResult(split=int(data["split"]), video_ids=[str(v) for v in data["video_ids"]],
                               labels=data["labels"].astype(np.int64), scores=data["scores"],
                               classes=[str(c) for c in data["classes"]], views=data["views"],
                               source={"scores": str(path), **{key: str(data[key]) if key in data.files else ""
                                                               for key in ("choice", "digest")}})
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # truncated or damaged: the zip's
        raise EvaluationError(f"{path}: not a readable scores file ({err})") from None  # CRCs are checked on read


def write_per_class_csv(result: SplitResult, path: Path) -> None:
    """One row per class: index, name, test videos, correct (top-1), accuracy (empty when it has no videos)."""
    predicted = result.scores.argmax(axis=1)
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_index", "class", "videos", "correct", "accuracy"])
        for c, name in enumerate(result.classes):
            mine = result.labels == c
            n, correct = int(mine.sum()), int((predicted[mine] == c).sum())
            writer.writerow([c, name, n, correct, f"{correct / n:.4f}" if n else ""])


def plot_confusion(result: SplitResult, path: Path) -> None:
    """Confusion matrix as a PNG, rows normalised to recall so large and small classes read alike."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    k = len(result.classes)
    matrix = confusion_matrix(result.scores, result.labels, k).astype(np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    recall = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = min(4 + 0.12 * k, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(recall, vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"split {result.split}: top-1 {100 * result.metrics()['top1']:.1f}%")
    if k <= 30:  # names are unreadable beyond that; indices match the per-class CSV
        ax.set_xticks(range(k), result.classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), result.classes, fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
