"""--dataset kinetics (issue 23, item 4): the official annotation CSVs over a downloaded tree, made here from real
clips in both layouts (``<split>/<label>/`` and the flat ``<split>/``), index with the right labels and splits; a
listed clip missing on disk is counted and warned about, not fatal; extract-flow runs on the index."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.datasets import DatasetError, index_dataset
from pipeline.store import ShardSet

CLIPS = Path(__file__).parent / "data" / "real_clips"
HEADER = "label,youtube_id,time_start,time_end,split"


@pytest.fixture
def kinetics(tmp_path: Path) -> tuple[Path, Path]:
    """Videos under ``root`` as the downloaders lay them out, CSVs in ``annotations`` (one clip never downloaded)."""
    root, annotations = tmp_path / "k400", tmp_path / "annotations"
    placed = {  # relative path -> real clip
        "train/abseiling/AAAAAAAAAAA_000010_000020.mp4": CLIPS / "ucf101" / "Basketball" / "v_Basketball_g01_c02.mp4",
        "train/air drumming/B-B_BBBBBBB_000000_000010.mp4": CLIPS / "other" / "kinetics400_tai_chi" / "ta_chi.mp4",
        "val/DDDDDDDDDDD_000005_000015.avi": CLIPS / "ucf101" / "PushUps" / "v_PushUps_g02_c03.avi",  # flat layout
        "val/air_drumming/EEEEEEEEEEE_000001_000011.mp4":
            CLIPS / "hmdb51" / "dive" / "BASE_Jumping_Compilation_-_Brilliant_dive_f_cm_np1_le_bad_3.mp4",
    }
    for relative, source in placed.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / relative)
    annotations.mkdir()
    (annotations / "train.csv").write_text("\n".join([
        HEADER, "abseiling,AAAAAAAAAAA,10,20,train", '"air drumming",B-B_BBBBBBB,0,10,train',
        "abseiling,CCCCCCCCCCC,3,13,train"]) + "\n")  # CCCC.. was never downloaded
    (annotations / "validate.csv").write_text("\n".join([
        HEADER + ",is_cc", "abseiling,DDDDDDDDDDD,5.0,15.0,val,0", "air drumming,EEEEEEEEEEE,1,11,val,0"]) + "\n")
    (annotations / "test.csv").write_text("youtube_id,time_start,time_end,split\nZZZZZZZZZZZ,0,10,test\n")
    return root, annotations


def test_kinetics_indexes_labels_splits_and_counts_the_missing_clip(kinetics):
    root, annotations = kinetics
    index = index_dataset("kinetics", root, splits_dir=annotations)
    assert index.classes == ["abseiling", "air drumming"]
    got = {Path(r.video_id).name: (r.label_name, r.label, r.splits, r.path.relative_to(root.resolve()).as_posix())
           for r in index.records}
    assert got == {
        "AAAAAAAAAAA_000010_000020": ("abseiling", 0, {1: "train"}, "train/abseiling/AAAAAAAAAAA_000010_000020.mp4"),
        "B-B_BBBBBBB_000000_000010": ("air drumming", 1, {1: "train"},
                                      "train/air drumming/B-B_BBBBBBB_000000_000010.mp4"),
        "DDDDDDDDDDD_000005_000015": ("abseiling", 0, {1: "test"}, "val/DDDDDDDDDDD_000005_000015.avi"),
        "EEEEEEEEEEE_000001_000011": ("air drumming", 1, {1: "test"}, "val/air_drumming/EEEEEEEEEEE_000001_000011.mp4"),
    }
    assert index.missing == {1: (1, 5)}
    assert len(index.warnings) == 1 and "train.csv:4" in index.warnings[0] and "CCCCCCCCCCC_000003_000013" in \
        index.warnings[0]
    with pytest.raises(DatasetError, match="1 of 5 videos of split 1 are missing"):
        index_dataset("kinetics", root, splits_dir=annotations, max_missing=0.1)
    subset = index_dataset("kinetics", root, splits_dir=annotations, classes=["air drumming"])
    assert [r.label for r in subset.records] == [0, 0] and subset.extra["official_labels"] == {"air drumming": 1}


def test_kinetics_csv_errors_name_file_and_line(kinetics):
    root, annotations = kinetics
    (annotations / "validate.csv").write_text(HEADER + "\nabseiling,DDDDDDDDDDD,five,15,val\n")
    with pytest.raises(DatasetError, match=r"validate.csv:2: time_start and time_end must be numbers"):
        index_dataset("kinetics", root, splits_dir=annotations)
    (annotations / "validate.csv").write_text("label,youtube_id,split\n")
    with pytest.raises(DatasetError, match=r"validate.csv:1: .*lacks time_start, time_end"):
        index_dataset("kinetics", root, splits_dir=annotations)
    (annotations / "validate.csv").unlink()
    with pytest.raises(DatasetError, match="no validate.csv or val.csv"):
        index_dataset("kinetics", root, splits_dir=annotations)


def test_extract_flow_runs_on_a_kinetics_tree(kinetics, tmp_path):
    root, annotations = kinetics
    result = CliRunner().invoke(main, ["extract-flow", str(root), str(tmp_path / "flow"), "--dataset", "kinetics",
                                       "--splits-dir", str(annotations), "--backend", "dis", "--size", "32x43",
                                       "--max-frames", "4"])
    assert result.exit_code == 0, result.output
    assert "split 1: 1 of 5 listed videos missing" in result.stderr
    shards = ShardSet(tmp_path / "flow")
    assert shards.classes == ["abseiling", "air drumming"] and len(shards) == 4
    assert sorted((v.label, v.splits[1]) for v in shards) == [(0, "test"), (0, "train"), (1, "test"), (1, "train")]
