"""The whole road through the CLI, as the README and `make demo` run it, at CI size: make-demo-data -> extract-flow
(OpenCV TV-L1) -> build-rgbf -> train RGB and RGBF -> evaluate each -> evaluate --fuse.

Tiny on purpose (3 classes x 3 videos of 17 frames at 24x32, one split, one epoch, 16x16x16 clips): it checks that
every stage hands the next what it needs and that the reports agree with each other, not that anything is learned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main

CLASSES, VIDEOS_PER_CLASS, GROUPS = 3, 3, 3  # split 1 tests group g01: one video per class
SIZE = "24x32"


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"asym3d {' '.join(args)} failed:\n{result.output}"
    return result.output


@pytest.fixture(scope="module")
def road(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run every stage once; the tests below read what it left."""
    out = tmp_path_factory.mktemp("road")
    data, flow, shards, runs = out / "data", out / "flow", out / "shards", out / "runs"
    _run("make-demo-data", str(data), "--classes", str(CLASSES), "--videos-per-class", str(VIDEOS_PER_CLASS),
         "--groups", str(GROUPS), "--frames", "17", "--size", SIZE, "--seed", "1")
    _run("extract-flow", str(data / "videos"), str(flow), "--dataset", "ucf101", "--splits-dir", str(data / "splits"),
         "--size", SIZE, "--backend", "cpu", "--jobs", "1", "--videos-per-shard", "5")
    _run("build-rgbf", str(flow), str(shards))
    for modality in ("rgb", "rgbf"):
        _run("train", str(shards), "--model", "c3d-b5", "--input", modality, "--splits", "1",
             "--out", str(runs / modality), "--clip", "16x16x16", "--epochs", "1", "--batch-size", "3",
             "--batch-norm", "--dropout", "0.2", "--workers", "0")
        _run("evaluate", str(runs / modality), "--splits", "1", "--clips", "2", "--crops", "10")
    _run("evaluate", "--fuse", str(runs / "rgb"), str(runs / "rgbf"), "--splits", "1")
    return runs


def _results(path: Path) -> dict:
    return json.loads(path.read_text())


def test_training_wrote_a_run_per_input_with_the_options_given(road: Path) -> None:
    for modality in ("rgb", "rgbf"):
        run = road / modality / "split1"
        assert (run / "best.pt").is_file() and (run / "last.pt").is_file() and (run / "curves.png").is_file()
        info = json.loads((run / "run.json").read_text())
        assert info["config"]["input"] == modality
        assert info["config"]["dropout"] == 0.2 and info["model_kwargs"]["dropout"] == 0.2
        assert info["config"]["batch_norm"] is True
        assert info["train_videos"] == CLASSES * (VIDEOS_PER_CLASS - 1)
        assert info["test_videos"] == CLASSES
        assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch


def test_each_evaluation_scores_every_test_video_with_every_view(road: Path) -> None:
    for modality in ("rgb", "rgbf"):
        report = _results(road / modality / "eval" / "results.json")
        split = report["splits"]["1"]
        assert split["videos"] == CLASSES and split["views_per_video"] == 2 * 10 and split["absent"] == 0
        assert split["source"]["input"] == modality and split["source"]["model"] == "c3d-b5"
        # The report is what its saved scores say (nothing is learned at this size, so the scores are checked, not
        # the accuracy): one test video per class, each the mean of its 20 views' softmax, top-1 from their argmax,
        # and top-5 of 3 classes always holds the label.
        saved = np.load(road / modality / "eval" / "scores_split1.npz")
        assert sorted(saved["labels"]) == list(range(CLASSES)) and (saved["views"] == 2 * 10).all()
        np.testing.assert_allclose(saved["scores"].sum(axis=1), 1.0, atol=1e-5)
        hits = saved["scores"].argmax(1) == saved["labels"]
        assert split["top1"] == pytest.approx(hits.mean()) and split["mean_class"] == pytest.approx(hits.mean())
        assert split["top5"] == 1.0
        assert report["mean"]["top1"] == pytest.approx(split["top1"])


def test_fusion_is_the_mean_of_the_two_runs_scores(road: Path) -> None:
    fused = _results(road / "rgb" / "eval" / "fused_rgb+rgbf" / "results.json")
    assert fused["splits"]["1"]["videos"] == CLASSES
    per_run = [np.load(road / modality / "eval" / "scores_split1.npz") for modality in ("rgb", "rgbf")]
    fused_scores = np.load(road / "rgb" / "eval" / "fused_rgb+rgbf" / "scores_split1.npz")
    labels = per_run[0]["labels"]
    np.testing.assert_array_equal(per_run[1]["labels"], labels)
    np.testing.assert_allclose(fused_scores["scores"], (per_run[0]["scores"] + per_run[1]["scores"]) / 2, atol=1e-6)
    top1 = float(np.mean(fused_scores["scores"].argmax(1) == labels))
    assert fused["splits"]["1"]["top1"] == pytest.approx(top1)
