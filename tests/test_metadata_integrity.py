"""Nothing silently wrong (issue 22, the shards' side): checksums over each shard's attributes and per-video metadata
and over dataset.json and manifest.json, found by ``inspect --verify`` and refused by every reader in one line; a
full disk under build-rgbf's default JPEG storage; a video or class directory linked from outside ROOT.

Real files throughout: one bit flipped in the file's bytes, a real tmpfs (see test_integrity._in_tmpfs)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from test_integrity import ENV, H, W, _cfg, _cli, _in_tmpfs, _tree

from pipeline.datasets import index_dataset
from pipeline.extract import extract_flow
from pipeline.store import ShardSet


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
