"""Checkpoints are verified on load: a flipped bit anywhere in best.pt / last.pt is refused in one line naming the
file (evaluate, train --resume, train --init), or changes nothing that is loaded; never a silently wrong weight."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_digest
from test_errors import _invoke, _one_line_error
from test_integrity import _flip
from test_train import write_toy_shards

TRAIN = ["--model", "c3d-b5", "--clip", "16x16x16", "--batch-size", "4", "--workers", "0", "--epochs", "1",
         "--device", "cpu"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_single_bit_flip_is_refused_or_changes_nothing(tmp_path: Path) -> None:
    """All byte positions of a small checkpoint, one bit each (the bit cycles through 0..7 along the file)."""
    state = dict(model_name="c3d-b5", model_kwargs={"clip": [16, 16, 16]}, config={"split": 1}, epoch=3,
                 normalization={"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}, classes=["a", "b"],
                 model_state={"w": torch.arange(6.0), "b": torch.ones(2)})
    path = tmp_path / "best.pt"
    save_checkpoint(path, state)
    original = path.read_bytes()
    refused = unchanged = 0
    for position in range(len(original)):
        damaged = bytearray(original)
        damaged[position] ^= 1 << (position % 8)
        path.write_bytes(damaged)
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
            refused += 1
            continue
        digest = loaded.pop("digest")
        assert _same(loaded, state) and digest == state_digest(state), f"bit {position % 8} of byte {position}"
        unchanged += 1  # zip header fields torch does not read, alignment padding
    assert refused + unchanged == len(original) and refused > len(original) // 2


def _flip_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's stored bytes (a zip member's data)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with path.open("rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    _flip(path, info.header_offset + 30 + name_len + extra_len + info.file_size // 2)


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run trained by the CLI (split 1, RUN/split1), then one bit of its last.pt's weights flipped."""
    root = tmp_path_factory.mktemp("damaged")
    shards = write_toy_shards(root / "shards")
    run = root / "run"
    result = _invoke("train", shards, *TRAIN, "--splits", "1", "--out", run)
    assert result.exit_code == 0, result.output
    _flip_tensor_byte(run / "split1" / "last.pt")
    return run


def test_a_damaged_checkpoint_is_one_line_for_evaluate(damaged_run: Path) -> None:
    last = damaged_run / "split1" / "last.pt"
    result = _invoke("evaluate", damaged_run, "--splits", "1", "--checkpoint", "last", "--clips", "1", "--crops",
                     "1", "--device", "cpu", "--out", damaged_run.parent / "report")
    _one_line_error(result, f"{last}: damaged: archive/data/", "fails its CRC-32 check")
    assert not (damaged_run.parent / "report").exists()


def test_a_directory_flag_on_a_tensors_entry_is_caught_by_the_digest(tmp_path: Path) -> None:
    """The single-bit flip the CRCs miss: torch then skips the tensor's bytes and leaves its memory uninitialised."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, dict(model_name="c3d-b5", model_kwargs={}, config={}, epoch=1, normalization={},
                               classes=[], model_state={"w": torch.arange(6.0), "b": torch.ones(2)}))
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data/1")).encode()
        record = archive.start_dir
    data = path.read_bytes()
    while data[record + 46:record + 46 + len(name)] != name:  # the central directory's record of that tensor
        record = data.index(b"PK\x01\x02", record + 4)
    _flip(path, record + 38)  # bit 4 of its external attributes: the MS-DOS "directory" flag
    with pytest.raises(CheckpointError, match="damaged: what loads differs from the digest stored in it"):
        load_checkpoint(path)


def test_a_damaged_checkpoint_is_one_line_for_resume_and_init(damaged_run: Path, tmp_path: Path) -> None:
    last = damaged_run / "split1" / "last.pt"
    shards = damaged_run.parent / "shards"
    before = last.read_bytes()
    _one_line_error(_invoke("train", shards, *TRAIN, "--epochs", "2", "--splits", "1", "--out", damaged_run,
                            "--resume"), f"{last}: damaged")
    assert last.read_bytes() == before
    _one_line_error(_invoke("train", shards, *TRAIN, "--init", last, "--out", tmp_path / "fine"), f"{last}: damaged")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    _one_line_error(_invoke("train", shards, *TRAIN, "--init", text, "--out", tmp_path / "fine"),
                    f"{text}: not a readable checkpoint")
