"""What a training run directory is, for every command that takes one (evaluate, and any later one).

``asym3d train`` writes two layouts, both described by ``run.json``:

- one split (``--split N``, or the library's :func:`model.train.train`): ``RUN/run.json`` whose ``config.split``
  is N, with ``RUN/best.pt`` and ``RUN/last.pt``;
- several (``--splits 1,2,3``): ``RUN/splitN/`` per split, each such a one-split run.

:func:`split_dir` maps (run, split) to the directory holding that split's checkpoints, so no command has to tell the
layouts apart. A run also records its shards by absolute path and identity (:func:`model.data.shard_identity`):
every command that reads a run's shards checks them with :func:`model.data.check_shard_identity`, which refuses
other shards in one line saying where the run expected them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import Asym3dError
from pipeline.store import read_json

RUN_FILE = "run.json"


class RunError(Asym3dError):
    """A run directory that does not hold what was asked of it (another split, no run at all)."""


def run_info(run_dir: Path) -> dict[str, Any] | None:
    """``RUN/run.json`` as written by the trainer, or None when the directory has none (a multi-split run's top)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise RunError(f"{path}: not a run description (no config in it)")
    return info


def split_dir(run_dir: Path, split: int) -> Path:
    """The directory of ``run_dir`` that holds split ``split``'s checkpoints, in either layout train writes."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    if info is not None:
        trained = info["config"].get("split")
        if trained != split:
            raise RunError(f"{run_dir}: a run of split {trained} only ({RUN_FILE}); it holds no split {split}")
        return run_dir
    return run_dir / f"split{split}"
