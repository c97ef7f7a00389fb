"""Dataset indexing against the real UCF-101/HMDB-51 split files and small trees the tests build themselves."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import DatasetError, default_fcvid_keep_file, index_dataset, read_fcvid_keep_file

# The official split files, copied into the repository so that a fresh clone runs every test.
TEST_DATA = Path(__file__).resolve().parent / "data"
UCF_SPLITS = TEST_DATA / "ucf101_splits"
HMDB_SPLITS = TEST_DATA / "hmdb51_splits"
# Larger material beside the repository (../shared/data); ASYM3D_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("ASYM3D_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FCVID_NAMES = SHARED_DATA / "fcvid" / "UNOFFICIAL_derived_category_names_239.txt"


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- real UCF-101 / HMDB-51


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory):
    """The official UCF-101 lists indexed without videos (shared: indexing 40k lines is the slow part)."""
    root = tmp_path_factory.mktemp("ucf") / "no_videos"
    return index_dataset("ucf101", root, splits_dir=UCF_SPLITS, check_files=False)


def test_ucf101_official_splits_index_to_published_counts(ucf101):
    index = ucf101
    assert len(index.classes) == 101 and index.classes[0] == "ApplyEyeMakeup" and index.classes[100] == "YoYo"
    assert len(index.records) == 13320
    # SOURCES.md: 9537/3783, 9586/3734, 9624/3696; every video is in every split.
    counts = {s: (len(index.split(s, "train")), len(index.split(s, "test"))) for s in (1, 2, 3)}
    assert counts == {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}
    assert all(set(r.splits) == {1, 2, 3} for r in index.records)
    assert {r.label for r in index.split(1, "test")} == set(range(101))
    record = next(r for r in index.records if r.video_id == "HandstandPushups/v_HandStandPushups_g08_c01")
    assert (record.label, record.label_name, record.group) == (36, "HandstandPushups", "g08")
    assert record.path == index.root / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi"
    assert index.warnings == []


def test_ucf101_groups_never_cross_train_and_test(ucf101):
    index = ucf101
    for split, test_groups in {1: range(1, 8), 2: range(8, 15), 3: range(15, 22)}.items():
        groups = {subset: {(r.label, r.group) for r in index.split(split, subset)} for subset in ("train", "test")}
        assert groups["train"].isdisjoint(groups["test"])
        assert {g for _, g in groups["test"]} == {f"g{g:02d}" for g in test_groups}


def test_hmdb51_official_splits_give_70_train_30_test_per_class(tmp_path):
    index = index_dataset("hmdb51", tmp_path, splits_dir=HMDB_SPLITS, check_files=False)
    assert len(index.classes) == 51 and index.classes == sorted(index.classes)
    assert len(index.records) == 6766  # every listed video, 395 of them unused in all three splits
    assert sum(not r.splits for r in index.records) == 395
    for split in (1, 2, 3):
        for subset, per_class in (("train", 70), ("test", 30)):
            counts = Counter(r.label for r in index.split(split, subset))
            assert counts == {label: per_class for label in range(51)}
    # Some HMDB names start with '#': they are videos, not comments.
    assert any(r.video_id.startswith("chew/#2_Gum") for r in index.records)


# -------------------------------------------------------------------------------------------- UCF-style split lists


def ucf_tree(tmp_path: Path, videos_per_class: int = 4) -> tuple[Path, Path]:
    """A 2-class UCF-101 layout: groups g01 are test, g02 train; returns (root, splits_dir)."""
    root, splits = tmp_path / "videos", tmp_path / "splits"
    write(splits / "classInd.txt", "1 Archery\r\n2 Bowling\r\n")
    train, test = [], []
    for label, name in enumerate(("Archery", "Bowling"), start=1):
        for c in range(1, videos_per_class + 1):
            group = "g01" if c % 2 else "g02"
            rel = f"{name}/v_{name}_{group}_c{c:02d}.avi"
            write(root / rel)
            (test if group == "g01" else train).append(rel + ("" if group == "g01" else f" {label}"))
    write(splits / "trainlist01.txt", "\r\n".join(train) + "\r\n")
    write(splits / "testlist01.txt", "\r\n".join(test) + "\r\n")
    return root, splits


def test_ucf_style_lists_on_disk(tmp_path):
    root, splits = ucf_tree(tmp_path)
    index = index_dataset("ucf101", root, splits_dir=splits)
    assert [(len(index.split(1, "train")), len(index.split(1, "test")))] == [(4, 4)]
    assert all(r.path.is_file() and r.path.is_relative_to(root) for r in index.records)
    assert {r.group for r in index.split(1, "test")} == {"g01"}


def test_malformed_line_names_file_and_line(tmp_path):
    root, splits = ucf_tree(tmp_path)
    lines = (splits / "trainlist01.txt").read_text().splitlines()
    lines.insert(2, "Archery/v_Archery_g02_c09.avi 1 extra")
    write(splits / "trainlist01.txt", "\n".join(lines))
    with pytest.raises(DatasetError, match=r"trainlist01\.txt:3: expected"):
        index_dataset("ucf101", root, splits_dir=splits)


@pytest.mark.parametrize("line, error", [
    ("Bowling/v_Bowling_g02_c02.avi 1", r"trainlist01\.txt:5: .*disagrees with class 'Bowling'"),
    ("Curling/v_Curling_g02_c02.avi 1", r"trainlist01\.txt:5: unknown class 'Curling'"),
    ("v_Bowling_g02_c02.avi 2", r"trainlist01\.txt:5: expected '<class>/<video>'"),
    # train is read first, so the clash shows at the testlist line naming the same video
    ("Bowling/v_Bowling_g01_c01.avi 2", r"testlist01\.txt:3: .* in both train and test of split 1"),
])
def test_bad_split_lines_fail_with_line_number(tmp_path, line, error):
    root, splits = ucf_tree(tmp_path)
    write(splits / "trainlist01.txt", (splits / "trainlist01.txt").read_text() + line + "\r\n")
    with pytest.raises(DatasetError, match=error):
        index_dataset("ucf101", root, splits_dir=splits)


def test_missing_videos_are_warned_and_counted_until_more_than_half(tmp_path):
    root, splits = ucf_tree(tmp_path)
    # split 2 swaps the roles of the groups, so each video is named twice
    (splits / "trainlist02.txt").write_text((splits / "testlist01.txt").read_text())
    (splits / "testlist02.txt").write_text((splits / "trainlist01.txt").read_text())
    (root / "Archery" / "v_Archery_g02_c02.avi").unlink()
    (root / "Bowling" / "v_Bowling_g01_c03.avi").unlink()
    index = index_dataset("ucf101", root, splits_dir=splits)
    assert len(index.records) == 6
    assert [(len(index.split(s, "train")), len(index.split(s, "test"))) for s in (1, 2)] == [(3, 3), (3, 3)]
    assert len(index.warnings) == 2  # once per missing video, not once per split
    assert index.warnings[0].startswith(f"{splits / 'trainlist01.txt'}:1: video not found")
    assert f"{splits / 'testlist01.txt'}:4: video not found" in index.warnings[1]
    # Without the disk check the same files index completely.
    assert len(index_dataset("ucf101", root, splits_dir=splits, check_files=False).records) == 8
    for video in sorted(root.rglob("*.avi"))[:3]:  # 5 of 8 missing: the root is wrong, not a few downloads
        video.unlink()
    with pytest.raises(DatasetError, match="5 of 8 videos of split 1 are missing"):
        index_dataset("ucf101", root, splits_dir=splits)


def test_paths_escaping_the_root_are_rejected_or_refused(tmp_path):
    root, splits = ucf_tree(tmp_path)
    write(splits / "testlist01.txt", "Archery/..\r\n")
    with pytest.raises(DatasetError, match=r"testlist01\.txt:1: path 'Archery/\.\.' must be relative"):
        index_dataset("ucf101", root, splits_dir=splits, check_files=False)
    secret = write(tmp_path / "secret.avi")
    (root / "Archery" / "v_Archery_g01_c01.avi").unlink()
    (root / "Archery" / "v_Archery_g01_c01.avi").symlink_to(secret)
    write(splits / "testlist01.txt", "Archery/v_Archery_g01_c01.avi\r\n")
    # a link leading out of the root refuses that video only (extract-flow fails it with the reason); never read
    refused = {r.video_id: r for r in index_dataset("ucf101", root, splits_dir=splits).records if r.refused}
    assert list(refused) == ["Archery/v_Archery_g01_c01"]
    record = refused["Archery/v_Archery_g01_c01"]
    assert record.path == root / "Archery" / "v_Archery_g01_c01.avi"  # the link, not its target
    assert record.refused == f"a symbolic link to {secret}, outside the dataset root {root}; not read"


# ------------------------------------------------------------------------------------------------------- folder


def test_folder_tree_indexes_every_video_as_train_of_split_1(tmp_path):
    for rel in ("walk/b.mp4", "walk/a.AVI", "jump/x.webm", "run/clip.mkv", "run/notes.txt", ".cache/y.mp4"):
        write(tmp_path / rel)
    (tmp_path / "empty").mkdir()
    index = index_dataset("folder", tmp_path)
    assert index.classes == ["jump", "run", "walk"]
    assert [(r.video_id, r.label, r.splits) for r in index.records] == [
        ("jump/x", 0, {1: "train"}), ("run/clip", 1, {1: "train"}), ("walk/a", 2, {1: "train"}),
        ("walk/b", 2, {1: "train"})]
    assert index.split(1, "test") == []
    assert any("run: ignored 1 non-video files (.txt)" in w for w in index.warnings)
    assert any("empty: no video files" in w for w in index.warnings)


def test_folder_tree_with_split_lists_and_id_clash(tmp_path):
    root, splits = ucf_tree(tmp_path)
    index = index_dataset("folder", root, splits_dir=splits)
    assert index.classes == ["Archery", "Bowling"] and len(index.split(1, "test")) == 4
    write(root / "Archery" / "v_Archery_g01_c01.mp4")
    with pytest.raises(DatasetError, match="would both get the id 'Archery/v_Archery_g01_c01'"):
        index_dataset("folder", root)


def test_options_are_checked_per_kind(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset kind 'youtube8m'"):
        index_dataset("youtube8m", tmp_path)
    with pytest.raises(DatasetError, match="needs splits_dir"):
        index_dataset("ucf101", tmp_path)
    with pytest.raises(DatasetError, match="does not use labels_file"):
        index_dataset("folder", tmp_path, labels_file=tmp_path / "labels.txt")


# -------------------------------------------------------------------------------------------------------- FCVID


def test_fcvid_keep_file_covers_the_239_names():
    categories = read_fcvid_keep_file(default_fcvid_keep_file())
    assert len(categories) == 239
    assert 160 <= sum(c.keep for c in categories) <= 180  # the paper keeps about 170
    assert all(c.reason for c in categories)
    if FCVID_NAMES.is_file():
        names = [line.split() for line in FCVID_NAMES.read_text().splitlines()]
        assert [(c.index, c.name) for c in categories] == [(int(i), n) for i, n in names]
    drops = {c.name for c in categories if not c.keep}
    assert {"bee", "beach", "eiffelTower", "smartphone"} <= drops
    assert not {"archery", "makingPizza", "violinPerformance", "yoga"} & drops


def fcvid_tree(tmp_path: Path, labels: str, suffix: str = ".txt") -> tuple[Path, Path, Path]:
    root = tmp_path / "fcvid"
    for line in labels.splitlines():
        if ".." not in line:
            write(root / line.replace(",", " ").split()[0])
    categories = write(tmp_path / "categories.txt", "1 yoga\n2 bee\n3 archery\n4 violinPerformance\n")
    return root, write(tmp_path / f"labels{suffix}", labels), categories


def test_fcvid_keeps_motion_categories_and_relabels_them(tmp_path):
    labels = "v/a.mp4 3 train\nv/b.mp4 bee train\nv/c.mp4 1 test\nv/d.mp4 violinPerformance train\nv/e.mp4 3 test\n"
    root, labels_file, categories = fcvid_tree(tmp_path, labels)
    index = index_dataset("fcvid", root, labels_file=labels_file, categories_file=categories)
    assert index.classes == ["yoga", "archery", "violinPerformance"]
    assert index.extra["relabel"] == {1: 0, 3: 1, 4: 2} and index.extra["dropped_videos"] == 1
    assert [(r.video_id, r.label, r.label_name, r.splits) for r in index.records] == [
        ("v/c", 0, "yoga", {1: "test"}), ("v/a", 1, "archery", {1: "train"}), ("v/e", 1, "archery", {1: "test"}),
        ("v/d", 2, "violinPerformance", {1: "train"})]


def test_fcvid_csv_by_name_without_categories_file_is_all_train(tmp_path):
    root, labels_file, _ = fcvid_tree(tmp_path, "a.mp4,archery\nb.mp4,bee\nc.mp4,tennis\n", suffix=".csv")
    index = index_dataset("fcvid", root, labels_file=labels_file)
    # All kept categories are classes, with videos or not, so labels do not depend on which videos are present.
    kept = [c for c in read_fcvid_keep_file(default_fcvid_keep_file()) if c.keep]
    assert index.classes == [c.name for c in kept]
    assert index.extra["relabel"] == {c.index: label for label, c in enumerate(kept)}  # keep file's numbering
    assert [(r.video_id, r.label_name, r.label) for r in index.records] == [
        ("a", "archery", index.extra["relabel"][5]), ("c", "tennis", index.extra["relabel"][214])]
    assert all(r.splits == {1: "train"} for r in index.records)


@pytest.mark.parametrize("labels, reason", [
    ("a.mp4 3\nb.mp4 2 test\n", "some lines give train/test and some do not"),
    ("a.mp4 3\nb.mp4 7\n", "unknown category '7'"),
    ("a.mp4 3\nb.mp4 3 train extra\n", "expected '<video path> <category> \\[train\\|test\\]'"),
    ("a.mp4 3\na.mp4 1\n", "has label 'yoga' here but 'archery'"),
    ("a.mp4 3\n../b.mp4 1\n", "must be relative to the dataset root"),
])
def test_fcvid_bad_labels_fail_with_line_number(tmp_path, labels, reason):
    root, labels_file, categories = fcvid_tree(tmp_path, labels)
    with pytest.raises(DatasetError, match=rf"labels\.txt:2: .*{reason}"):
        index_dataset("fcvid", root, labels_file=labels_file, categories_file=categories, check_files=False)


def test_fcvid_numeric_labels_need_the_categories_file(tmp_path):
    root, labels_file, categories = fcvid_tree(tmp_path, "a.mp4 3\n")
    with pytest.raises(DatasetError, match=r"labels\.txt:1: numeric category 3 needs a categories file"):
        index_dataset("fcvid", root, labels_file=labels_file)
    write(categories, "1 yoga\n2 Yoga\n")
    with pytest.raises(DatasetError, match=r"categories\.txt:2: category 'Yoga' has no keep/drop decision"):
        index_dataset("fcvid", root, labels_file=labels_file, categories_file=categories)
