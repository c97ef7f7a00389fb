"""Real datasets as users have them: a partial download of a few classes with the official split files, real clips
that ffmpeg used to decode wrongly, and the whole road (extract-flow, build-rgbf, train, evaluate) on them.

The clips and split files are in tests/data (byte-for-byte copies of ../shared/data; see its PROVENANCE.md).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from media import make_video, translating_texture
from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig, decode_video, ffmpeg_exe
from pipeline.store import FORMAT_VERSION

DATA = Path(__file__).resolve().parent / "data"
CLIPS = DATA / "real_clips"
UCF_SPLITS = DATA / "ucf101_splits"
HMDB_SPLITS = DATA / "hmdb51_splits"
PUSHUPS = CLIPS / "ucf101" / "PushUps" / "v_PushUps_g02_c03.avi"  # an original UCF-101 AVI, 79 frames
RAW_MPEG4 = CLIPS / "ucf101" / "Basketball" / "v_Basketball_g01_c02.mp4"  # no container, 180 frames
HMDB_DIVE = CLIPS / "hmdb51" / "dive" / "BASE_Jumping_Compilation_-_Brilliant_dive_f_cm_np1_le_bad_3.mp4"


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def partial_ucf101(root: Path) -> Path:
    """Two real clips as a partial UCF-101 download of PushUps and Basketball. Each clip is there under its own
    official name (group g02/g01: test in split 1) and under the official name of a g08 video (train in split 1),
    so split 1 has both; the raw MPEG-4 stream keeps its .mp4 name, which the split lists call .avi."""
    for clip, train_name in ((PUSHUPS, "v_PushUps_g08_c01.avi"), (RAW_MPEG4, "v_Basketball_g08_c01.mp4")):
        folder = root / clip.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, folder / clip.name)
        shutil.copyfile(clip, folder / train_name)
    return root


def test_raw_mpeg4_stream_decodes_with_its_true_frame_count() -> None:
    # Before: ffmpeg's constant-rate output kept 3 of the 180 frames of this containerless stream.
    assert len(decode_video(RAW_MPEG4, DecodeConfig(height=32, width=32))) == 180
    assert len(decode_video(PUSHUPS, DecodeConfig(height=32, width=32))) == 79
    assert len(decode_video(HMDB_DIVE, DecodeConfig(height=32, width=32))) == 45


def test_variable_frame_rate_keeps_the_source_frames_unless_fps_is_given(tmp_path: Path) -> None:
    frames = translating_texture(20, 48, 64, 2, 1, seed=3)
    cfr = make_video(tmp_path / "cfr.mkv", frames, fps=10, codec="ffv1")
    # 10 frames 0.1 s apart, then 10 frames 0.05 s apart: a forced constant rate duplicates or drops frames.
    vfr = tmp_path / "vfr.mkv"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(cfr), "-vf",
                    "setpts='if(lt(N,10),N*0.1,1+(N-10)*0.05)/TB'", "-fps_mode", "passthrough", "-c:v", "ffv1",
                    str(vfr)], check=True)
    decoded = decode_video(vfr, DecodeConfig(height=48, width=64))
    assert (decoded == frames).all()  # every frame once, in order, none duplicated
    assert len(decode_video(vfr, DecodeConfig(height=48, width=64, fps=10))) != 20  # resampled on request


def test_class_subset_of_the_official_lists_on_a_partial_download(tmp_path: Path) -> None:
    root = partial_ucf101(tmp_path / "UCF-101")
    index = index_dataset("ucf101", root, splits_dir=UCF_SPLITS, classes=["PushUps", "Basketball"], max_missing=1)
    assert index.classes == ["Basketball", "PushUps"]  # official order, labels 0..K-1
    assert index.extra["official_labels"] == {"Basketball": 7, "PushUps": 71}
    assert {r.video_id: (r.label, r.splits[1]) for r in index.records} == {
        "Basketball/v_Basketball_g01_c02": (0, "test"), "Basketball/v_Basketball_g08_c01": (0, "train"),
        "PushUps/v_PushUps_g02_c03": (1, "test"), "PushUps/v_PushUps_g08_c01": (1, "train")}
    missing, listed = index.missing[1]
    assert listed == 236 and missing == 232  # the two classes' videos in split 1, all but four not downloaded
    assert any("2 listed videos found under another extension" in w for w in index.warnings)
    with pytest.raises(ValueError, match="232 of 236 videos of split 1 are missing.*--max-missing 1"):
        index_dataset("ucf101", root, splits_dir=UCF_SPLITS, classes=["PushUps", "Basketball"])
    with pytest.raises(ValueError, match="unknown class 'Pushups' in --classes"):
        index_dataset("ucf101", root, splits_dir=UCF_SPLITS, classes=["Pushups"], max_missing=1)


def test_hmdb_split_files_naming_avi_find_the_mp4_with_the_same_stem(tmp_path: Path) -> None:
    root = tmp_path / "hmdb51" / "dive"
    root.mkdir(parents=True)
    shutil.copyfile(HMDB_DIVE, root / HMDB_DIVE.name)
    index = index_dataset("hmdb51", root.parent, splits_dir=HMDB_SPLITS, classes=["dive"], max_missing=1)
    (record,) = index.records
    assert record.path.name == HMDB_DIVE.name and record.splits == {1: "test", 2: "train", 3: "train"}
    assert index.classes == ["dive"] and index.extra["official_labels"] == {"dive": 7}
    assert sum("another extension" in w for w in index.warnings) == 1


def test_the_road_on_real_clips_with_official_lists_and_a_class_subset(tmp_path: Path) -> None:
    root = partial_ucf101(tmp_path / "UCF-101")
    flow, shards, runs = tmp_path / "flow", tmp_path / "shards", tmp_path / "runs"
    classes = tmp_path / "classes.txt"
    classes.write_text("PushUps\nBasketball\n")
    extracted = _run("extract-flow", str(root), str(flow), "--dataset", "ucf101", "--splits-dir", str(UCF_SPLITS),
                     "--classes", f"@{classes}", "--max-missing", "1", "--size", "48x64", "--max-frames", "20",
                     "--backend", "dis")
    assert "ucf101: 4 videos, 2 classes (of 101); split 1: 232 of 236 listed videos missing" in extracted
    summary = _run("inspect", str(flow))
    assert "4 ok, 0 failed" in summary
    assert "class subset of 101 (label=name (official label)): 0=Basketball (7), 1=PushUps (71)" in summary
    assert f"made with (1 shards): asym3d_format {FORMAT_VERSION}" in summary and "backend dis" in summary
    _run("build-rgbf", str(flow), str(shards), "--modalities", "rgb,rgbf", "--storage", "lzf")
    _run("train", str(shards), "--model", "c3d-b5", "--input", "rgbf", "--splits", "1", "--out", str(runs),
         "--clip", "16x32x32", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu")
    _run("evaluate", str(runs), "--splits", "1", "--clips", "2", "--crops", "1", "--device", "cpu")
    report = json.loads((runs / "eval" / "results.json").read_text())
    assert report["splits"]["1"]["videos"] == 2 and report["splits"]["1"]["absent"] == 0
