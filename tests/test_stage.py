"""The stage driver (pipeline/stage.py) and extract-flow --train-dir in memory (issue 21).

Real clips (tests/data/real_clips), real ffmpeg, real flow, real HDF5: the training shards --train-dir writes in
memory must be the files the two stages write, byte for byte, with and without --keep-flow.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
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
    import sys

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
