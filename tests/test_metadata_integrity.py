"""Nothing silently wrong (issue 22, the shards' side): checksums over each shard's attributes and per-video metadata
and over dataset.json and manifest.json, found by ``inspect --verify`` and refused by every reader in one line; a
full disk under build-rgbf's default JPEG storage; a video or class directory linked from outside ROOT.

Real files throughout: one bit flipped in the file's bytes, a real tmpfs (see test_integrity._in_tmpfs)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest
from media import make_video, translating_texture
from test_integrity import ENV, H, W, _cfg, _cli, _in_tmpfs, _tree

from pipeline.build_rgbf import BuildConfig, build_rgbf
from pipeline.datasets import index_dataset
from pipeline.extract import extract_flow
from pipeline.store import (CHECKSUM_KEY, DIGEST_ATTR, DamagedError, Schema, ShardSet, StoreError,
                            load_dataset_meta)
from pipeline.verify import verify_dir, verify_shard

CLASSES = {"Biking": (2, 0), "Diving": (0, 1)}  # class -> motion (px per frame)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(videos of classes Biking and Diving, their flow shards, their training shards), 2 videos per shard."""
    base = tmp_path_factory.mktemp("metadata")
    root = base / "data"
    for c, (dx, dy) in CLASSES.items():
        (root / c).mkdir(parents=True)
        for i in range(2):
            make_video(root / c / f"{c}{i}.mkv", translating_texture(5, H, W, dx, dy, seed=i), codec="ffv1")
    extract_flow(index_dataset("folder", root), base / "flow", _cfg(), progress=False)
    build_rgbf(base / "flow", base / "train", BuildConfig(), progress=False)
    return root, base / "flow", base / "train"


def _copies(dirs, tmp_path: Path) -> tuple[Path, Path, Path]:
    root, flow, train = dirs
    shutil.copytree(flow, tmp_path / "flow")
    shutil.copytree(train, tmp_path / "train")
    return root, tmp_path / "flow", tmp_path / "train"


def _flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file in place, with a plain write (no HDF5, no JSON)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _attribute_bit(shard: Path, obj: str, name: str, scratch: Path, at: int | None = None) -> int:
    """The file offset of a bit that changes attribute ``name`` of ``obj`` when flipped (bit 0 of that byte; of the
    string's character ``at``, its middle one by default).

    Strings live in HDF5's global heap: each occurrence of the value's bytes is tried on a copy until one changes
    the attribute as h5py reads it. Numbers live in the object header: the value with its lowest bit flipped is
    written into a copy with h5py and the one byte that differs is the place (asserted: one byte, one bit)."""
    data = shard.read_bytes()
    with h5py.File(shard, "r") as f:
        value = f[obj].attrs[name]
    if isinstance(value, str):
        raw = value.encode()
        start = data.find(raw)
        while start >= 0:
            offset = start + (len(raw) // 2 if at is None else at)
            shutil.copyfile(shard, scratch)
            _flip_bit(scratch, offset)
            with h5py.File(scratch, "r") as f:
                if f[obj].attrs[name] != value:
                    return offset
            start = data.find(raw, start + 1)
        raise AssertionError(f"{obj} {name}: value bytes not found")
    shutil.copyfile(shard, scratch)
    with h5py.File(scratch, "r+") as f:
        f[obj].attrs.modify(name, value ^ 1)
    changed = [i for i, (a, b) in enumerate(zip(data, scratch.read_bytes())) if a != b]
    assert len(changed) == 1 and bin(data[changed[0]] ^ scratch.read_bytes()[changed[0]]).count("1") == 1, changed
    return changed[0]


def test_build_rgbf_on_a_full_disk_with_jpeg_storage_names_the_shard_and_resumes(tmp_path: Path) -> None:
    """HDF5 reports the failed flush as RuntimeError and then fails the close ("Can't destroy cache") with the file
    still open; that was a traceback, or, when the open file kept the disk full, an error naming manifest.json."""
    root = _tree(tmp_path / "data", per_class=4, frames=60)
    flow = tmp_path / "flow"
    extract_flow(index_dataset("folder", root), flow, _cfg(per_shard=4), progress=False)
    disk, log = tmp_path / "disk", tmp_path / "log"
    build = " ".join(_cli("build-rgbf", str(flow), str(disk / "train")))  # default storage: JPEG
    result = _in_tmpfs(tmp_path, f"""
        {build} >{log}.full.out 2>{log}.full.err; echo $? >{log}.full.rc
        ls -a {disk}/train >{log}.ls
        mount -o remount,size=64m {disk}
        {build} >{log}.resume.out 2>{log}.resume.err; echo $? >{log}.resume.rc
        ls -a {disk}/train >{log}.ls2
        """, size="700k")
    assert result.returncode == 0, result.stderr

    def read(name: str) -> str:
        return Path(f"{log}.{name}").read_text()

    err = read("full.err")
    assert read("full.rc").strip() == "1", err
    assert "Traceback" not in err and "Exception ignored" not in err and "destroy cache" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {disk}/train/shard-00000.h5: cannot write (No space left on device)"], err
    assert ".tmp." not in read("ls") and "manifest.json" in read("ls")  # the manifest still written, nothing partial
    assert read("resume.rc").strip() == "0", read("resume.err")
    assert "8 videos ok, 0 failed, 2 shards built" in read("resume.out")
    assert "shard-00001.h5" in read("ls2") and ".tmp." not in read("ls2")


def test_a_video_or_class_linked_from_outside_root_fails_that_video_and_the_run_goes_on(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    elsewhere = _tree(tmp_path / "elsewhere")
    (root / "right" / "linked.mkv").symlink_to(elsewhere / "right" / "right0.mkv")
    (root / "left").symlink_to(elsewhere / "down", target_is_directory=True)
    (root / "down" / "inside.mkv").symlink_to(root / "down" / "down0.mkv")  # a link inside the root is fine
    result = subprocess.run(_cli("extract-flow", str(root), str(tmp_path / "flow"), "--backend", "dis", "--size",
                                 f"{H}x{W}", "--max-failures", "1.0"), env=ENV, capture_output=True, text=True)
    assert "Traceback" not in result.stderr, result.stderr
    failed = sorted(line for line in result.stderr.splitlines() if line.startswith("FAILED"))
    outside = "outside the dataset root {root}; not read".format(root=root.resolve())
    assert failed == [
        f"FAILED left/down0: {root.resolve()}/left/down0.mkv: a symbolic link to {elsewhere.resolve()}/down/down0.mkv, "
        f"{outside}",
        f"FAILED left/down1: {root.resolve()}/left/down1.mkv: a symbolic link to {elsewhere.resolve()}/down/down1.mkv, "
        f"{outside}",
        f"FAILED right/linked: {root.resolve()}/right/linked.mkv: a symbolic link to "
        f"{elsewhere.resolve()}/right/right0.mkv, {outside}",
    ], result.stderr
    shards = ShardSet(tmp_path / "flow")
    assert sorted(v.video_id for v in shards.videos) == ["down/down0", "down/down1", "down/inside", "right/right0",
                                                        "right/right1"]


def test_one_flipped_bit_in_any_attribute_is_found_by_verify_and_refused_by_the_reader(dirs, tmp_path: Path) -> None:
    """Every attribute the stages write, of the shard and of a video, in a flow and a training shard."""
    _, flow, train = dirs
    for root in (flow, train):
        schema = Schema.from_dict(load_dataset_meta(root)["schema"])
        shard = root / "shard-00000.h5"
        with h5py.File(shard, "r") as f:
            where = {"/": sorted(f.attrs), "videos/0001": sorted(f["videos/0001"].attrs)}
        assert DIGEST_ATTR in where["/"] and {"label", "label_name", "splits", "n_frames", "source", "video_id",
                                              DIGEST_ATTR} == set(where["videos/0001"])
        for obj, names in where.items():
            for name in names:
                offset = _attribute_bit(shard, obj, name, tmp_path / "scratch.h5")
                damaged = tmp_path / root.name / "shard-00000.h5"
                shutil.rmtree(damaged.parent, ignore_errors=True)
                shutil.copytree(root, damaged.parent)
                _flip_bit(damaged, offset)
                assert verify_shard(damaged, schema), f"{root.name} {obj} {name}: a flipped bit went unnoticed"
                with pytest.raises(StoreError, match="shard-00000.h5: "):
                    ShardSet(damaged.parent)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True)


def _one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _extract(root: Path, flow: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run("extract-flow", str(root), str(flow), "--backend", "dis", "--size", f"{H}x{W}",
                "--videos-per-shard", "2", *extra)


def _train(train: Path, out: Path) -> subprocess.CompletedProcess:
    return _run("train", str(train), "--model", "c3d-b5", "--out", str(out), "--clip", "4x32x32", "--epochs", "1",
                "--device", "cpu", "--workers", "0")


def test_a_flipped_label_in_a_flow_shard_is_found_refused_and_repaired(dirs, tmp_path: Path) -> None:
    root, flow, train = _copies(dirs, tmp_path)
    shard = flow / "shard-00001.h5"  # Diving0 and Diving1: label 1
    with h5py.File(shard, "r") as f:
        assert (f["videos/0000"].attrs["video_id"], int(f["videos/0000"].attrs["label"])) == ("Diving/Diving0", 1)
    _flip_bit(shard, _attribute_bit(shard, "videos/0000", "label", tmp_path / "scratch.h5"))
    with h5py.File(shard, "r") as f:
        assert int(f["videos/0000"].attrs["label"]) == 0  # the label 1 -> 0 that build-rgbf used to copy

    verify = _run("inspect", str(flow), "--verify")
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert verify.stdout.splitlines() == [f"DAMAGED {shard}: video 'Diving/Diving0': metadata (label, class name, "
                                          "splits, frame count, source) fails its checksum"]
    error = _one_error(_run("build-rgbf", str(flow), str(tmp_path / "new")))
    assert error.startswith(f"Error: {shard}: damaged shard (video 'Diving/Diving0': metadata") and not (
        tmp_path / "new").exists()

    repaired = _extract(root, flow, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert f"repaired {shard}" in repaired.stderr and (flow / "shard-00001.h5.damaged").exists()
    assert _run("inspect", str(flow), "--verify").returncode == 0
    rebuilt = build_rgbf(flow, tmp_path / "new", BuildConfig(), progress=False)
    assert rebuilt.videos_ok == 4
    labels = {v.video_id: (v.label, v.label_name) for v in ShardSet(tmp_path / "new").videos}
    assert labels["Diving/Diving0"] == (1, "Diving")


def test_a_flipped_split_in_a_training_shard_is_refused_by_train_and_repaired(dirs, tmp_path: Path) -> None:
    _, flow, train = _copies(dirs, tmp_path)
    shard = train / "shard-00000.h5"
    _flip_bit(shard, _attribute_bit(shard, "videos/0000", "splits", tmp_path / "scratch.h5", at=2))
    with h5py.File(shard, "r") as f:
        assert json.loads(f["videos/0000"].attrs["splits"]) == {"0": "train"}  # {"1": "train"} one bit away

    error = _one_error(_train(train, tmp_path / "run"))
    assert error.startswith(f"Error: {shard}: damaged shard (video 'Biking/Biking0': metadata")
    assert "DAMAGED" in _run("inspect", str(train), "--verify").stdout
    summary = build_rgbf(flow, train, BuildConfig(), repair=True, progress=False)
    assert [d.shard for d in summary.repaired] == [shard] and summary.shards_built == 1
    assert verify_dir(train) == []
    assert all(v.splits == {1: "train"} for v in ShardSet(train).videos)


def test_a_one_bit_edit_of_dataset_json_is_one_line_naming_it_and_repair_rebuilds_it(dirs, tmp_path: Path) -> None:
    root, flow, train = _copies(dirs, tmp_path)
    for directory in (flow, train):
        meta = directory / "dataset.json"
        text = meta.read_bytes()
        _flip_bit(meta, text.find(b'"Biking"') + len('"Bikin'))  # "Biking" -> "Bikinf", still valid JSON
        assert json.loads(meta.read_text())["dataset"]["classes"] == ["Bikinf", "Diving"]
        verify = _run("inspect", str(directory), "--verify")
        assert _one_error(verify) == (f"Error: {meta}: damaged (its content does not match its checksum); rerun the "
                                      "stage that wrote it with --repair to rebuild it from the shards")
    assert "flow/dataset.json: damaged" in _one_error(_run("build-rgbf", str(flow), str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()
    assert "train/dataset.json: damaged" in _one_error(_train(train, tmp_path / "run"))
    assert "flow/dataset.json: damaged" in _one_error(_extract(root, flow))  # without --repair: refused

    other = _extract(root, flow, "--repair", "--classes", "Biking")  # another declaration: not rebuilt from it
    assert "cannot be rebuilt from it" in _one_error(other) and not (flow / "dataset.json.damaged").exists()
    repaired = _extract(root, flow, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "2/2 shards already complete" in repaired.stdout  # the shards were intact: nothing recomputed
    assert (flow / "dataset.json.damaged").exists() and verify_dir(flow) == []
    assert load_dataset_meta(flow)["dataset"]["classes"] == ["Biking", "Diving"]
    assert build_rgbf(flow, train, BuildConfig(), repair=True, progress=False).shards_built == 0
    assert ShardSet(train).classes == ["Biking", "Diving"]


def test_a_damaged_manifest_is_found_and_rewritten(dirs, tmp_path: Path) -> None:
    root, flow, _ = _copies(dirs, tmp_path)
    manifest = flow / "manifest.json"
    _flip_bit(manifest, manifest.read_bytes().find(b'"label": 1') + len('"label": '))  # 1 -> 0
    verify = _run("inspect", str(flow), "--verify")
    assert verify.returncode == 1 and verify.stdout.splitlines() == [
        f"DAMAGED {manifest}: damaged (its content does not match its checksum); rerun the stage that wrote it with "
        "--repair to rebuild it from the shards"]
    assert _extract(root, flow, "--repair").returncode == 0
    assert verify_dir(flow) == [] and json.loads(manifest.read_text())["summary"]["videos_ok"] == 4


def test_files_written_before_metadata_checksums_read_but_are_reported_unverifiable(dirs, tmp_path: Path) -> None:
    _, flow, train = _copies(dirs, tmp_path)
    for directory in (flow, train):  # as asym3d wrote them before: no digests, no checksum keys
        for name in ("dataset.json", "manifest.json"):
            doc = json.loads((directory / name).read_text())
            del doc[CHECKSUM_KEY]
            (directory / name).write_text(json.dumps(doc))
        for shard in directory.glob("shard-*.h5"):
            with h5py.File(shard, "a") as f:
                del f.attrs[DIGEST_ATTR]
                for group in f["videos"].values():
                    del group.attrs[DIGEST_ATTR]
    verify = _run("inspect", str(train), "--verify")
    assert verify.returncode == 0 and "4 file(s) written before metadata checksums, whose labels, splits and " \
        "attributes cannot be verified: dataset.json, shard-00000.h5, shard-00001.h5, manifest.json" in verify.stdout
    assert len(ShardSet(train)) == 4
    assert build_rgbf(flow, tmp_path / "new", BuildConfig(), progress=False).videos_ok == 4
    assert verify_dir(tmp_path / "new") == [] and _run("inspect", str(tmp_path / "new"), "--verify").stdout.endswith(
        "every stored array and every attribute matches its checksum\n")
    with h5py.File(flow / "shard-00000.h5", "a") as f:  # a checksum's own name damaged: not taken for an old file
        f["videos/0000"].attrs["asym3d_digesu"] = "sha256:0"
    with pytest.raises(DamagedError, match="unexpected attributes asym3d_digesu"):
        ShardSet(flow)
