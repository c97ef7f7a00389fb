"""The error policy: the project's own errors are one line without a traceback, bugs keep theirs; a failure while
processing one video fails that video, up to --max-failures; options are checked before anything is written; what
ran (timeout, library versions) is recorded, not part of an output's identity."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from cli import main
from media import make_video, translating_texture
from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig
from pipeline import runner
from pipeline.errors import Asym3dError
from pipeline.extract import ExtractConfig, ShardTask, TooManyFailures, extract_flow, process_shard
from pipeline.store import SCHEMA_FILE, SCHEMA_KEYS, ShardSet, read_json_sealed, write_json_sealed

H, W = 48, 64


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> None:
    """Exit status 1, click's "Error: ..." on one line naming the cause, and no exception escaping click."""
    assert result.exit_code != 0 and result.exc_info[0] is SystemExit, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), result.output
    assert "Traceback" not in result.output


def _tree(root: Path, good: int = 1, bad: int = 0) -> Path:
    """A folder dataset: ``good`` lossless videos and ``bad`` files named .avi that are not videos."""
    (root / "walk").mkdir(parents=True)
    for i in range(good):
        make_video(root / "walk" / f"good{i}.mkv", translating_texture(4, H, W, 1, 0, seed=i), codec="ffv1")
    for i in range(bad):
        (root / "walk" / f"bad{i}.avi").write_bytes(b"not a video")
    return root


def test_own_errors_are_one_line_and_bugs_keep_their_traceback() -> None:
    group = cli._Group()

    @group.command()
    @click.argument("kind")
    def fail(kind: str) -> None:
        raise Asym3dError("data/x.avi: broken") if kind == "user" else KeyError("a bug")

    _one_line_error(CliRunner().invoke(group, ["fail", "user"]), "data/x.avi: broken")
    bug = CliRunner().invoke(group, ["fail", "bug"])
    assert bug.exit_code == 1 and isinstance(bug.exception, KeyError)  # not turned into a message


@pytest.mark.parametrize(("args", "needles"), [
    (["--tau", "nan"], ["--tau", "not a finite number"]),
    (["--lambda", "inf"], ["--lambda", "not a finite number"]),
    (["--size", "4x4", "--backend", "dis"], ["--size 4x4", "at least 16 pixels"]),
    (["--backend", "torch", "--device", "bogus"], ["--device 'bogus'", "not a device"]),
    (["--backend", "torch", "--device", "cuda:99"], ["--device cuda:99"]),
    (["--scheduler", "tls://127.0.0.1:1"], ["tls:// needs dask's TLS configuration"]),
    (["--scheduler", "bogus://127.0.0.1:1"], ["--scheduler bogus://127.0.0.1:1", "unknown address scheme"]),
    (["--max-failures", "1.5"], ["--max-failures", "neither a count"]),
    (["--max-missing", "nan"], ["--max-missing", "not a finite number"]),
])
def test_extract_options_are_checked_before_anything_is_written(tmp_path: Path, args, needles) -> None:
    root = _tree(tmp_path / "videos")
    out = tmp_path / "out"
    _one_line_error(_invoke("extract-flow", root, out, *args), *needles)
    assert not out.exists()


def test_an_unreachable_scheduler_is_one_line_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path / "videos")
    out = tmp_path / "out"
    # port 1 on loopback refuses connections: dask retries until the bound asym3d sets (shortened for the test)
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT_S", 2)
    _one_line_error(_invoke("extract-flow", root, out, "--scheduler", "tcp://127.0.0.1:1"),
                    "--scheduler tcp://127.0.0.1:1", "cannot connect")
    assert not out.exists()


def test_train_and_evaluate_refuse_non_finite_numbers(tmp_path: Path) -> None:
    _one_line_error(_invoke("train", tmp_path, "--model", "c3d-b5", "--out", tmp_path / "r", "--lr", "nan"),
                    "--lr", "not a finite number")
    _one_line_error(_invoke("evaluate", "--fuse", tmp_path, tmp_path, "--weights", "nan,1"), "finite")
    _one_line_error(_invoke("models", "--layers", "c3d-b5", "--clip", "4x8x8"), "too small")


def test_a_backend_error_fails_that_video_and_the_shard_goes_on(tmp_path: Path) -> None:
    root = _tree(tmp_path / "videos", good=2)
    cfg = ExtractConfig(decode=DecodeConfig(height=H, width=W), backend="dis")
    # Frames under DIS's minimum size, past the option check: OpenCV raises cv2.error inside the backend.
    object.__setattr__(cfg, "decode", DecodeConfig(height=8, width=8))
    records = tuple(index_dataset("folder", root).records)
    (tmp_path / "out").mkdir()
    result = process_shard(ShardTask(0, tmp_path / "out", records, cfg, cfg.schema(), cfg.recorded()))
    assert result.videos_ok == 0 and len(result.failures) == 2
    assert all(f["reason"].startswith(f"{root}/walk/good") and ": error: " in f["reason"] for f in result.failures)


def test_max_failures_stops_a_run_with_a_clear_message(tmp_path: Path) -> None:
    root = _tree(tmp_path / "videos", good=1, bad=3)
    out = tmp_path / "out"
    cfg = ExtractConfig(decode=DecodeConfig(height=H, width=W), backend="dis", videos_per_shard=1)
    with pytest.raises(TooManyFailures, match=r"stopped after 2 of 4 videos failed \(--max-failures 1 allows 1\)"):
        extract_flow(index_dataset("folder", root), out, cfg, progress=False, max_failures=1)
    assert json.loads((out / "manifest.json").read_text())["summary"]["videos_failed"] == 2  # kept for a rerun
    # The default (half of the videos) stops this run too: 3 of 4 fail.
    _one_line_error(_invoke("extract-flow", root, tmp_path / "default", "--backend", "dis", "--size", f"{H}x{W}"),
                    "--max-failures 0.5 allows 2")
    done = _invoke("extract-flow", root, tmp_path / "all", "--backend", "dis", "--size", f"{H}x{W}",
                   "--max-failures", "1.0")
    assert done.exit_code == 1 and "1 videos ok, 3 failed" in done.output and done.output.count("FAILED") == 3


def test_retry_failed_with_a_longer_timeout_continues_the_same_output(tmp_path: Path) -> None:
    root = _tree(tmp_path / "videos", good=1, bad=1)
    out = tmp_path / "out"
    args = ["extract-flow", root, out, "--backend", "dis", "--size", f"{H}x{W}", "--max-failures", "1"]
    assert _invoke(*args, "--timeout", "30").exit_code == 1  # bad0.avi failed
    (root / "walk" / "bad0.avi").unlink()
    make_video(root / "walk" / "bad0.avi", translating_texture(4, H, W, 0, 1, seed=9), codec="ffv1")
    retried = _invoke(*args, "--retry-failed", "--timeout", "60")
    assert retried.exit_code == 0 and "2 videos ok, 0 failed" in retried.output, retried.output
    recorded = json.loads((out / SCHEMA_FILE).read_text())["recorded"]
    assert recorded["timeout_s"] == 60 and recorded["backend"] == "dis"


def test_a_library_upgrade_is_recorded_and_warned_not_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "videos", good=2)
    out = tmp_path / "out"
    args = ["extract-flow", root, out, "--backend", "dis", "--size", f"{H}x{W}", "--videos-per-shard", "1"]
    assert _invoke(*args).exit_code == 0
    meta, _ = read_json_sealed(out / SCHEMA_FILE, SCHEMA_KEYS)
    meta["recorded"]["libraries"]["opencv"] = "0.0.1"  # as if the first run had an older OpenCV
    write_json_sealed(out / SCHEMA_FILE, meta)
    (out / "shard-00001.h5").unlink()  # one shard still to do
    rerun = _invoke(*args)
    assert rerun.exit_code == 0 and "library versions changed since the earlier run (opencv 0.0.1 ->" in rerun.output
    shards = ShardSet(out)  # readable: versions are not part of the schema
    assert len(shards) == 2 and set(shards.recorded) == {"shard-00000.h5", "shard-00001.h5"}
    assert "made with (2 shards)" in _invoke("inspect", out).output


def test_skipped_entries_and_empty_split_files_are_warnings(tmp_path: Path) -> None:
    root = _tree(tmp_path / "videos", good=1)
    (root / "walk" / "folder.avi").mkdir()
    (root / "walk" / "dangling.mp4").symlink_to(root / "walk" / "nowhere.mp4")
    (root / "walk" / "loop.mkv").symlink_to(root / "walk" / "loop.mkv")
    warnings = index_dataset("folder", root).warnings
    assert any("folder.avi: skipped, a directory" in w for w in warnings)
    assert any("dangling.mp4: skipped, a broken or looping link" in w for w in warnings)
    assert any("loop.mkv: skipped, a broken or looping link" in w for w in warnings)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "trainlist01.txt").write_text("walk/good0.mkv\n")
    (splits / "testlist01.txt").write_text("\n")
    index = index_dataset("folder", root, splits_dir=splits)
    assert any(w == f"{splits / 'testlist01.txt'}: empty file, no videos listed" for w in index.warnings)
    hmdb = tmp_path / "hmdb"
    hmdb.mkdir()
    (hmdb / "walk_test_split1.txt").write_text("good0.mkv 1\n")
    (hmdb / "walk_test_split2.txt").write_text("")
    index = index_dataset("hmdb51", root, splits_dir=hmdb)
    assert any("walk_test_split1.txt: lists no test videos" in w for w in index.warnings)
    assert any("walk_test_split2.txt: empty file" in w for w in index.warnings)


def test_classes_subset_works_for_folder_trees_and_fcvid(tmp_path: Path) -> None:
    root = _tree(tmp_path / "videos", good=1)
    (root / "run").mkdir()
    make_video(root / "run" / "r.mkv", translating_texture(4, H, W, 0, 1, seed=5), codec="ffv1")
    index = index_dataset("folder", root, classes=["walk"])
    assert index.classes == ["walk"] and [r.video_id for r in index.records] == ["walk/good0"]
    assert index.extra["official_labels"] == {"walk": 1}
    labels = tmp_path / "labels.txt"
    labels.write_text("walk/good0.mkv basketballAmateur\nrun/r.mkv soccerAmateur\n")
    index = index_dataset("fcvid", root, labels_file=labels, classes=["soccerAmateur"])
    assert index.classes == ["soccerAmateur"] and [r.label for r in index.records] == [0]
    assert np.array_equal(list(index.extra["relabel"].values()), [0])
