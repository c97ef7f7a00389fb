"""Runs bound to their shards and reports bound to their checkpoints, with real `asym3d` processes on real files:

- both layouts train writes (``--split N`` into OUT, ``--splits`` into OUT/splitN) evaluate and fuse alike (run.json);
- a run records its shards by absolute path and identity; another directory's ``./shards``, another data set passed
  with ``--shards`` or to ``--resume``, and flow shards are refused in one line saying where the run expected them;
- a report names the checkpoint it scored (digest, epoch); evaluate holds its report directory's lock throughout;
- a refused train or evaluate creates no file or directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.extract import FLOW_FIELD, RGB_FIELD
from pipeline.store import Schema, ShardSet, ShardWriter, VideoMeta, content_digest, prepare_output, shard_name
from test_errors import _invoke, _one_line_error
from test_train import write_toy_shards

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--model", "c3d-b5", "--clip", "16x16x16", "--batch-size", "4", "--workers", "0", "--epochs", "1",
         "--device", "cpu"]
FAST = ["--clips", "1", "--crops", "1", "--device", "cpu"]


def asym3d(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m cli ARGS`` as its own process in ``cwd`` (so relative paths mean what they mean to a user)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lab/shards`` and runs trained from ``lab`` on the relative path ``shards``: ``lab/rgb``, ``lab/rgbf`` and
    ``lab/flow`` (``--split 1``), and ``lab/multi`` (``--splits 1``, rgb)."""
    lab = tmp_path_factory.mktemp("lab")
    write_toy_shards(lab / "shards")
    for out, extra in (("rgb", ["--split", "1"]), ("rgbf", ["--split", "1", "--input", "rgbf"]),
                       ("flow", ["--split", "1", "--input", "flow"]), ("multi", ["--splits", "1"])):
        asym3d("train", "shards", *TRAIN, *extra, "--out", out, cwd=lab)
    return lab


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another directory with its own ``./shards``: the same classes, another plan (more videos)."""
    root = tmp_path_factory.mktemp("elsewhere")
    write_toy_shards(root / "shards", train_per_class=5)
    return root


def test_run_json_records_the_shards_by_absolute_path_and_identity(lab: Path) -> None:
    for run in (lab / "rgb", lab / "multi" / "split1"):
        info = json.loads((run / "run.json").read_text())
        assert info["config"]["shard_dir"] == info["shards"]["path"] == str((lab / "shards").resolve())
        assert info["shards"]["files"] == [shard_name(0), shard_name(1)]
        shards = ShardSet(lab / "shards")
        defined = {"schema": shards.schema.to_dict(), "dataset": shards.dataset, "plan": shards.plan}
        assert info["shards"]["digest"] == content_digest(defined)
        assert load_checkpoint(run / "last.pt")["shards"] == info["shards"]


def test_single_split_runs_evaluate_from_anywhere_and_fuse(lab: Path, elsewhere: Path) -> None:
    """Evaluated from a directory whose ./shards is another data set, each run reads the shards it recorded."""
    for run in ("rgb", "rgbf", "multi"):
        asym3d("evaluate", lab / run, "--splits", "1", *FAST, cwd=elsewhere)
        report = json.loads((lab / run / "eval" / "results.json").read_text())
        assert report["splits"]["1"]["source"]["shards"] == str((lab / "shards").resolve())
        assert report["splits"]["1"]["videos"] == 4  # lab's test videos; elsewhere's shards hold 4 others too
    fused = asym3d("evaluate", "--fuse", lab / "rgb", lab / "rgbf", "--splits", "1", cwd=elsewhere)
    assert "| 1 | 4 | 1 |" in fused.stdout
    one_line(asym3d("evaluate", lab / "rgb", "--splits", "2", *FAST, cwd=lab, check=False),
             f"{lab / 'rgb'}: a run of split 1 only (run.json); it holds no split 2")


def test_shards_of_another_identity_are_refused_saying_where_the_run_expected_them(lab: Path, elsewhere: Path,
                                                                                  tmp_path: Path) -> None:
    expected = f"the run expected its shards at {(lab / 'shards').resolve()}"
    one_line(asym3d("evaluate", lab / "rgb", "--splits", "1", "--shards", elsewhere / "shards", *FAST,
                    "--out", tmp_path / "report", cwd=lab, check=False),
             f"{elsewhere / 'shards'}: not the shards {lab / 'rgb' / 'best.pt'} was trained on", expected)
    run = tmp_path / "rgb"
    shutil.copytree(lab / "rgb", run)
    before = sorted(p.name for p in run.iterdir())
    one_line(asym3d("train", elsewhere / "shards", *TRAIN, "--epochs", "2", "--out", run, "--resume", cwd=lab,
                    check=False), f"not the shards {run / 'last.pt'} was trained on", expected)
    assert sorted(p.name for p in run.iterdir()) == before
    # a shard file the run was trained on is gone: the same data set, but not all of it
    partial = tmp_path / "partial"
    shutil.copytree(lab / "shards", partial)
    (partial / shard_name(1)).unlink()
    one_line(asym3d("evaluate", lab / "rgb", "--splits", "1", "--shards", partial, *FAST, "--out",
                    tmp_path / "report", cwd=lab, check=False), f"lacks 1 shard file(s)", shard_name(1), expected)
    assert not (tmp_path / "report").exists()


def test_a_checkpoint_from_before_identities_with_a_relative_path_is_refused(lab: Path, tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    state = load_checkpoint(lab / "rgb" / "best.pt")
    del state["shards"], state["digest"]
    state["config"]["shard_dir"] = "shards"  # what train recorded before shard paths were made absolute
    save_checkpoint(run / "best.pt", state)
    (run / "run.json").write_text(json.dumps({"config": state["config"]}))
    one_line(asym3d("evaluate", run, "--splits", "1", *FAST, cwd=lab, check=False),
             f"{run / 'best.pt'}: trained on the relative shard path 'shards'", "pass --shards")
    assert not (run / "eval").exists()
    asym3d("evaluate", run, "--splits", "1", "--shards", "shards", *FAST, cwd=lab)


def _flow_shards(root: Path) -> Path:
    """extract-flow's output as its own schema declares it: rgb frames and 2-channel int16 flow."""
    schema = Schema(kind="flow", height=16, width=20, fields=(RGB_FIELD, FLOW_FIELD))
    prepare_output(root, schema, {"kind": "folder", "classes": ["warm_right", "cool_left"]}, [["warm_right/v4"]])
    rng = np.random.default_rng(0)
    with ShardWriter(root / shard_name(0), schema, 0) as writer:
        writer.add_video(VideoMeta("warm_right/v4", 0, "warm_right", splits={1: "test"}),
                         {"rgb": rng.integers(0, 256, (18, 16, 20, 3), np.uint8),
                          "flow": rng.normal(0, 1, (17, 16, 20, 2)).astype(np.float32)})
    return root


def test_evaluate_shards_are_gated_like_training(lab: Path, tmp_path: Path) -> None:
    flow = _flow_shards(tmp_path / "flow")
    for run in ("rgb", "rgbf", "flow"):
        one_line(asym3d("evaluate", lab / run, "--splits", "1", "--shards", flow, *FAST, "--out",
                        tmp_path / "report", cwd=lab, check=False),
                 f"{flow}: holds 'flow' shards, not training shards")
    assert not (tmp_path / "report").exists()


def test_a_report_names_the_checkpoint_it_scored(lab: Path, tmp_path: Path) -> None:
    """`--checkpoint last` before and after a resume moved last.pt from epoch 1 to 2: two checkpoints, so the
    first report is kept, not replaced."""
    run = tmp_path / "run"
    shutil.copytree(lab / "rgb", run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    asym3d("evaluate", run, "--splits", "1", "--checkpoint", "last", *FAST, cwd=lab)
    first = (run / "eval" / "results.json").read_text()
    scored = json.loads(first)["identity"]["checkpoints"]
    assert scored == [{"choice": "last", "epoch": 1, "digest": load_checkpoint(run / "last.pt")["digest"]}]
    asym3d("evaluate", run, "--splits", "1", "--checkpoint", "last", *FAST, cwd=lab)  # the same one again: a rerun
    asym3d("train", "shards", *TRAIN, "--epochs", "2", "--out", run, "--resume", cwd=lab)
    one_line(asym3d("evaluate", run, "--splits", "1", "--checkpoint", "last", *FAST, cwd=lab, check=False),
             "results.json: holds a report of", "'epoch': 1", "refusing to replace it")
    assert (run / "eval" / "results.json").read_text() == first


def test_a_fused_report_names_the_checkpoints_its_scores_came_from(lab: Path, tmp_path: Path) -> None:
    """rgbf's last.pt moves from epoch 1 to 2 and is evaluated again: a fusion of the new scores is another report."""
    runs = {name: tmp_path / name for name in ("rgb", "rgbf")}
    for name, run in runs.items():
        shutil.copytree(lab / name, run, ignore=shutil.ignore_patterns("eval"))
        asym3d("evaluate", run, "--splits", "1", "--checkpoint", "last", *FAST, cwd=lab)
    fused = runs["rgb"] / "eval" / "fused_rgb+rgbf" / "results.json"
    asym3d("evaluate", "--fuse", runs["rgb"], runs["rgbf"], "--splits", "1", cwd=lab)
    first = fused.read_text()
    assert json.loads(first)["identity"]["checkpoints"] == [
        [load_checkpoint(run / "last.pt")["digest"] for run in runs.values()]]
    asym3d("train", "shards", *TRAIN, "--input", "rgbf", "--epochs", "2", "--out", runs["rgbf"], "--resume", cwd=lab)
    shutil.rmtree(runs["rgbf"] / "eval")
    asym3d("evaluate", runs["rgbf"], "--splits", "1", "--checkpoint", "last", *FAST, cwd=lab)
    one_line(asym3d("evaluate", "--fuse", runs["rgb"], runs["rgbf"], "--splits", "1", cwd=lab, check=False),
             "results.json: holds a report of", "refusing to replace it")
    assert fused.read_text() == first


def test_evaluate_holds_its_report_lock_for_the_whole_run(lab: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = [sys.executable, "-m", "cli", "evaluate", str(lab / "rgb"), "--splits", "1", "--clips", "40",
            "--crops", "10", "--batch-size", "10", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".asym3d.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # mid-evaluation: it holds the lock and has written no report yet
    try:
        assert not (out / "results.json").exists()
        second = subprocess.run(args, cwd=lab, env=env, capture_output=True, text=True, timeout=600)
        one_line(second, f"{out}: another asym3d process writes here (PID {first.pid}")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert json.loads((out / "results.json").read_text())["splits"]["1"]["views_per_video"] == 400


def test_fuse_with_a_truncated_scores_file_is_one_line(lab: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("rgb", "rgbf"):
        runs.append(tmp_path / name)
        shutil.copytree(lab / name, runs[-1], ignore=shutil.ignore_patterns("eval"))
        asym3d("evaluate", runs[-1], "--splits", "1", *FAST, cwd=lab)
    scores = runs[1] / "eval" / "scores_split1.npz"
    scores.write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])
    one_line(asym3d("evaluate", "--fuse", *runs, "--splits", "1", cwd=lab, check=False),
             f"{scores}: not a readable scores file")
    assert not (runs[0] / "eval" / "fused_rgb+rgbf").exists()


def _created(root: Path, before: set[Path]) -> list[Path]:
    return sorted(set(root.rglob("*")) - before)


@pytest.mark.parametrize(("options", "needles"), [
    (["--clip", "16x4000x4000"], ["crop 4000 does not fit the stored 16x20 frames"]),
    (["--clip", "10000000x16x16"], ["--clip 10000000x16x16: c3d-b5 would have", "GiB for weights, gradients"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--splits", "1,3"], ["split 3 has no training videos"]),
    (["--split", "2", "--splits", "1"], ["--split N or --splits N,M,.., not both"]),
    (["--init", "notes.txt"], ["notes.txt: not a readable checkpoint"]),
    (["--init", "rgb/best.pt", "--clip", "32x16x16"], ["weight fc6.weight does not fit this c3d-b5"]),
    (["--resume"], ["nothing to resume"]),
    (["--model", "c3d-b9"], ["unknown model 'c3d-b9'"]),
])
def test_a_refused_train_creates_nothing(lab: Path, options: list[str], needles: list[str]) -> None:
    (lab / "notes.txt").write_text("not a checkpoint\n")
    before = set(lab.rglob("*"))
    proc = asym3d("train", "shards", *TRAIN, "--out", "new_run", *options, cwd=lab, check=False)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert _created(lab, before) == []


@pytest.mark.parametrize(("options", "needles"), [
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--splits", "2"], ["a run of split 1 only"]),
    (["--checkpoint", "nowhere.pt"], ["nowhere.pt: no checkpoint for split 1"]),
    (["--checkpoint", "notes.txt"], ["notes.txt: not a readable checkpoint"]),
    (["--shards", "."], ["holds no complete shards"]),
    (["--clips", "0"], ["--clips"]),
])
def test_a_refused_evaluate_creates_nothing(lab: Path, options: list[str], needles: list[str]) -> None:
    (lab / "notes.txt").write_text("not a checkpoint\n")
    before = set(lab.rglob("*"))
    proc = asym3d("evaluate", "rgb", "--splits", "1", "--clips", "1", "--crops", "1", "--out", "new_report",
                  *options, cwd=lab, check=False)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert _created(lab, before) == []


def test_predict_finds_a_runs_checkpoint_as_evaluate_does(lab: Path) -> None:
    from model.predict import resolve_run
    from model.runs import RunError

    assert resolve_run(lab / "rgb", 1, "best") == lab / "rgb" / "best.pt"
    assert resolve_run(lab / "multi", 1, "last") == lab / "multi" / "split1" / "last.pt"
    with pytest.raises(RunError, match="a run of split 1 only"):  # was: split 1's best.pt taken for split 2
        resolve_run(lab / "rgb", 2, "best")
