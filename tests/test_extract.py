"""extract-flow end to end on tiny real videos: shards, failures, resume after a kill, dask, refusals, inspect."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from media import make_bad_videos, make_video, translating_texture
from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig
from pipeline.extract import ExtractConfig, extract_flow
from pipeline.store import ShardSet, StoreError

H, W = 48, 64
MOTION = {"right": (2, 0), "down": (0, 1)}  # class -> (dx, dy) pixels per frame


def _make_tree(root: Path, per_class: int = 2, frames: int = 5) -> dict[str, np.ndarray]:
    """A folder dataset of translating textures, lossless, at the stored size (so decoding is exact)."""
    truth = {}
    for c, (dx, dy) in MOTION.items():
        for i in range(per_class):
            clip = translating_texture(frames, H, W, dx, dy, seed=10 * len(truth) + i)
            (root / c).mkdir(parents=True, exist_ok=True)
            make_video(root / c / f"{c}{i}.mkv", clip, codec="ffv1")
            truth[f"{c}/{c}{i}"] = clip
    return truth


def _cfg(backend: str = "dis", per_shard: int = 2) -> ExtractConfig:
    return ExtractConfig(decode=DecodeConfig(height=H, width=W), backend=backend, videos_per_shard=per_shard)


def test_tvl1_shards_hold_exact_frames_true_motion_and_failures(tmp_path: Path) -> None:
    root = tmp_path / "data"
    truth = _make_tree(root, per_class=1)
    bad = make_bad_videos(root / "right")
    out = tmp_path / "flow"
    result = CliRunner().invoke(main, ["extract-flow", str(root), str(out), "--backend", "cpu", "--size", f"{H}x{W}",
                                       "--videos-per-shard", "2"])
    assert result.exit_code == 1, result.output  # some videos failed
    shards = ShardSet(out)
    assert sorted(v.video_id for v in shards.videos) == sorted(truth)
    failed = {f["video_id"] for f in shards.failures}
    assert failed == {f"right/{p.stem}" for p in bad.values()}
    assert all(str(root) in f["reason"] for f in shards.failures)  # each reason names the file
    assert {r["backend"] for r in shards.recorded.values()} == {"cpu"}
    for vid, frames in truth.items():
        np.testing.assert_array_equal(shards.read(vid, "rgb"), frames)
        flow = shards.read(vid, "flow")
        assert flow.shape == (len(frames) - 1, H, W, 2)
        dx, dy = MOTION[vid.split("/")[0]]
        inner = flow[:, 8:-8, 8:-8]
        # measured error <= 0.0025 px (OpenCV 5.1); 0.01 keeps a 4x margin and fails a 1% scale error of 2 px
        assert abs(inner[..., 0].mean() - dx) < 0.01 and abs(inner[..., 1].mean() - dy) < 0.01
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["videos_ok"] == len(truth)
    assert manifest["summary"]["videos_failed"] == len(bad)
    assert manifest["summary"]["videos_pending"] == 0


def test_rerun_is_noop_and_mismatched_config_refused(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "flow"
    _make_tree(root)
    index = index_dataset("folder", root)
    first = extract_flow(index, out, _cfg(), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    again = extract_flow(index, out, _cfg(), progress=False)
    assert again.shards_skipped == again.shards_total == first.shards_total
    assert again.frames_decoded == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    with pytest.raises(StoreError, match="different configuration"):
        extract_flow(index, out, _cfg(backend="farneback"), progress=False)
    with pytest.raises(StoreError, match="videos_per_shard"):
        extract_flow(index, out, _cfg(per_shard=1), progress=False)
    redone = extract_flow(index, out, _cfg(backend="farneback"), overwrite=True, progress=False)
    assert redone.shards_skipped == 0 and ShardSet(out).schema.config["flow"]["algorithm"] == "farneback"


def test_killed_run_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "flow"
    _make_tree(root, per_class=3, frames=6)
    cmd = [sys.executable, "-m", "cli", "extract-flow", str(root), str(out), "--backend", "cpu",
           "--size", f"{H}x{W}", "--videos-per-shard", "1"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shard-00001.h5").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    assert 2 <= len(done) < 6, "the kill should land while shards remain"
    summary = extract_flow(index_dataset("folder", root), out, _cfg(backend="cpu", per_shard=1), progress=False)
    assert summary.shards_skipped == len(done)
    assert summary.videos_ok == 6 and not summary.failures
    assert not list(out.glob("*.tmp.*"))  # the killed run's temporary file was cleared under the lock
    for name, stamp in done.items():  # finished shards were not rewritten
        assert (out / name).stat().st_mtime_ns == stamp


def test_dask_cluster_writes_the_same_shards_as_one_job(tmp_path: Path) -> None:
    from distributed import LocalCluster

    root = tmp_path / "data"
    _make_tree(root)
    index = index_dataset("folder", root)
    extract_flow(index, tmp_path / "local", _cfg(), progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        extract_flow(index, tmp_path / "dask", _cfg(), scheduler=cluster.scheduler_address, progress=False)
    local, remote = ShardSet(tmp_path / "local"), ShardSet(tmp_path / "dask")
    assert [v.video_id for v in local.videos] == [v.video_id for v in remote.videos]
    for video in local.videos:
        for name in ("rgb", "flow"):
            np.testing.assert_array_equal(local.read(video.video_id, name), remote.read(video.video_id, name))


def test_retry_failed_rewrites_only_the_failed_video(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "flow"
    truth = _make_tree(root, per_class=1)
    broken = root / "down" / "zbroken.mkv"
    broken.write_bytes(b"not a video")
    index = index_dataset("folder", root)
    first = extract_flow(index, out, _cfg(per_shard=3), progress=False)
    assert [f["video_id"] for f in first.failures] == ["down/zbroken"]
    kept = ShardSet(out).read("down/down0", "flow")
    assert extract_flow(index, out, _cfg(per_shard=3), progress=False).shards_skipped == 1  # failures kept as is
    make_video(broken, truth["down/down0"], codec="ffv1")
    retried = extract_flow(index, out, _cfg(per_shard=3), retry_failed=True, progress=False)
    assert not retried.failures and retried.videos_ok == 3
    assert retried.frames_decoded == len(truth["down/down0"])  # only the failed video was decoded again
    np.testing.assert_array_equal(ShardSet(out).read("down/down0", "flow"), kept)


def test_inspect_summary_strip_and_npz(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "flow"
    _make_tree(root, per_class=1)
    extract_flow(index_dataset("folder", root), out, _cfg(), progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(out), "--video", "right/right0", "--out", str(tmp_path / "s.png"),
                                  "--npz", str(tmp_path / "v.npz")])
    assert result.exit_code == 0, result.output
    assert "2 ok, 0 failed" in result.output and "field flow" in result.output
    assert (tmp_path / "s.png").stat().st_size > 1000
    with np.load(tmp_path / "v.npz") as arrays:
        assert arrays["rgb"].shape == (5, H, W, 3) and arrays["flow"].shape == (4, H, W, 2)
    missing = runner.invoke(main, ["inspect", str(out), "--video", "nope", "--out", str(tmp_path / "x.png")])
    assert missing.exit_code == 1 and "no video 'nope'" in missing.output


def test_shard_from_another_format_version_is_refused(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "flow"
    _make_tree(root, per_class=1)
    extract_flow(index_dataset("folder", root), out, _cfg(), progress=False)
    with h5py.File(out / "shard-00000.h5", "a") as f:
        schema = json.loads(f.attrs["asym3d_schema"])
        schema["version"] = 99
        f.attrs["asym3d_schema"] = json.dumps(schema)
    with pytest.raises(StoreError, match="shard-00000.h5: format version 99"):
        ShardSet(out)
