"""The lifecycle every writing stage shares: lock, declare, repair, map over shards with a failure cap, manifest.

A stage (``extract-flow``, ``build-rgbf``, ``extract-flow --train-dir``) is its schema, its plan and its per-shard
work; everything around them lives here, once::

    with Stage([Output(out_dir, schema, recorded)], dataset, plan, videos=n, max_failures=0.5) as stage:
        tasks = ...  # planned after the directories are declared and damaged shards set aside
        results = stage.run(work, tasks, desc="build-rgbf", jobs=2)
    stage.warnings, stage.repaired, stage.manifests

Entering takes every output directory's lock (:mod:`pipeline.lock`), declares each directory's identity or checks
that it continues an earlier run of the same configuration (:func:`pipeline.store.prepare_output`), and with
``repair`` rebuilds a damaged ``dataset.json`` from the run's declaration (checked against the shards) and sets
damaged shards aside (:mod:`pipeline.verify`) so the work redoes exactly those. :meth:`Stage.run`
maps the per-shard work with :func:`pipeline.runner.run_tasks` (joblib or dask) and stops the run with
:class:`TooManyFailures` once more videos failed than ``max_failures`` allows; finished shards are kept. Leaving
writes every directory's manifest, also when the run stopped, so a rerun and ``inspect`` see what was done.

The per-shard work must be a picklable, module-level function of its task returning a :class:`ShardResult`; it
skips a complete shard, records a bad video as a failure instead of raising, and writes its shard atomically, so a
killed run loses at most the shards in flight.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pipeline.errors import Asym3dError, ConfigError

if TYPE_CHECKING:  # the CLI imports this module for its defaults: h5py and the runner load when a stage runs
    from pipeline.store import Schema
    from pipeline.verify import Damage

# The default --max-failures: a run in which most videos fail points at a wrong setting, not at a few bad files.
DEFAULT_MAX_FAILURES = 0.5
# build-rgbf's default: no cap. Its own failures (non-finite flow, a damaged input frame) are rare and each is
# recorded; a cap is there for a user who wants one.
BUILD_MAX_FAILURES = 1.0


class TooManyFailures(Asym3dError):
    """More videos failed than ``max_failures`` allows; the run stopped (finished shards are kept)."""


@dataclass(frozen=True)
class Output:
    """One directory a stage writes: its identity (``schema``, compared on resume) and what runs (``recorded``,
    stored, never compared)."""

    root: Path
    schema: Schema
    recorded: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardResult:
    """What one shard's work did. ``failures`` are every failure the finished shard records; ``inherited`` of them
    came with the input (build-rgbf carries extract-flow's) and do not count against this run's failure cap."""

    index: int
    videos_ok: int
    failures: tuple[dict[str, str], ...]
    frames: int  # frames computed in this run (0 when the shard was already complete)
    skipped: bool
    ran: str = ""  # what computed it, for the summary (empty when nothing was computed)
    inherited: int = 0


def failure_limit(max_failures: int | float, videos: int) -> int:
    """The number of failed videos a run may have: an int is a count, a float a fraction (0 to 1) of ``videos``
    (1.0 never stops a run)."""
    if isinstance(max_failures, int) and max_failures >= 0:
        return max_failures
    if isinstance(max_failures, float) and 0 <= max_failures <= 1:  # NaN fails both comparisons
        return math.floor(max_failures * videos)
    raise ConfigError(f"--max-failures must be a count or a fraction from 0 to 1, got {max_failures}")


class Stage:
    """The output directories of one run, locked, declared and (with ``repair``) checked while the block runs."""

    def __init__(self, outputs: Sequence[Output], dataset: dict[str, Any], plan: list[list[str]], *, videos: int,
                 max_failures: int | float = DEFAULT_MAX_FAILURES, overwrite: bool = False,
                 repair: bool = False) -> None:
        self.limit = failure_limit(max_failures, videos)  # checked before any directory is created
        self.videos, self.max_failures = videos, max_failures
        self.outputs, self.dataset, self.plan = list(outputs), dataset, plan
        self.overwrite, self.repair = overwrite, repair
        self.warnings: list[str] = []
        self.repaired: list[Damage] = []
        self.manifests: list[dict[str, Any]] = []
        self._locks = contextlib.ExitStack()

    def __enter__(self) -> "Stage":
        from pipeline.lock import DirectoryLock
        from pipeline.store import prepare_output
        from pipeline.verify import set_aside_damaged

        with contextlib.ExitStack() as undo:
            for out in self.outputs:
                undo.enter_context(DirectoryLock(out.root))
            for out in self.outputs:
                self.warnings += prepare_output(Path(out.root), out.schema, self.dataset, self.plan,
                                                overwrite=self.overwrite, recorded=out.recorded, repair=self.repair)
                if self.repair:
                    self.repaired += set_aside_damaged(Path(out.root))
            self._locks = undo.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from pipeline.store import write_manifest

        with self._locks:
            try:
                self.manifests = [write_manifest(Path(out.root)) for out in self.outputs]
            except Asym3dError:
                if exc is None:
                    raise
                # The run's own error is the one to report: a full disk fails the manifest too, and its message
                # would hide which shard the disk filled on.

    def run(self, work: Callable[[Any], ShardResult], tasks: Sequence[Any], *, desc: str, jobs: int = 1,
            scheduler: str | None = None, progress: bool = True) -> list[ShardResult]:
        """``work(task)`` for every task (completion order); stops with :class:`TooManyFailures` once the failures
        of this stage (not ``inherited`` ones) exceed ``max_failures`` of ``videos``."""
        from pipeline.runner import run_tasks

        failures: list[dict[str, str]] = []

        def stop_on_too_many(result: ShardResult) -> None:
            failures.extend(result.failures[result.inherited:])
            if len(failures) > self.limit:
                raise TooManyFailures(f"{self.outputs[0].root}: stopped after {len(failures)} of {self.videos} "
                                      f"videos failed (--max-failures {self.max_failures:g} allows {self.limit}); "
                                      f"first: "
                                      f"{failures[0]['reason']}")

        return run_tasks(work, tasks, jobs=jobs, scheduler=scheduler, desc=desc, frames_of=lambda r: r.frames,
                         progress=progress, on_result=stop_on_too_many)
