"""asym3d evaluate: the 250-view protocol counted at the network, metrics against hand computation, reports,
fusion of saved scores and the errors users meet (missing checkpoint, absent test videos, mismatched runs).

Shards are real HDF5 training shards written with the store API; checkpoints hold a real registered network
(untrained: accuracy means nothing, so metrics are checked on hand-made score arrays instead).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from model import build_model
from model.checkpoint import build_model_from_checkpoint, save_checkpoint
from model.evaluate import evaluate_split
from model.reports import load_scores, save_scores, write_reports
from model.results import EvaluationError, SplitResult, confusion_matrix, video_metrics
from model.fusion import fuse_results, parse_weights
from pipeline.lock import DirectoryLock
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, VideoMeta, prepare_output, shard_name

CLASSES = ["jump", "run", "wave"]
HEIGHT, WIDTH, CROP, CLIP_LEN = 20, 24, 16, 16
# video id -> (frames, label, split membership); "ghost" is planned but never written (a failed/unfinished video)
VIDEOS = {
    "long": (40, 0, {1: "test", 2: "train"}),
    "short": (5, 1, {1: "train", 2: "test"}),
    "train_only": (20, 2, {1: "train", 2: "train"}),
}


def video_frames(n: int) -> np.ndarray:
    """(n, H, W, 3) uint8 whose content says where it came from: channel 0 = column (so mirroring shows),
    channel 1 = 5 * frame index (so the clip's frame order shows), channel 2 = row."""
    frames = np.zeros((n, HEIGHT, WIDTH, 3), np.uint8)
    frames[..., 0] = np.arange(WIDTH)[None, None, :] * 5
    frames[..., 1] = (np.arange(n) * 5)[:, None, None]
    frames[..., 2] = np.arange(HEIGHT)[None, :, None] * 3
    return frames


def write_shards(root: Path, videos: dict = VIDEOS, planned_extra: tuple[str, ...] = ("ghost",)) -> Path:
    schema = Schema(kind="train", height=HEIGHT, width=WIDTH,
                    fields=tuple(FieldSpec(name, 3) for name in ("rgb", "flow", "rgbf")))
    prepare_output(root, schema, {"classes": CLASSES}, [list(videos) + list(planned_extra)])
    with ShardWriter(root / shard_name(0), schema, 0) as writer:
        for vid, (n, label, splits) in videos.items():
            frames = video_frames(n)
            writer.add_video(VideoMeta(vid, label, CLASSES[label], splits=splits),
                             {"rgb": frames, "flow": frames, "rgbf": frames})
    return root


@pytest.fixture(scope="module")
def net_state() -> dict:
    torch.manual_seed(0)
    net = build_model("asym3d", num_classes=len(CLASSES), clip=(CLIP_LEN, CROP, CROP))
    return {"model_name": "asym3d", "model_state": net.state_dict(),
            "model_kwargs": {"num_classes": len(CLASSES), "in_channels": 3, "clip": [CLIP_LEN, CROP, CROP],
                             "batch_norm": False, "dropout": 0.5}}


def checkpoint(net_state: dict, shard_dir: Path, modality: str = "rgb", split: int = 1) -> dict:
    """A checkpoint dict as the trainer writes it; mean 0 / std 1 so the network sees the stored values."""
    return {**net_state, "epoch": 1, "classes": CLASSES, "metrics": {},
            "config": {"input": modality, "split": split, "shard_dir": str(shard_dir), "crop": CROP,
                       "clip_len": CLIP_LEN},
            "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}


def run_with_hook(state: dict, shards: ShardSet, split: int, crops: int,
                  **options) -> tuple[SplitResult, torch.Tensor, torch.nn.Module]:
    """Evaluate; return the result, every input row the network received (captured by a forward pre-hook) and
    the network."""
    net = build_model_from_checkpoint(state)
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    result = evaluate_split(state, shards, split, crops=crops, batch_size=50, device="cpu", progress=False,
                            model=net, **options)
    return result, torch.cat(seen), net


def test_ten_crops_give_250_views_per_video_as_the_network_sees_them(tmp_path, net_state):
    shards = ShardSet(write_shards(tmp_path / "shards"))
    result, rows, _ = run_with_hook(checkpoint(net_state, shards.root, modality="flow"), shards, 1, crops=10)

    assert result.video_ids == ["long"] and result.views.tolist() == [250]
    assert rows.shape == (250, 3, CLIP_LEN, CROP, CROP)  # counted at the network, not taken from the config
    views = rows.view(25, 10, 3, CLIP_LEN, CROP, CROP)
    # 25 clips at equal intervals over 40 frames: starts 0..24, each 16 consecutive frames
    first_frames = views[:, 0, 1, :, 0, 0] / 5
    assert torch.equal(first_frames, torch.arange(25)[:, None] + torch.arange(CLIP_LEN)[None, :].float())
    # centre then four corners: the column (channel 0) and row (channel 2) of each crop's top-left pixel
    corners = [(views[0, i, 2, 0, 0, 0] / 3, views[0, i, 0, 0, 0, 0] / 5) for i in range(5)]
    assert [(int(r), int(c)) for r, c in corners] == [(2, 4), (0, 0), (0, 8), (4, 0), (4, 8)]
    # views 5..9 mirror views 0..4; this is flow, so mirroring negates u (channel 0 -> 255 - value)
    assert torch.equal(views[:, 5:, 0], 255 - views[:, :5, 0].flip(-1))
    assert torch.equal(views[:, 5:, 1:], views[:, :5, 1:].flip(-1))
    assert np.allclose(result.scores.sum(axis=1), 1, atol=1e-5)


def test_one_crop_gives_25_views_and_a_short_video_loops(tmp_path, net_state):
    shards = ShardSet(write_shards(tmp_path / "shards"))
    result, rows, _ = run_with_hook(checkpoint(net_state, shards.root, split=2), shards, 2, crops=1)

    assert result.video_ids == ["short"] and result.views.tolist() == [25]
    assert rows.shape[0] == 25
    # 5 frames < 16: every clip starts at 0 and loops 0,1,2,3,4,0,1,.. (model.clips.clip_indices)
    frame_index = rows[:, 1, :, 0, 0] / 5
    assert torch.equal(frame_index, (torch.arange(CLIP_LEN) % 5).float().expand(25, -1))


def test_fc6_features_are_the_mean_relu_activation_over_views(tmp_path, net_state):
    shards = ShardSet(write_shards(tmp_path / "shards"))
    result, rows, net = run_with_hook(checkpoint(net_state, shards.root), shards, 1, crops=1, clips=3,
                                      feature_layer="fc6")
    with torch.no_grad():
        expected = torch.relu(net.fc6(net.features(rows).flatten(1))).mean(dim=0)
    assert result.features.shape == (1, net.fc6.out_features)
    assert np.allclose(result.features[0], expected.numpy(), rtol=1e-4, atol=1e-6)


def test_metrics_match_a_hand_computation():
    rng = np.random.default_rng(3)
    scores = rng.random((40, 7))
    labels = rng.integers(0, 6, 40)  # class 6 has no videos: left out of the mean class accuracy
    got = video_metrics(scores, labels)

    top1 = [int(np.argmax(s) == y) for s, y in zip(scores, labels)]
    top5 = [int(y in sorted(range(7), key=lambda c: -s[c])[:5]) for s, y in zip(scores, labels)]
    per_class = [np.mean([t for t, y in zip(top1, labels) if y == c]) for c in sorted(set(labels.tolist()))]
    assert got["top1"] == pytest.approx(sum(top1) / 40)
    assert got["top5"] == pytest.approx(sum(top5) / 40)
    assert got["mean_class"] == pytest.approx(np.mean(per_class))
    assert got["top1"] != got["mean_class"]  # unbalanced classes: the two really differ here

    matrix = confusion_matrix(scores, labels, 7)
    assert matrix.sum() == 40 and np.trace(matrix) == sum(top1)
    assert matrix[labels[0], np.argmax(scores[0])] >= 1


def test_split_without_test_videos_is_an_error_and_absent_videos_are_reported(tmp_path, net_state):
    videos = {"long": VIDEOS["long"], "train_only": VIDEOS["train_only"]}
    shards = ShardSet(write_shards(tmp_path / "shards", videos, planned_extra=("ghost", "short")))
    with pytest.raises(EvaluationError, match="split 2's test videos"):
        evaluate_split(checkpoint(net_state, shards.root, split=2), shards, 2, crops=1, clips=1, progress=False)
    with pytest.raises(EvaluationError, match="trained on split 1"):
        evaluate_split(checkpoint(net_state, shards.root, split=1), shards, 3, progress=False)
    result = evaluate_split(checkpoint(net_state, shards.root), shards, 1, crops=1, clips=1, progress=False)
    assert result.absent == ["ghost", "short"]


def make_run(tmp_path: Path, net_state: dict, shard_dir: Path, splits: tuple[int, ...] = (1, 2)) -> Path:
    run = tmp_path / "run"
    for split in splits:
        (run / f"split{split}").mkdir(parents=True)
        save_checkpoint(run / f"split{split}" / "best.pt", checkpoint(net_state, shard_dir, split=split))
    return run


def test_cli_evaluate_writes_every_report(tmp_path, net_state):
    shard_dir = write_shards(tmp_path / "shards")
    run = make_run(tmp_path, net_state, shard_dir)
    res = CliRunner().invoke(main, ["evaluate", str(run), "--splits", "1,2", "--crops", "1", "--clips", "3",
                                    "--device", "cpu", "--features", "fc6", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["splits"]["1"]["videos"] == 1 and report["splits"]["1"]["views_per_video"] == 3
    assert report["splits"]["2"]["absent"] == 1  # "ghost"
    eval_dir = run / "eval"
    for split in (1, 2):
        scores = load_scores(eval_dir / f"scores_split{split}.npz")
        expected = video_metrics(scores.scores, scores.labels)
        assert report["splits"][str(split)]["top1"] == pytest.approx(expected["top1"])
        with np.load(eval_dir / f"features_split{split}.npz") as features:
            assert features["features"].shape == (1, 4096) and list(features["video_ids"]) == scores.video_ids
        assert (eval_dir / f"confusion_split{split}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = list(csv.DictReader(open(eval_dir / f"per_class_split{split}.csv")))
        assert [r["class"] for r in rows] == CLASSES and sum(int(r["videos"]) for r in rows) == 1
    tops = [report["splits"][s]["top1"] for s in ("1", "2")]
    assert report["mean"]["top1"] == pytest.approx(np.mean(tops))
    assert report["std"]["top1"] == pytest.approx(np.std(tops))
    assert "| mean ± std |" in (eval_dir / "results.md").read_text()


def test_cli_missing_split_checkpoint_names_the_path(tmp_path, net_state):
    shard_dir = write_shards(tmp_path / "shards")
    run = make_run(tmp_path, net_state, shard_dir, splits=(1,))
    res = CliRunner().invoke(main, ["evaluate", str(run), "--splits", "1,2", "--device", "cpu"])
    assert res.exit_code == 1
    assert str(run / "split2" / "best.pt") in res.output


def scores_file(run: Path, split: int, ids: list[str], labels: list[int], seed: int) -> SplitResult:
    scores = np.random.default_rng(seed).dirichlet(np.ones(len(CLASSES)), len(ids)).astype(np.float32)
    result = SplitResult(split, ids, np.array(labels), scores, CLASSES, np.full(len(ids), 250))
    (run / "eval").mkdir(parents=True, exist_ok=True)
    save_scores(result, run / "eval" / f"scores_split{split}.npz")
    return result


def test_cli_fuse_is_the_weighted_mean_of_saved_scores(tmp_path):
    rgb = scores_file(tmp_path / "rgb", 1, ["a", "b", "c", "d"], [0, 1, 2, 1], seed=1)
    rgbf = scores_file(tmp_path / "rgbf", 1, ["c", "a", "d", "b"], [2, 0, 1, 1], seed=2)  # other order
    res = CliRunner().invoke(main, ["evaluate", "--fuse", str(tmp_path / "rgb"), str(tmp_path / "rgbf"),
                                    "--splits", "1", "--weights", "1,3"])
    assert res.exit_code == 0, res.output
    fused = load_scores(tmp_path / "rgb" / "eval" / "fused_rgb+rgbf" / "scores_split1.npz")
    order = [rgbf.video_ids.index(v) for v in rgb.video_ids]
    assert fused.video_ids == rgb.video_ids
    assert np.allclose(fused.scores, (1 * rgb.scores + 3 * rgbf.scores[order]) / 4, atol=1e-6)
    assert "| 1 | 4 | 250 |" in res.stdout


def test_fusion_refuses_other_videos_or_labels(tmp_path):
    base = scores_file(tmp_path / "a", 1, ["a", "b", "c"], [0, 1, 2], seed=1)
    other_videos = scores_file(tmp_path / "b", 1, ["a", "b", "x"], [0, 1, 2], seed=2)
    other_labels = scores_file(tmp_path / "c", 1, ["a", "b", "c"], [0, 2, 2], seed=3)
    with pytest.raises(EvaluationError, match="other videos"):
        fuse_results([base, other_videos])
    with pytest.raises(EvaluationError, match="'b' has another label"):
        fuse_results([base, other_labels])
    res = CliRunner().invoke(main, ["evaluate", "--fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--splits", "1"])
    assert res.exit_code == 1 and "other videos" in res.output


def test_a_report_of_other_splits_or_checkpoints_is_never_replaced(tmp_path):
    result = SplitResult(1, ["a", "b"], np.array([0, 1]), np.eye(2, len(CLASSES), dtype=np.float32), CLASSES,
                         np.full(2, 250), source={"choice": "best"})
    best = {"splits": [1], "checkpoints": ["best"], "clips": 25, "crops": 10, "shards": None}
    with DirectoryLock(tmp_path / "eval"):  # as its callers hold it
        write_reports([result], tmp_path / "eval", identity=best)
        write_reports([result], tmp_path / "eval", identity=best)  # the same evaluation again: replaced
        before = (tmp_path / "eval" / "results.json").read_bytes()
        with pytest.raises(EvaluationError, match="results.json: holds a report of .*'best'.*refusing to replace"):
            write_reports([result], tmp_path / "eval", identity={**best, "checkpoints": ["last"]})
    assert (tmp_path / "eval" / "results.json").read_bytes() == before


def test_fusion_refuses_scores_from_different_checkpoint_choices(tmp_path):
    for run, choice in (("a", "best"), ("b", "last")):
        (tmp_path / run / "eval").mkdir(parents=True)
        save_scores(SplitResult(1, ["a"], np.array([0]), np.ones((1, len(CLASSES)), np.float32), CLASSES,
                                np.full(1, 250), source={"choice": choice}),
                    tmp_path / run / "eval" / "scores_split1.npz")
    res = CliRunner().invoke(main, ["evaluate", "--fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--splits", "1"])
    assert res.exit_code == 1 and "different checkpoint choices" in res.output and "'last'" in res.output


def test_cli_a_checkpoint_path_and_bad_devices_are_one_line(tmp_path, net_state):
    """A directory that holds a checkpoint but no run.json (not made by train) is not a run; --checkpoint PATH
    evaluates the file. (Both layouts train writes: tests/test_runs.py.)"""
    shard_dir = write_shards(tmp_path / "shards")
    run = tmp_path / "single"
    run.mkdir()
    save_checkpoint(run / "best.pt", checkpoint(net_state, shard_dir, split=1))
    res = CliRunner().invoke(main, ["evaluate", str(run), "--splits", "1", "--device", "cpu"])
    assert res.exit_code == 1 and f"{run / 'split1' / 'best.pt'}: no checkpoint for split 1" in res.output
    res = CliRunner().invoke(main, ["evaluate", str(run), "--splits", "1", "--checkpoint", str(run / "best.pt"),
                                    "--clips", "1", "--crops", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for device, reason in (("bogus", "not a device"), ("cuda:99", "CUDA device")):
        res = CliRunner().invoke(main, ["evaluate", str(run), "--splits", "1", "--device", device])
        assert res.exit_code == 1 and reason in res.output and res.exc_info[0] is SystemExit


def test_checkpoint_whose_settings_do_not_fit_its_weights_is_one_line(tmp_path, net_state):
    shard_dir = write_shards(tmp_path / "shards")
    state = checkpoint(net_state, shard_dir, split=1)
    state["model_kwargs"] = {**state["model_kwargs"], "num_classes": len(CLASSES) + 1}  # edited settings
    run = tmp_path / "run"
    (run / "split1").mkdir(parents=True)
    save_checkpoint(run / "split1" / "best.pt", state)
    res = CliRunner().invoke(main, ["evaluate", str(run), "--splits", "1", "--device", "cpu"])
    assert res.exit_code == 1 and res.exc_info[0] is SystemExit
    assert str(run / "split1" / "best.pt") in res.output and "do not fit its weights" in res.output


def test_fusion_weights_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        parse_weights("nan,1")
    assert parse_weights("1,2.5") == [1.0, 2.5]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_damaged_frame_stops_evaluation_in_one_line_naming_the_shard(tmp_path, net_state, workers):
    from test_integrity import _flip, _stored_regions

    shard_dir = write_shards(tmp_path / "shards")
    run = make_run(tmp_path, net_state, shard_dir, splits=(1,))
    shard = shard_dir / shard_name(0)
    name, offset, size = next(r for r in _stored_regions(shard) if "/rgb" in r[0])
    _flip(shard, offset + size // 2)
    result = subprocess.run([sys.executable, "-m", "cli", "evaluate", str(run), "--splits", "1", "--crops", "1",
                             "--clips", "1", "--device", "cpu", "--workers", workers],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"{shard}: video " in errors[0] and "asym3d inspect" in errors[0], result.stderr
