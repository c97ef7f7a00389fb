"""Late fusion of saved per-video scores: the paper's "RGB+RGBF" rows (§4.7, "fusing the Softmax scores").

Each run evaluated by ``asym3d evaluate`` leaves ``eval/scores_split{N}.npz`` (mean softmax per test video). Fusion
is their weighted mean, per video. It only makes sense when every run scored the same videos with the same labels
and classes, so anything else is refused rather than silently intersected.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import ConfigError
from pipeline.lock import DirectoryLock

from .reports import check_report_identity, load_scores, write_reports
from .results import EvaluationError, SplitResult


def fusion_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One weight per run (equal when None), non-negative with a positive sum; :class:`EvaluationError` otherwise.
    Shared by ``evaluate --fuse`` and ``predict``."""
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise EvaluationError(f"{len(weights)} weights for {count} runs")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise EvaluationError(f"weights must be non-negative with a positive sum, got {weights}")
    return weights


def fuse_results(results: Sequence[SplitResult], weights: Sequence[float] | None = None) -> SplitResult:
    """Weighted mean ``sum_i w_i s_i / sum_i w_i`` of the runs' per-video scores, aligned by video id.

    Raises :class:`EvaluationError` when the runs differ in split, classes, video list or any video's label.
    """
    if len(results) < 2:
        raise EvaluationError(f"fusion needs at least two runs, got {len(results)}")
    weights = fusion_weights(weights, len(results))
    first = results[0]
    choices = {r.source.get("scores"): r.source.get("choice") or "unrecorded" for r in results}
    if len(set(choices.values())) > 1:
        raise EvaluationError("scores from different checkpoint choices: " + ", ".join(
            f"{name} from {choice!r}" for name, choice in choices.items()) + "; evaluate every run with the same "
            "--checkpoint first")
    where = {vid: i for i, vid in enumerate(first.video_ids)}
    fused = np.zeros(first.scores.shape, np.float64)
    for result, weight in zip(results, weights):
        name = result.source.get("scores", f"split {result.split}")
        if result.split != first.split:
            raise EvaluationError(f"{name}: split {result.split}, expected split {first.split}")
        if result.classes != first.classes:
            raise EvaluationError(f"{name}: other classes than {first.source.get('scores')}")
        if set(result.video_ids) != set(where) or len(result.video_ids) != len(where):
            only_here = sorted(set(result.video_ids) - set(where))[:3]
            only_there = sorted(set(where) - set(result.video_ids))[:3]
            raise EvaluationError(f"{name}: scores other videos than {first.source.get('scores')} "
                                  f"(only here: {only_here}, only there: {only_there}, first 3 of each)")
        order = np.array([where[vid] for vid in result.video_ids])
        if not np.array_equal(first.labels[order], result.labels):
            bad = result.video_ids[int(np.flatnonzero(first.labels[order] != result.labels)[0])]
            raise EvaluationError(f"{name}: video {bad!r} has another label than in {first.source.get('scores')}")
        fused[order] += weight * result.scores
    fused /= sum(weights)
    return SplitResult(split=first.split, video_ids=list(first.video_ids), labels=first.labels,
                       scores=fused.astype(np.float32), classes=first.classes, views=first.views,
                       source={"fused": [r.source.get("scores") for r in results], "weights": weights})


def parse_weights(text: str) -> list[float]:
    """``"1,2"`` -> ``[1.0, 2.0]``; ConfigError naming the text otherwise (NaN or inf would fuse into nonsense)."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"weights must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {text!r}")
    return weights


def fuse_runs(run_dirs: Sequence[Path], splits: Sequence[int], *, weights: Sequence[float] | None = None,
              out: Path | None = None) -> dict[str, Any]:
    """``asym3d evaluate --fuse RUN_A RUN_B``: fuse each split's saved scores and write the usual reports.

    Scores are read from ``RUN/eval/scores_split{N}.npz`` (any run layout: evaluate writes them there); reports go
    to ``out`` (default ``RUN_A/eval/fused_<A>+<B>``), whose identity names the checkpoints each run's scores came
    from (their digests), so fused scores of other checkpoints never silently replace a fused report. Returns the summary (see :func:`model.results.summarize`).
    """
    scores = [[load_scores(Path(run) / "eval" / f"scores_split{split}.npz") for run in run_dirs] for split in splits]
    fused = [fuse_results(per_split, weights) for per_split in scores]
    names = "+".join(Path(run).resolve().name for run in run_dirs)
    out = out or Path(run_dirs[0]) / "eval" / f"fused_{names}"
    identity = {"fused": [str(Path(run).resolve()) for run in run_dirs], "splits": list(splits),
                "weights": list(weights) if weights else None,
                "checkpoints": [[r.source["digest"] for r in per_split] for per_split in scores]}
    check_report_identity(out, identity)  # before anything is created; again under the lock
    with DirectoryLock(out):
        return write_reports(fused, out, title=f"fusion {names}", identity=identity)
