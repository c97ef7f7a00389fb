"""The stage driver (pipeline/stage.py) and extract-flow --train-dir in memory (issue 21).

Real clips (tests/data/real_clips), real ffmpeg, real flow, real HDF5: the training shards --train-dir writes in
memory must be the files the two stages write, byte for byte, with and without --keep-flow.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.build_rgbf import BuildConfig, FollowOn, build_rgbf
from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig
from pipeline.extract import ExtractConfig, extract_flow
from pipeline.stage import TooManyFailures
from pipeline.store import ShardSet, ShardWriter, VideoMeta, load_dataset_meta

REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO / "tests" / "data" / "real_clips"


def _real_tree(root: Path) -> Path:
    """The repository's real clips as a folder dataset (one class per source), plus one file that is no video."""
    for clip in sorted(CLIPS.rglob("*")):
        if clip.suffix in (".avi", ".mp4"):
            (root / clip.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(clip, root / clip.parent.name / clip.name)
    (root / "dive" / "zbroken.avi").write_bytes(b"not a video")
    return root


def _cfg() -> ExtractConfig:
    return ExtractConfig(decode=DecodeConfig(max_frames=12), backend="dis", videos_per_shard=2)


def _shards(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.h5"))}


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(videos, flow shards, training shards) written by extract-flow then build-rgbf."""
    base = tmp_path_factory.mktemp("two-stages")
    root = _real_tree(base / "videos")
    extract_flow(index_dataset("folder", root), base / "flow", _cfg(), progress=False)
    build_rgbf(base / "flow", base / "train", BuildConfig(), progress=False)
    return root, base / "flow", base / "train"


@pytest.mark.parametrize("keep_flow", [False, True])
def test_train_dir_writes_the_two_stages_files_byte_for_byte(two_stages, tmp_path: Path, keep_flow: bool) -> None:
    root, flow2, train2 = two_stages
    flow, train = tmp_path / "flow", tmp_path / "train"
    summary = extract_flow(index_dataset("folder", root), flow, _cfg(), train=FollowOn(train, keep_flow=keep_flow),
                           progress=False)
    assert summary.videos_ok == 4 and [f["video_id"] for f in summary.failures] == ["dive/zbroken"]
    expected = _shards(train2)
    assert len(expected) == 3 and _shards(train) == expected  # whole HDF5 files: data, attributes, failures
    assert load_dataset_meta(train)["schema"] == load_dataset_meta(train2)["schema"]
    assert _shards(flow).keys() == (_shards(flow2).keys() if keep_flow else set())
    if keep_flow:  # the same flow shards but for what is recorded beside them (train_dir, keep_flow)
        kept, alone = ShardSet(flow), ShardSet(flow2)
        assert kept.failures == alone.failures and kept.videos == alone.videos
        for video in alone.videos:
            for name in ("rgb", "flow"):
                np.testing.assert_array_equal(kept.read(video, name), alone.read(video, name))
    assert not list(flow.glob("*.tmp.*")) and not list(train.glob("*.tmp.*"))


def test_retry_failed_copies_the_finished_training_videos(two_stages, tmp_path: Path) -> None:
    """A retried training shard keeps its good videos byte for byte and computes only the failed one; the result is
    what the two stages write for the repaired input."""
    root_src, _, _ = two_stages
    root = tmp_path / "videos"
    shutil.copytree(root_src, root)
    flow, train = tmp_path / "flow", tmp_path / "train"
    first = extract_flow(index_dataset("folder", root), flow, _cfg(), train=FollowOn(train), progress=False)
    assert first.failures
    shutil.copy(root / "PushUps" / "v_PushUps_g02_c03.avi", root / "dive" / "zbroken.avi")
    index = index_dataset("folder", root)
    retried = extract_flow(index, flow, _cfg(), train=FollowOn(train), retry_failed=True, progress=False)
    assert not retried.failures and retried.shards_skipped == 2
    assert retried.frames_decoded == 12  # only the retried video was decoded
    extract_flow(index, tmp_path / "flow2", _cfg(), progress=False)
    build_rgbf(tmp_path / "flow2", tmp_path / "train2", BuildConfig(), progress=False)
    new, old = ShardSet(train), ShardSet(tmp_path / "train2")
    assert [v.video_id for v in new.videos] == [v.video_id for v in old.videos]
    for video in old.videos:
        for name in old.schema.field_names:
            np.testing.assert_array_equal(new.read(video.video_id, name), old.read(video.video_id, name))


def _flow_dir_with_bad_flow(root: Path, videos: int, bad: int) -> Path:
    """A flow-shard directory (as extract-flow declares it) whose last ``bad`` videos have flow pairs missing."""
    cfg = ExtractConfig(decode=DecodeConfig(height=32, width=32), backend="dis", videos_per_shard=1)
    schema = cfg.schema()
    ids = [f"v{i}" for i in range(videos)]
    from pipeline.store import prepare_output, shard_name, write_manifest

    prepare_output(root, schema, {"kind": "folder", "classes": ["a"], "extra": {}}, [[i] for i in ids])
    rng = np.random.default_rng(0)
    for i, vid in enumerate(ids):
        rgb = rng.integers(0, 255, (4, 32, 32, 3), np.uint8)
        flow = rng.normal(0, 2, (3 if i < videos - bad else 1, 32, 32, 2)).astype(np.float32)
        with ShardWriter(root / shard_name(i), schema, i) as writer:
            writer.add_video(VideoMeta(vid, 0, "a", f"{vid}.avi", {1: "train"}), {"rgb": rgb, "flow": flow})
    write_manifest(root)
    return root


def test_build_rgbf_max_failures_stops_the_run_and_keeps_what_was_built(tmp_path: Path) -> None:
    flow = _flow_dir_with_bad_flow(tmp_path / "flow", videos=4, bad=2)
    with pytest.raises(TooManyFailures, match=r"stopped after 2 of 4 videos failed \(--max-failures 1 allows 1\)"):
        build_rgbf(flow, tmp_path / "train", BuildConfig(), max_failures=1, progress=False)
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["summary"]["videos_ok"] == 2 and manifest["summary"]["videos_failed"] == 2
    # The default never stops build-rgbf; through the CLI the cap is one line, checked before anything is written.
    done = CliRunner().invoke(main, ["build-rgbf", str(flow), str(tmp_path / "all")])
    assert done.exit_code == 1 and "2 videos ok, 2 failed" in done.output
    capped = CliRunner().invoke(main, ["build-rgbf", str(flow), str(tmp_path / "capped"), "--max-failures", "0.25"])
    assert capped.exit_code == 1 and "Error:" in capped.output and "allows 1" in capped.output
    refused = CliRunner().invoke(main, ["build-rgbf", str(flow), str(tmp_path / "bad"), "--max-failures", "2.5"])
    assert refused.exit_code == 2 and "neither a count" in refused.output and not (tmp_path / "bad").exists()


def test_a_shard_of_another_configuration_names_the_difference(two_stages, tmp_path: Path) -> None:
    _, flow_src, _ = two_stages
    flow = tmp_path / "flow"
    shutil.copytree(flow_src, flow)
    with h5py.File(flow / "shard-00000.h5", "a") as f:
        schema = json.loads(f.attrs["asym3d_schema"])
        schema["config"]["videos_per_shard"] = 7
        f.attrs["asym3d_schema"] = json.dumps(schema)
    result = CliRunner().invoke(main, ["inspect", str(flow)])
    assert result.exit_code == 1
    assert "shard-00000.h5: holds output of a different configuration (config.videos_per_shard: existing 7 vs " \
           "requested 2)" in result.output


def test_host_cost_bench_runs_at_a_tiny_size(capsys) -> None:
    """bench/host_cost.py on the repository's real clips, 4 frames each, DIS flow."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import host_cost
    finally:
        sys.path.remove(str(REPO / "bench"))
    host_cost.main(["--clips", str(CLIPS), "--max-frames", "4", "--videos-per-shard", "2"])
    out = capsys.readouterr().out
    assert "4 clips, 16 frames at 128x171" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| path")}
    assert set(rows) == {"two stages", "--train-dir"}
    for total, startup, beyond, ratio in rows.values():
        assert float(total) > float(startup) > 0 and np.isfinite(float(beyond)) and np.isfinite(float(ratio))


def test_encode_workers_write_the_same_shards_with_the_torch_backend_on_the_cpu(two_stages, tmp_path: Path) -> None:
    """One process holds the flow backend (torch TV-L1 on the CPU), two spawned processes compute the training
    images and JPEG: the files are those the backend's process writes alone, byte for byte."""
    root, _, _ = two_stages
    index = index_dataset("folder", root)
    cfg = ExtractConfig(decode=DecodeConfig(max_frames=4), backend="torch", device="cpu", videos_per_shard=2)
    alone = extract_flow(index, tmp_path / "f0", cfg, train=FollowOn(tmp_path / "t0"), progress=False)
    pooled = extract_flow(index, tmp_path / "f2", dataclasses.replace(cfg, encode_workers=2),
                          train=FollowOn(tmp_path / "t2"), progress=False)
    assert alone.videos_ok == pooled.videos_ok == 4 and pooled.failures == alone.failures
    assert _shards(tmp_path / "t2") == _shards(tmp_path / "t0") and len(_shards(tmp_path / "t0")) == 3
    assert json.loads((tmp_path / "f2" / "dataset.json").read_text())["recorded"]["encode_workers"] == 2
    refused = CliRunner().invoke(main, ["extract-flow", str(root), str(tmp_path / "f3"), "--train-dir",
                                        str(tmp_path / "t3"), "--encode-workers", "2", "--jobs", "2"])
    assert refused.exit_code == 1 and "Error: --encode-workers runs with --jobs 1" in refused.output
    assert not (tmp_path / "f3").exists() and not (tmp_path / "t3").exists()


def test_encode_workers_exit_with_a_killed_run_and_the_rerun_finishes(two_stages, tmp_path: Path) -> None:
    root, _, _ = two_stages
    flow, train = tmp_path / "flow", tmp_path / "train"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "extract-flow", str(root), str(flow), "--backend", "cpu",
                             "--max-frames", "6", "--videos-per-shard", "1", "--train-dir", str(train),
                             "--encode-workers", "2"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    while not (train / "shard-00000.h5").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers, "the kill should land while the encode pool runs"
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"encode workers outlived their parent: {alive}"
    cfg = ExtractConfig(decode=DecodeConfig(max_frames=6), backend="cpu", videos_per_shard=1)
    summary = extract_flow(index_dataset("folder", root), flow, cfg, train=FollowOn(train), progress=False)
    assert summary.videos_ok == 4 and summary.shards_skipped >= 1 and not list(train.glob("*.tmp.*"))


def test_owner_pools_bench_runs_at_a_tiny_size(capsys) -> None:
    """bench/owner_pools.py on two real clips, 3 frames each: one process, one with an encode worker, --jobs 2."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import owner_pools
    finally:
        sys.path.remove(str(REPO / "bench"))
    owner_pools.main(["--clips", str(CLIPS / "ucf101"), "--max-frames", "3", "--rows", "0,1,jobs2"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["one process", "one backend process + 1 encode workers",
                                            "--jobs 2, one process per shard"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
