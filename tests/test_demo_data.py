"""The synthetic demo dataset: real decodable videos, UCF-101 split lists whose groups never cross train and test,
determinism, and -- the point of it -- classes that a single frame cannot tell apart but motion can."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig, decode_video
from pipeline.demo_data import (
    CLASS_NAMES,
    MOTIONS,
    DemoDataError,
    DemoSummary,
    held_out_groups,
    make_demo_dataset,
    plan_videos,
    render_video,
)

# Tiny: 3 classes (translate up, translate down, static) x 4 videos x 8 frames at 64x80, one video per class and group.
SMALL = dict(classes=3, videos_per_class=4, groups=4, frames=8, height=64, width=80, seed=3)
NAME = re.compile(r"^(\w+)/v_(\w+)_g(\d\d)_c(\d\d)\.avi$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "out", **SMALL)


def _lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n"), f"{path} must use CRLF line ends"
    return raw.decode("ascii").splitlines()


def _decoded(demo: DemoSummary, relpath: str) -> np.ndarray:
    return decode_video(demo.video_root / relpath, DecodeConfig(height=SMALL["height"], width=SMALL["width"]))


def test_every_video_is_a_real_file_of_the_right_length(demo: DemoSummary) -> None:
    plan = plan_videos(SMALL["classes"], SMALL["videos_per_class"], SMALL["groups"])
    assert demo.num_videos == demo.encoded == len(plan) == 12
    assert demo.class_names == ("TranslateUp", "TranslateDown", "Static")
    on_disk = sorted(p.relative_to(demo.video_root).as_posix() for p in demo.video_root.rglob("*") if p.is_file())
    assert on_disk == sorted(v.relpath for v in plan)  # and no leftover temporary files
    for spec in plan:
        frames = _decoded(demo, spec.relpath)
        assert frames.shape == (SMALL["frames"], SMALL["height"], SMALL["width"], 3)
    assert demo.root.joinpath("demo.json").is_file()


def test_split_lists_follow_ucf101_and_never_share_a_group(demo: DemoSummary) -> None:
    classes = {int(n): name for n, name in (line.split() for line in _lines(demo.class_index))}
    assert classes == {1: "TranslateUp", 2: "TranslateDown", 3: "Static"}
    all_videos = {v.relpath for v in plan_videos(SMALL["classes"], SMALL["videos_per_class"], SMALL["groups"])}
    tested_groups: list[int] = []
    for split, (train_list, test_list) in enumerate(zip(demo.train_lists, demo.test_lists), start=1):
        assert (train_list.name, test_list.name) == (f"trainlist0{split}.txt", f"testlist0{split}.txt")
        train = dict(line.split() for line in _lines(train_list))
        test = _lines(test_list)
        groups: dict[str, set[int]] = {"train": set(), "test": set()}
        seen_classes: dict[str, set[str]] = {"train": set(), "test": set()}
        for subset, relpaths in (("train", list(train)), ("test", test)):
            for relpath in relpaths:
                folder, cls, group, _ = NAME.match(relpath).groups()
                assert folder == cls
                groups[subset].add(int(group))
                seen_classes[subset].add(cls)
        for relpath, label in train.items():  # the label is classInd's number for the video's class
            assert classes[int(label)] == relpath.split("/")[0]
        assert not groups["train"] & groups["test"]
        assert groups["test"] == held_out_groups(SMALL["groups"], split)
        assert seen_classes["train"] == seen_classes["test"] == set(classes.values())
        assert set(train) | set(test) == all_videos and not set(train) & set(test)
        tested_groups += sorted(groups["test"])
    assert sorted(tested_groups) == [1, 2, 3, 4]  # each group is tested in exactly one split


def test_the_ucf101_indexer_reads_it(demo: DemoSummary) -> None:
    index = index_dataset("ucf101", demo.video_root, splits_dir=demo.split_dir)
    assert index.classes == list(demo.class_names) and not index.warnings
    assert len(index.records) == 12
    for split in (1, 2, 3):
        test = index.split(split, "test")
        assert len(index.split(split, "train")) + len(test) == 12
        assert {r.group for r in test} == {f"g{g:02d}" for g in held_out_groups(SMALL["groups"], split)}


def test_test_groups_are_thirds() -> None:
    assert [sorted(held_out_groups(6, s)) for s in (1, 2, 3)] == [[1, 2], [3, 4], [5, 6]]
    assert [sorted(held_out_groups(25, s)) for s in (1, 2, 3)] == [list(range(1, 10)), list(range(10, 18)),
                                                                 list(range(18, 26))]


def test_frames_are_deterministic_and_depend_on_the_seeds() -> None:
    kwargs = dict(frames=6, height=40, width=48)
    first = render_video("rotate-cw", background_seed=(0, 1), video_seed=(0, 2), **kwargs)
    assert first.dtype == np.uint8 and first.shape == (6, 40, 48, 3)
    assert np.array_equal(first, render_video("rotate-cw", background_seed=(0, 1), video_seed=(0, 2), **kwargs))
    assert not np.array_equal(first, render_video("rotate-cw", background_seed=(0, 1), video_seed=(0, 3), **kwargs))
    assert not np.array_equal(first, render_video("rotate-cw", background_seed=(1, 1), video_seed=(0, 2), **kwargs))


def test_frame_zero_is_the_same_whatever_the_motion() -> None:
    # The class is not in any single frame by construction: with the same seeds, every motion starts from the same
    # frame, and the frames after it differ.
    kwargs = dict(frames=4, height=40, width=48, background_seed=(5, 1), video_seed=(5, 2))
    videos = {motion: render_video(motion, **kwargs) for motion in MOTIONS}
    for motion, frames in videos.items():
        assert np.array_equal(frames[0], videos["static"][0]), motion
        if motion != "static":
            assert not np.array_equal(frames[1:], videos["static"][1:]), motion


def test_a_second_run_writes_the_same_bytes(demo: DemoSummary, tmp_path: Path) -> None:
    # The mpeg4 encoder runs single-threaded with bitexact flags; the same ffmpeg build gives identical files.
    again = make_demo_dataset(tmp_path / "again", **SMALL)
    for path in sorted(demo.root.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (again.root / path.relative_to(demo.root)).read_bytes(), path


def test_a_single_frame_does_not_tell_the_class_but_motion_does(demo: DemoSummary) -> None:
    first_frame_mean: dict[str, list[float]] = defaultdict(list)
    videos: dict[str, list[np.ndarray]] = defaultdict(list)
    for spec in plan_videos(SMALL["classes"], SMALL["videos_per_class"], SMALL["groups"]):
        frames = _decoded(demo, spec.relpath)
        first_frame_mean[spec.class_name].append(float(frames[0].mean()))
        videos[spec.class_name].append(frames)
    # Same scenes in every class (one per group), same object statistics: the class means of frame 0 differ by
    # much less than the videos of one class do.
    class_means = [np.mean(v) for v in first_frame_mean.values()]
    within = np.mean([np.std(v) for v in first_frame_mean.values()])
    assert np.ptp(class_means) < 0.5 * within, (class_means, within)
    # ... while the direction of motion gives the class: over each class's videos together, and for most single
    # videos (one whose only object is small or half outside the frame can lose to camera jitter and noise).
    directions = {"TranslateUp": (0, -1), "TranslateDown": (0, 1)}
    for name, (ux, uy) in directions.items():
        along, across = _along_across(_dominant_motion(videos[name]), ux, uy)
        assert along > 0 and across == 0, (name, along, across)
        singles = [_along_across(_dominant_motion([v]), ux, uy) for v in videos[name]]
        assert sum(along > abs(across) for along, across in singles) >= 3, (name, singles)


def _along_across(motion: tuple[int, int], ux: int, uy: int) -> tuple[int, int]:
    """A motion's components along and across the unit axis direction (ux, uy)."""
    dx, dy = motion
    return dx * ux + dy * uy, dx * uy - dy * ux


def _dominant_motion(videos: list[np.ndarray], reach: int = 6) -> tuple[int, int]:
    """The whole-pixel (dx, dy) that best maps each frame difference onto the next one, over all ``videos``.

    Differencing removes the static scene; a moving object makes consecutive differences shifted copies of each
    other, while camera jitter and noise are uncorrelated from one difference to the next. The cross-power spectra
    of all consecutive pairs are summed and whitened (phase correlation), so the peak is the shared motion.
    """
    cross = 0
    for frames in videos:
        grey = frames.astype(np.float64).mean(axis=3)
        diffs = np.diff(grey, axis=0)
        diffs -= diffs.mean(axis=(1, 2), keepdims=True)
        spectra = np.fft.rfft2(diffs)
        cross = cross + (spectra[1:] * np.conj(spectra[:-1])).sum(axis=0)
    correlation = np.fft.irfft2(cross / (np.abs(cross) + 1e-12), s=grey.shape[1:])
    window = np.fft.fftshift(correlation)
    cy, cx = np.array(window.shape) // 2
    window = window[cy - reach : cy + reach + 1, cx - reach : cx + reach + 1]
    iy, ix = np.unravel_index(np.argmax(window), window.shape)
    return int(ix) - reach, int(iy) - reach


def test_rerun_resumes_and_other_parameters_are_refused(tmp_path: Path) -> None:
    small = dict(SMALL, frames=3)
    out = tmp_path / "out"
    first = make_demo_dataset(out, **small)
    victim = first.video_root / "TranslateUp" / "v_TranslateUp_g02_c01.avi"
    victim.unlink()
    assert make_demo_dataset(out, **small).encoded == 1  # only the missing video
    assert victim.is_file()
    with pytest.raises(DemoDataError, match=r"other parameters \(frames\)"):
        make_demo_dataset(out, **dict(small, frames=4))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DemoDataError, match="not an empty directory or a demo dataset"):
        make_demo_dataset(foreign, **small)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(classes=11), "classes must be 2..10"),
        (dict(groups=2), "groups must be 3..99"),
        (dict(videos_per_class=3, groups=4), r"videos_per_class \(3\) must be at least groups \(4\)"),
        (dict(frames=1), "frames must be 2.."),
        (dict(height=8), "at least 16x16"),
    ],
)
def test_bad_parameters_are_refused_before_writing(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(DemoDataError, match=message):
        make_demo_dataset(tmp_path / "out", **dict(SMALL, **changes))
    assert not (tmp_path / "out").exists()


def test_every_motion_renders() -> None:
    assert len(MOTIONS) == len(CLASS_NAMES) == 10
    for motion in MOTIONS:
        frames = render_video(motion, frames=3, height=24, width=32, background_seed=0, video_seed=3)
        assert frames.shape == (3, 24, 32, 3)
    with pytest.raises(DemoDataError, match="unknown motion 'jump'"):
        render_video("jump", frames=3, height=24, width=32, background_seed=0, video_seed=3)


def test_cli_make_demo_data(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["make-demo-data", str(tmp_path / "demo"), "--classes", "2", "--videos-per-class", "3", "--groups", "3",
            "--frames", "3", "--size", "32x40", "--seed", "1"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "6 videos (6 encoded now), 2 classes" in result.output
    frames = decode_video(tmp_path / "demo/videos/TranslateDown/v_TranslateDown_g03_c01.avi",
                          DecodeConfig(height=32, width=40))
    assert frames.shape == (3, 32, 40, 3)
    assert "(0 encoded now)" in runner.invoke(main, args).output

    refused = runner.invoke(main, args[:-1] + ["2"])  # another seed on the same directory
    assert refused.exit_code == 1 and "other parameters (seed)" in refused.output
    bad_size = runner.invoke(main, ["make-demo-data", str(tmp_path / "x"), "--size", "big"])
    assert bad_size.exit_code == 2 and "is not HxW" in bad_size.output
