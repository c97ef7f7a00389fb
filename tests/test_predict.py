"""asym3d predict on real clips (issue 23, item 1): a video's scores equal evaluate's for the same video read from
the training shards, bit for bit, for an RGB and an RGBF run and for their fusion; checkpoints carry what predict
needs; older ones get one line; a bad video is one line and the rest go on.

The shards, runs and checkpoints are made by the real commands (extract-flow with the OpenCV TV-L1 --train-dir,
train) on four real clips at 32x43, 24 frames each, so the module's set-up takes a few seconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from model import feature_shape, get_spec
from model.checkpoint import load_checkpoint, save_checkpoint
from model.evaluate import evaluate_split
from model.fusion import fuse_results
from model.predict import load_run, predict_videos

CLIPS = Path(__file__).parent / "data" / "real_clips"
TRAIN = {"Basketball": CLIPS / "ucf101" / "Basketball" / "v_Basketball_g01_c02.mp4",
         "tai_chi": CLIPS / "other" / "kinetics400_tai_chi" / "ta_chi.mp4"}
TEST = {"PushUps": CLIPS / "ucf101" / "PushUps" / "v_PushUps_g02_c03.avi",
        "dive": CLIPS / "hmdb51" / "dive" / "BASE_Jumping_Compilation_-_Brilliant_dive_f_cm_np1_le_bad_3.mp4"}
PROTOCOL = {"clips": 3, "crops": 10, "batch_size": 30, "device": "cpu"}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Real clips -> training shards (TV-L1, JPEG) -> an RGB and an RGBF run (1 epoch, asym3d, 16x16x16)."""
    root = tmp_path_factory.mktemp("predict")
    videos, splits = root / "videos", root / "splits"
    splits.mkdir()
    for subset, clips in (("train", TRAIN), ("test", TEST)):
        lines = []
        for name, source in clips.items():
            (videos / name).mkdir(parents=True)
            shutil.copy(source, videos / name / source.name)
            lines.append(f"{name}/{source.name}")
        (splits / f"{subset}list01.txt").write_text("\n".join(lines) + "\n")
    invoke("extract-flow", videos, root / "flow", "--dataset", "folder", "--splits-dir", splits, "--size", "32x43",
           "--max-frames", "24", "--backend", "cpu", "--train-dir", root / "shards")
    runs = {}
    for modality in ("rgb", "rgbf"):
        runs[modality] = root / "runs" / modality
        invoke("train", root / "shards", "--model", "asym3d", "--input", modality, "--out", runs[modality],
               "--clip", "16x16x16", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu")
    return {"root": root, "shards": root / "shards", **runs}


def evaluated(run: Path, shards: Path):
    return evaluate_split(run / "best.pt", shards, 1, progress=False, **PROTOCOL)


def test_predict_scores_equal_evaluate_scores_for_rgb_rgbf_and_their_fusion(made):
    runs = [load_run(made[m]) for m in ("rgb", "rgbf")]
    results = [evaluated(made[m], made["shards"]) for m in ("rgb", "rgbf")]
    videos = [made["root"] / "videos" / name / path.name for name, path in TEST.items()]
    ids = [f"{name}/{path.stem}" for name, path in TEST.items()]
    for run, result in zip(runs, results):
        assert sorted(result.video_ids) == sorted(ids)
        predictions = list(predict_videos([run], videos, clips=3, crops=10, batch_size=30, device="cpu",
                                          flow_backend_name="cpu"))
        for video_id, prediction in zip(ids, predictions):
            assert prediction.error is None and prediction.views == 30
            assert np.array_equal(prediction.scores, result.scores[result.video_ids.index(video_id)])
    fused = fuse_results([r for r in results], [1.0, 2.0])
    for video_id, prediction in zip(ids, predict_videos(runs, videos, weights=[1, 2], clips=3, crops=10,
                                                        batch_size=30, device="cpu", flow_backend_name="cpu")):
        assert np.array_equal(prediction.scores, fused.scores[fused.video_ids.index(video_id)])


def test_cli_prints_top_k_json_and_csv_and_walks_directories(made):
    test_dir = made["root"] / "videos"
    out = invoke("predict", made["rgb"], made["rgbf"], test_dir / "PushUps", *PROTOCOL_ARGS, "--top", "2")
    line, = out.splitlines()
    assert line.startswith(str(test_dir / "PushUps" / TEST["PushUps"].name) + ": ") and line.count(",") == 1
    report = json.loads(invoke("predict", made["rgb"], test_dir, *PROTOCOL_ARGS, "--json", "--top", "3"))
    assert len(report) == 4 and all(len(r["top"]) == 3 and r["views"] == 30 for r in report)
    probabilities = [t["probability"] for t in report[0]["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    rows = invoke("predict", made["rgb"], test_dir / "dive", *PROTOCOL_ARGS, "--csv", "--top", "4").splitlines()
    assert rows[0] == "video,rank,class,probability" and [r.split(",")[1] for r in rows[1:]] == ["1", "2", "3", "4"]


PROTOCOL_ARGS = ("--clips", "3", "--device", "cpu", "--flow-backend", "cpu")


def test_a_bad_video_is_one_line_and_the_others_go_on(made, tmp_path):
    (tmp_path / "not_a_video.avi").write_text("text, not a video\n")
    shutil.copy(TEST["dive"], tmp_path / "dive.mp4")
    result = CliRunner().invoke(main, ["predict", str(made["rgbf"]), str(tmp_path), *PROTOCOL_ARGS])
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit
    assert result.stdout.startswith(f"{tmp_path / 'dive.mp4'}: ")
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(tmp_path / "not_a_video.avi") in errors[0]


def test_checkpoints_carry_the_schema_and_an_older_one_says_what_is_missing(made, tmp_path):
    state = load_checkpoint(made["rgbf"] / "best.pt")
    assert state["schema"]["config"]["source"]["flow"]["algorithm"] == "tvl1"
    del state["schema"]
    save_checkpoint(tmp_path / "old.pt", state)
    video = TEST["dive"]
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "old.pt"), str(video), *PROTOCOL_ARGS])
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit
    assert result.output.count("\n") == 1 and "carried their shards' schema" in result.output
    assert "--shards" in result.output
    with_shards = invoke("predict", tmp_path / "old.pt", video, *PROTOCOL_ARGS, "--shards", made["shards"])
    assert with_shards == invoke("predict", made["rgbf"], video, *PROTOCOL_ARGS)


# ------------------------------------------------------------------------------------------------ asym3d features


def feature_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from model.features import read_features

    return {v.video_id: (v.starts, v.windows, v.mean) for v in read_features(path)}


def test_features_are_deterministic_their_mean_is_the_windows_mean_and_match_the_evaluator(made, tmp_path):
    videos = made["root"] / "videos"
    for name in ("a.h5", "b.h5"):
        out = invoke("features", made["rgbf"], videos, "--out", tmp_path / name, "--stride", "8", *PROTOCOL_ARGS[2:])
        assert "4 videos computed, 0 already there, 0 failed" in out
    first, second = feature_file(tmp_path / "a.h5"), feature_file(tmp_path / "b.h5")
    assert sorted(first) == sorted(str(p) for p in videos.rglob("*.*"))
    for video_id, (starts, windows, mean) in first.items():
        assert starts.tolist() == [0, 8] and windows.shape == (2, 4096)  # 24 frames: windows at 0 and 8
        assert all(np.array_equal(a, b) for a, b in zip(second[video_id], (starts, windows, mean)))
        assert np.array_equal(mean, windows.astype(np.float64).mean(axis=0).astype(np.float32))
        assert np.allclose(mean, windows.mean(axis=0), rtol=1e-6, atol=1e-6) and windows.std(axis=0).max() > 0
    # from the shards, the window at 0 is the evaluator's one clip (clips=1 starts at 0), centre crop, fc6 after ReLU
    invoke("features", made["rgbf"], "--shards", made["shards"], "--out", tmp_path / "shards.h5", "--device", "cpu")
    stored = feature_file(tmp_path / "shards.h5")
    result = evaluate_split(made["rgbf"] / "best.pt", made["shards"], 1, clips=1, crops=1, device="cpu",
                            progress=False, feature_layer="fc6")
    for video_id, features in zip(result.video_ids, result.features):
        assert np.array_equal(stored[video_id][1][0], features)
    # the same video from its file and from the shards: the same numbers (the input is made as the shards were)
    pushups = f"PushUps/{TEST['PushUps'].stem}"
    assert np.array_equal(stored[pushups][1], first[str(videos / "PushUps" / TEST["PushUps"].name)][1])


def test_features_resume_skip_finished_videos_and_refuse_another_configuration(made, tmp_path):
    videos = made["root"] / "videos"
    out = tmp_path / "f.h5"
    invoke("features", made["rgb"], videos / "dive", "--out", out, "--layer", "pool5", "--device", "cpu")
    before = feature_file(out)
    assert "1 videos computed, 1 already there" in invoke("features", made["rgb"], videos / "dive", videos / "PushUps",
                                                          "--out", out, "--layer", "pool5", "--device", "cpu")
    after = feature_file(out)
    (video_id, kept), = before.items()
    assert len(after) == 2 and all(np.array_equal(a, b) for a, b in zip(after[video_id], kept))
    assert after[video_id][1].shape[1] == np.prod(feature_shape(get_spec("asym3d"), (16, 16, 16)))  # pool5, flat
    data = out.read_bytes()
    result = CliRunner().invoke(main, ["features", str(made["rgb"]), str(videos / "dive"), "--out", str(out),
                                       "--layer", "fc7", "--device", "cpu"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "another configuration" in result.output
    assert out.read_bytes() == data and not (tmp_path / "f.h5.parts").exists()


# ------------------------------------------------------------------------------------------------ asym3d export


def exported_difference(output: str) -> tuple[float, float]:
    import re

    match = re.search(r"largest difference (\S+) in the logits \(bound (\S+)\)", output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch_on_real_clips_within_the_stated_bound(made, tmp_path, fmt):
    from model.checkpoint import build_model_from_checkpoint
    from model.export import BOUNDS

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{fmt}"
    printed = invoke("export", made["rgbf"], "--format", fmt, "--out", out, "--check", TEST["PushUps"],
                     "--check", TEST["dive"])
    assert "40 views of 2 real clip(s)" in printed
    difference, bound = exported_difference(printed)
    state = load_checkpoint(made["rgbf"] / "best.pt")
    net = build_model_from_checkpoint(state).eval()
    views = torch.randn(3, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 2  # another batch size
    with torch.no_grad():
        reference = net(views)
    if fmt == "torchscript":
        extra = {"asym3d.json": ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        meta, got = json.loads(extra["asym3d.json"]), loaded(views)
    else:
        import onnx
        import onnxruntime

        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["asym3d.json"])
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"views": views.numpy()})[0])
    assert meta["classes"] == state["classes"] and meta["clip"] == [16, 16, 16] and meta["input"] == "rgbf"
    scale = max(1.0, reference.abs().max().item())
    print(printed)  # the measured difference (BENCHMARKS.md, "export")
    assert difference <= bound
    assert (got - reference).abs().max().item() <= BOUNDS[fmt] * scale


def test_export_onnx_without_its_extra_is_one_line(made, tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['onnxruntime'] = None; from cli import main; "
            f"main(['export', {str(made['rgb'])!r}, '--format', 'onnx', '--out', {str(tmp_path / 'm.onnx')!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "pip install 'asym3d[onnx]'" in result.stderr and not (tmp_path / "m.onnx").exists()


def test_features_killed_mid_run_resume_to_the_uninterrupted_result(made, tmp_path):
    """SIGKILL once a video is finished: the rerun keeps the finished parts, computes the rest, and the file equals
    a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    videos = tmp_path / "videos"
    for copy in range(3):  # 12 videos: the kill lands between the first finished video and the last
        for name, source in {**TRAIN, **TEST}.items():
            (videos / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, videos / name / f"{copy}{source.suffix}")
    args = ["features", str(made["rgb"]), str(videos), "--device", "cpu", "--layer", "fc7"]
    command = [sys.executable, "-m", "cli", *args, "--out", str(tmp_path / "killed.h5")]
    process = subprocess.Popen(command, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.monotonic() + 300
    while not list(parts.glob("*.h5")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(parts.glob("*.h5")))
    assert 1 <= finished < 12 and not (tmp_path / "killed.h5").exists()
    assert f"{12 - finished} videos computed, {finished} already there" in invoke(*args, "--out", tmp_path / "killed.h5")
    invoke(*args, "--out", tmp_path / "whole.h5")
    killed, whole = feature_file(tmp_path / "killed.h5"), feature_file(tmp_path / "whole.h5")
    assert sorted(killed) == sorted(whole) and len(whole) == 12 and not parts.exists()
    assert all(np.array_equal(a, b) for video in whole for a, b in zip(killed[video], whole[video]))
