"""Nothing silently wrong (issue 22, the shards' side): checksums over each shard's attributes and per-video metadata
and over dataset.json and manifest.json, found by ``inspect --verify`` and refused by every reader in one line; a
full disk under build-rgbf's default JPEG storage; a video or class directory linked from outside ROOT.

Real files throughout: one bit flipped in the file's bytes, a real tmpfs (see test_integrity._in_tmpfs)."""
from __future__ import annotations

import sys
from pathlib import Path

from test_integrity import ENV, H, W, _cfg, _cli, _in_tmpfs, _tree

from pipeline.datasets import index_dataset
from pipeline.extract import extract_flow


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
