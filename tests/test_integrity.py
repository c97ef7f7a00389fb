"""Shards that cannot silently rot: one writer per directory, checksums with verify and repair, one-line errors on
damaged files, full disks and read-only filesystems. Real files, real processes, real signals; ENOSPC and EROFS
come from a real tmpfs mounted in a private user+mount namespace (``unshare -rm``), skipped where that is refused."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from cli import main
from media import make_video, translating_texture
from pipeline.build_rgbf import BuildConfig, build_rgbf
from pipeline.datasets import index_dataset
from pipeline.decode import DecodeConfig
from pipeline.extract import ExtractConfig, extract_flow
from pipeline.lock import DirectoryLock
from pipeline.store import CHECKSUM_KEY, CRC_SUFFIX, DIGEST_ATTR, StoreError, prepare_output
from pipeline.verify import verify_dir, verify_shard

H, W = 48, 64
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _tree(root: Path, per_class: int = 2, frames: int = 5) -> Path:
    for c, (dx, dy) in {"right": (2, 0), "down": (0, 1)}.items():
        for i in range(per_class):
            (root / c).mkdir(parents=True, exist_ok=True)
            make_video(root / c / f"{c}{i}.mkv", translating_texture(frames, H, W, dx, dy, seed=i), codec="ffv1")
    return root


def _cfg(per_shard: int = 2) -> ExtractConfig:
    return ExtractConfig(decode=DecodeConfig(height=H, width=W), backend="dis", videos_per_shard=per_shard)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def _extract_args(root: Path, out: Path, *extra: str) -> list[str]:
    return _cli("extract-flow", str(root), str(out), "--backend", "dis", "--size", f"{H}x{W}", *extra)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(videos, flow shards of 2 shards, training shards with JPEG fields), built once."""
    base = tmp_path_factory.mktemp("integrity")
    root = _tree(base / "data")
    extract_flow(index_dataset("folder", root), base / "flow", _cfg(), progress=False)
    build_rgbf(base / "flow", base / "train", BuildConfig(), progress=False)
    return root, base / "flow", base / "train"


def _stored_regions(path: Path) -> list[tuple[str, int, int]]:
    """(name, file offset, size) of the bytes of every stored array: each chunk of each raw dataset and each JPEG
    frame of each variable-length dataset."""
    regions = []
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        def visit(name: str, obj) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            if obj.dtype.kind == "O":  # JPEG frames live in HDF5's global heap: find their bytes in the file
                for i, frame in enumerate(obj[:]):
                    offset = data.find(frame.tobytes())
                    assert offset > 0
                    regions.append((f"{name}[{i}]", offset, len(frame)))
                return
            for i in range(obj.id.get_num_chunks()):
                info = obj.id.get_chunk_info(i)
                regions.append((f"{name} chunk {i}", info.byte_offset, info.size))
        f.visititems(visit)
    return regions


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_verify_finds_one_flipped_byte_in_every_stored_array(dirs, tmp_path: Path) -> None:
    from pipeline.store import Schema, load_dataset_meta

    _, flow, train = dirs
    for root in (flow, train):
        schema = Schema.from_dict(load_dataset_meta(root)["schema"])
        shard = root / "shard-00000.h5"
        assert verify_shard(shard, schema) == []
        regions = _stored_regions(shard)
        names = {name.split("/")[-1].split(" ")[0].split("[")[0] for name, _, _ in regions}
        assert names == set(schema.field_names) | ({f + CRC_SUFFIX for f in schema.field_names}
                                                   if root == train else set())
        for name, offset, size in regions:
            copy = tmp_path / "copy.h5"
            shutil.copyfile(shard, copy)
            _flip(copy, offset + size // 2)
            damage = verify_shard(copy, schema)
            assert damage, f"a flipped byte in {name} of {shard} went unnoticed"
            assert all(d.shard == copy for d in damage)


def test_inspect_verify_and_repair_redo_exactly_the_damaged_shards(dirs, tmp_path: Path) -> None:
    root, flow_src, train_src = dirs
    flow, train = tmp_path / "flow", tmp_path / "train"
    shutil.copytree(flow_src, flow)
    shutil.copytree(train_src, train)
    runner = CliRunner()
    assert runner.invoke(main, ["inspect", str(flow), "--verify"]).exit_code == 0
    name, offset, size = next(r for r in _stored_regions(flow / "shard-00001.h5") if r[0].endswith("flow chunk 2"))
    _flip(flow / "shard-00001.h5", offset + size // 2)
    _, offset, size = next(r for r in _stored_regions(train / "shard-00000.h5") if "rgbf[" in r[0])
    _flip(train / "shard-00000.h5", offset + size // 2)
    intact = {p: p.read_bytes() for p in (flow / "shard-00000.h5", train / "shard-00001.h5")}

    result = runner.invoke(main, ["inspect", str(flow), "--verify"])
    assert result.exit_code == 1
    damaged = [line for line in result.output.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and "shard-00001.h5: video 'right/right0': field 'flow'" in damaged[0]
    result = runner.invoke(main, ["inspect", str(train), "--verify"])
    assert result.exit_code == 1 and "shard-00000.h5: video 'down/down0': field 'rgbf'" in result.output
    assert "CRC-32" in result.output

    rerun = subprocess.run(_extract_args(root, flow, "--videos-per-shard", "2"), env=ENV, capture_output=True,
                           text=True)
    assert rerun.returncode == 0 and "2/2 shards already complete" in rerun.stdout  # without --repair: unchanged
    repaired = subprocess.run(_extract_args(root, flow, "--videos-per-shard", "2", "--repair"), env=ENV,
                              capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stderr
    assert "1/2 shards already complete" in repaired.stdout and "repaired" in repaired.stderr
    assert verify_dir(flow) == [] and (flow / "shard-00001.h5.damaged").exists()
    summary = build_rgbf(flow, train, BuildConfig(), repair=True, progress=False)
    assert len({d.shard for d in summary.repaired}) == 1
    assert summary.shards_built == 2  # the damaged one, and the one whose input shard was recomputed
    assert verify_dir(train) == []
    assert (flow / "shard-00000.h5").read_bytes() == intact[flow / "shard-00000.h5"]


def test_damaged_files_give_one_line_naming_the_file(dirs, tmp_path: Path) -> None:
    _, flow_src, train_src = dirs
    cases = {
        "truncated": lambda d: (d / "shard-00001.h5").write_bytes((d / "shard-00001.h5").read_bytes()[:3000]),
        "emptied": lambda d: (d / "shard-00001.h5").write_bytes(b""),
        "header": lambda d: _flip(d / "shard-00001.h5", 0),
        "garbage json": lambda d: (d / "dataset.json").write_text("{not json"),
    }
    for case, damage in cases.items():
        flow, train = tmp_path / case / "flow", tmp_path / case / "train"
        shutil.copytree(flow_src, flow)
        shutil.copytree(train_src, train)
        damage(flow)
        damage(train)
        culprit = "dataset.json" if case == "garbage json" else "shard-00001.h5"
        for args in (["inspect", str(flow)], ["build-rgbf", str(flow), str(tmp_path / case / "new")],
                     ["train", str(train), "--model", "c3d-b5", "--out", str(tmp_path / case / "run"),
                      "--clip", "4x32x32", "--epochs", "1", "--device", "cpu", "--workers", "0"]):
            result = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True)
            assert result.returncode == 1, (case, args, result.stderr)
            assert "Traceback" not in result.stderr, (case, args, result.stderr)
            error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
            assert len(error) == 1 and culprit in error[0], (case, args, result.stderr)
        verify = subprocess.run(_cli("inspect", str(flow), "--verify"), env=ENV, capture_output=True, text=True)
        assert verify.returncode == 1 and "Traceback" not in verify.stderr
        if case != "garbage json":
            assert "DAMAGED" in verify.stdout and "shard-00001.h5" in verify.stdout


def test_one_writer_per_directory_and_a_stale_lock_is_taken_over(dirs, tmp_path: Path, caplog) -> None:
    root, _, _ = dirs
    out = tmp_path / "flow"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pipeline.lock import DirectoryLock
        with DirectoryLock({str(out)!r}):
            print("held", flush=True)
            time.sleep(300)
        """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(_extract_args(root, out), env=ENV, capture_output=True, text=True)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"{out}: another asym3d process writes here (PID {holder.pid} on " in second.stderr
        assert not list(out.glob("shard-*")) and not (out / "dataset.json").exists()  # refused before writing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING", logger="asym3d"):
        extract_flow(index_dataset("folder", root), out, _cfg(), progress=False)
    assert f"taking over the lock of PID {holder.pid}" in caplog.text
    assert verify_dir(out) == []


def _writes_under(process: psutil.Process, prefix: str) -> bool:
    """Whether ``process`` has a file open whose path starts with ``prefix``; False once it has exited (a worker
    may end between being listed and being asked)."""
    try:
        return any(f.path.startswith(prefix) for f in process.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def test_killing_the_parent_kills_its_workers_and_a_rerun_finishes_cleanly(tmp_path: Path) -> None:
    root, out = _tree(tmp_path / "data", per_class=4, frames=12), tmp_path / "flow"
    proc = subprocess.Popen(_cli("extract-flow", str(root), str(out), "--backend", "cpu", "--size", f"{H}x{W}",
                                 "--videos-per-shard", "1", "--jobs", "2"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    writers: list[psutil.Process] = []
    while not writers and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        writers = [p for p in parent.children(recursive=True) if _writes_under(p, f"{out}/shard-")]
    assert writers, "the kill should land while workers write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(writers, timeout=30)
    assert not alive, f"writers outlived their parent: {alive}"
    cfg = ExtractConfig(decode=DecodeConfig(height=H, width=W), backend="cpu", videos_per_shard=1)
    summary = extract_flow(index_dataset("folder", root), out, cfg, progress=False)
    assert summary.videos_ok == 8 and not summary.failures
    assert verify_dir(out) == [] and not list(out.glob("*.tmp.*"))


def test_overwrite_with_the_same_configuration_deletes_nothing(dirs, tmp_path: Path) -> None:
    root, flow_src, _ = dirs
    flow = tmp_path / "flow"
    shutil.copytree(flow_src, flow)
    stamps = {p.name: p.stat().st_mtime_ns for p in flow.glob("shard-*.h5")}
    again = extract_flow(index_dataset("folder", root), flow, _cfg(), overwrite=True, progress=False)
    assert again.shards_skipped == 2 and again.frames_decoded == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in flow.glob("shard-*.h5")}


def test_missing_dataset_json_is_checked_against_the_shards(dirs, tmp_path: Path) -> None:
    root, flow_src, _ = dirs
    flow = tmp_path / "flow"
    shutil.copytree(flow_src, flow)
    (flow / "dataset.json").unlink()
    with pytest.raises(StoreError, match="shard-00000.h5: schema.config.flow"):
        extract_flow(index_dataset("folder", root), flow, ExtractConfig(
            decode=DecodeConfig(height=H, width=W), backend="farneback", videos_per_shard=2), progress=False)
    assert not (flow / "dataset.json").exists()
    same = extract_flow(index_dataset("folder", root), flow, _cfg(), progress=False)  # the original options
    assert same.shards_skipped == 2 and (flow / "dataset.json").exists()


def _in_tmpfs(tmp_path: Path, script: str, size: str = "2m") -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a real tmpfs of ``size`` at ``tmp_path/disk``, in a private user+mount namespace."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this system refuses unprivileged user namespaces, so no private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    full = f"set -u; mount -t tmpfs -o size={size} tmpfs {disk}\n" + script
    return subprocess.run(["unshare", "-rm", "sh", "-c", full], env=ENV, capture_output=True, text=True, cwd=REPO)


def test_full_disk_and_read_only_filesystem_are_one_line_errors_and_resume(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", per_class=3, frames=40)
    disk, log = tmp_path / "disk", tmp_path / "log"
    extract = " ".join(_extract_args(root, disk / "flow", "--videos-per-shard", "1"))
    result = _in_tmpfs(tmp_path, f"""
        {extract} >{log}.full.out 2>{log}.full.err; echo $? >{log}.full.rc
        ls {disk}/flow > {log}.full.ls
        {sys.executable} -m cli inspect {disk}/flow --verify >{log}.verify1 2>&1; echo $? >{log}.verify1.rc
        mount -o remount,ro {disk}
        {extract} >{log}.ro.out 2>{log}.ro.err; echo $? >{log}.ro.rc
        mount -o remount,rw,size=64m {disk}
        {extract} >{log}.resume.out 2>{log}.resume.err; echo $? >{log}.resume.rc
        {sys.executable} -m cli inspect {disk}/flow --verify >{log}.verify2 2>&1; echo $? >{log}.verify2.rc
        """)
    assert result.returncode == 0, result.stderr

    def read(name: str) -> str:
        return Path(f"{log}.{name}").read_text()

    for case, reason in (("full", "No space left on device"), ("ro", "Read-only file system")):
        assert read(f"{case}.rc").strip() == "1", (case, read(f"{case}.err"))
        err = read(f"{case}.err")
        assert "Traceback" not in err and "Exception ignored" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and reason in lines[0] and str(disk / "flow") in lines[0], err
    finished = [n for n in read("full.ls").split() if n.endswith(".h5")]
    assert finished and ".tmp." not in read("full.ls")  # some shards finished before the disk filled, no leftovers
    assert read("verify1.rc").strip() == "0", read("verify1")  # and they are intact
    assert read("resume.rc").strip() == "0", read("resume.err")
    assert f"{len(finished)}/6 shards already complete" in read("resume.out")
    assert read("verify2.rc").strip() == "0", read("verify2")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    disk, log = tmp_path / "disk", tmp_path / "log"
    script = textwrap.dedent(f"""
        import torch
        from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
        base = dict(model_name="c3d-b5", model_kwargs={{}}, epoch=1, config={{}}, normalization={{}}, classes=[])
        save_checkpoint("{disk}/best.pt", dict(base, model_state={{"w": torch.ones(1000)}}))
        try:
            save_checkpoint("{disk}/best.pt", dict(base, epoch=2, model_state={{"w": torch.ones(1_000_000)}}))
        except CheckpointError as err:
            print(err)
        print("epoch", load_checkpoint("{disk}/best.pt")["epoch"])
        import os
        print("files", sorted(os.listdir("{disk}")))
        """)
    (tmp_path / "ckpt.py").write_text(script)
    result = _in_tmpfs(tmp_path, f"{sys.executable} {tmp_path / 'ckpt.py'} >{log} 2>&1")
    assert result.returncode == 0, result.stderr
    lines = Path(log).read_text().splitlines()
    assert lines[0] == f"{disk}/best.pt: cannot write (No space left on device); the previous best.pt is unchanged"
    assert lines[1:] == ["epoch 1", "files ['best.pt']"]


def test_lock_is_released_and_reacquired_in_one_process(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path / "x"):
        with pytest.raises(StoreError, match="another asym3d process writes here"):
            DirectoryLock(tmp_path / "x").__enter__()
    with DirectoryLock(tmp_path / "x"):
        assert json.loads((tmp_path / "x" / ".asym3d.lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / "x" / ".asym3d.lock").read_text() == ""


def test_an_impossible_output_path_is_one_line(tmp_path: Path) -> None:
    from pipeline.store import Schema

    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(StoreError, match=r"file/out: cannot write \(Not a directory\)"):
        prepare_output(target / "out", Schema("flow", 1, 1, ()), {}, [])


def test_training_on_a_full_disk_keeps_its_checkpoints_and_resumes(tmp_path: Path) -> None:
    from test_train import write_toy_shards

    shards = write_toy_shards(tmp_path / "shards")
    disk, log = tmp_path / "disk", tmp_path / "log"
    train = " ".join(_cli("train", str(shards), "--model", "c3d-b5", "--out", str(disk / "run"), "--clip", "16x16x16",
                          "--epochs", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--lr", "0.01"))
    epochs = (f"{sys.executable} -c \"from model.checkpoint import load_checkpoint as l; "
              f"print(l('{disk}/run/best.pt')['epoch'], l('{disk}/run/last.pt')['epoch'])\"")
    evaluate = " ".join(_cli("evaluate", str(disk / "run"), "--splits", "1", "--checkpoint", str(disk / "run/best.pt"),
                             "--clips", "1", "--crops", "1", "--device", "cpu"))
    # 120 MB holds epoch 1's 75 MB checkpoint (best.pt and last.pt are one file) but not epoch 2's beside it
    result = _in_tmpfs(tmp_path, f"""
        {train} >{log}.full.out 2>{log}.full.err; echo $? >{log}.full.rc
        {epochs} >{log}.epochs1; ls {disk}/run >{log}.ls
        mount -o remount,size=400m {disk}
        {train} --resume >{log}.resume.out 2>{log}.resume.err; echo $? >{log}.resume.rc
        {epochs} >{log}.epochs2
        mount -o remount,ro {disk}
        {evaluate} >{log}.ro.out 2>{log}.ro.err; echo $? >{log}.ro.rc
        """, size="120m")
    assert result.returncode == 0, result.stderr

    def read(name: str) -> str:
        return Path(f"{log}.{name}").read_text()

    assert read("full.rc").strip() == "1"
    errors = [line for line in read("full.err").splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot write (No space left on device); the previous" in errors[0], read("full.err")
    assert "Traceback" not in read("full.err")
    assert read("epochs1").split() == ["1", "1"]  # both checkpoints of epoch 1 intact
    assert ".tmp." not in read("ls")
    assert read("resume.rc").strip() == "0", read("resume.err")
    best, last = read("epochs2").split()
    assert last == "2" and best in ("1", "2")
    assert read("ro.rc").strip() == "1" and "Traceback" not in read("ro.err")
    errors = [line for line in read("ro.err").splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Read-only file system" in errors[0] and str(disk / "run" / "eval") in errors[0]


def test_build_rgbf_inspect_and_demo_data_on_a_full_then_read_only_disk(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", per_class=3, frames=40)
    flow = tmp_path / "flow"
    extract_flow(index_dataset("folder", root), flow, _cfg(per_shard=1), progress=False)
    disk, log = tmp_path / "disk", tmp_path / "log"
    build = " ".join(_cli("build-rgbf", str(flow), str(disk / "train"), "--storage", "raw"))
    commands = {
        "build": build,
        "strip": " ".join(_cli("inspect", str(flow), "--video", "down/down0", "--out", str(disk / "s.png"))),
        "npz": " ".join(_cli("inspect", str(flow), "--video", "down/down0", "--npz", str(disk / "v.npz"))),
    }
    script = f"{build} >{log}.full.out 2>{log}.full.err; echo $? >{log}.full.rc\nmount -o remount,ro {disk}\n"
    script += "".join(f"{cmd} >{log}.{name}.out 2>{log}.{name}.err; echo $? >{log}.{name}.rc\n"
                      for name, cmd in commands.items())
    script += f"mount -o remount,rw,size=64m {disk}\n"
    script += f"{build} >{log}.resume.out 2>{log}.resume.err; echo $? >{log}.resume.rc\n"
    result = _in_tmpfs(tmp_path, script)
    assert result.returncode == 0, result.stderr

    def read(name: str) -> str:
        return Path(f"{log}.{name}").read_text()

    for name, reason in [("full", "No space left on device")] + [(n, "Read-only file system") for n in commands]:
        err = read(f"{name}.err")
        assert read(f"{name}.rc").strip() == "1" and "Traceback" not in err and "Exception ignored" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and reason in errors[0] and str(disk) in errors[0], (name, err)
    assert read("resume.rc").strip() == "0", read("resume.err")
    assert "already complete" in read("resume.out")


def test_format_1_shards_without_checksums_still_read_but_cannot_be_verified(dirs, tmp_path: Path) -> None:
    _, flow_src, train_src = dirs
    flow, train = tmp_path / "flow", tmp_path / "train"
    for src, dst in ((flow_src, flow), (train_src, train)):  # as version 1 wrote them: no CRC arrays, version 1,
        shutil.copytree(src, dst)                              # no metadata checksums
        meta = json.loads((dst / "dataset.json").read_text())
        del meta[CHECKSUM_KEY]
        meta["schema"]["version"] = 1
        (dst / "dataset.json").write_text(json.dumps(meta))
        for shard in dst.glob("shard-*.h5"):
            with h5py.File(shard, "a") as f:
                f.attrs["asym3d_schema"] = json.dumps(meta["schema"])
                del f.attrs[DIGEST_ATTR]
                for group in f["videos"].values():
                    del group.attrs[DIGEST_ATTR]
                    for name in [n for n in group if n.endswith(CRC_SUFFIX)]:
                        del group[name]
    from pipeline.store import ShardSet

    assert ShardSet(train).read("down/down0", "rgbf").shape == (5, H, W, 3)
    assert build_rgbf(flow, tmp_path / "new", BuildConfig(), progress=False).videos_ok == 4  # v1 input, v2 output
    assert verify_dir(tmp_path / "new") == []
    result = CliRunner().invoke(main, ["inspect", str(train), "--verify"])
    assert result.exit_code == 1 and "format version 1 shards carry no checksums" in result.output
