"""Map one per-shard function over tasks, locally with joblib or on a dask.distributed cluster.

Stages never import an executor: they hand ``run_tasks`` a picklable function and its tasks. Results arrive in
completion order and drive one progress bar, so a stage can report videos and frames per second on either backend.

Local worker processes die with the process that started them (:func:`_die_with_parent`): a killed stage must not
leave workers that keep writing into a directory whose lock (:mod:`pipeline.lock`) the next run has taken over.

Security: ``--scheduler`` connects to an existing cluster, which runs whatever tasks its clients send; only point it
at a scheduler you trust, or one secured with TLS (``tls://``). Nothing here opens a listener.

A scheduler that cannot be reached is a :class:`SchedulerError` after ``CONNECT_TIMEOUT_S``; stages call
:func:`check_scheduler` before they write anything, so a typo in the address leaves no output behind.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from pipeline.errors import Asym3dError

# Seconds to wait for a dask scheduler: long enough for a busy one on a slow network, short enough that a wrong
# address is reported while the user still watches (dask's own default is 30 s).
CONNECT_TIMEOUT_S = 10


class SchedulerError(Asym3dError):
    """The dask scheduler given with --scheduler cannot be used."""


def _connect(scheduler: str):
    """A dask Client for ``scheduler``; :class:`SchedulerError` in one line when it cannot be reached."""
    import dask
    from distributed import Client

    if scheduler.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file", None):
        raise SchedulerError(f"--scheduler {scheduler}: tls:// needs dask's TLS configuration (distributed.comm.tls:"
                             " ca-file, client.cert, client.key), e.g. in ~/.config/dask/distributed.yaml")
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except ValueError as exc:  # an unknown address scheme
        raise SchedulerError(f"--scheduler {scheduler}: {exc}") from None
    except OSError as exc:  # refused, unreachable, timed out
        raise SchedulerError(f"--scheduler {scheduler}: cannot connect ({exc})") from None


def check_scheduler(scheduler: str | None) -> None:
    """Connect to ``scheduler`` once and disconnect; raises :class:`SchedulerError` when that fails."""
    if scheduler:
        _connect(scheduler).close()


_guarded_parent: int | None = None  # the parent this worker process already watches


def _die_with_parent(parent: int, fn: Callable[[Any], Any], task: Any) -> Any:
    """Run ``fn(task)`` in a joblib worker that exits as soon as ``parent`` (the stage's process) is gone.

    A thread polls the parent id: Linux re-parents an orphan, so a changed ``getppid()`` means the stage died (also
    by ``kill -9``, which no handler sees). Polling rather than ``PR_SET_PDEATHSIG`` because that signal follows the
    parent *thread*, and joblib starts workers from helper threads.
    """
    exit_with_parent(parent)
    return fn(task)


def exit_with_parent(parent: int) -> None:
    """Make this worker process exit as soon as ``parent`` is gone (once per process; see :func:`_die_with_parent`).
    Also the initializer of the pools a stage's worker starts itself (pipeline.extract's encode pool)."""
    global _guarded_parent
    if os.getppid() == parent and _guarded_parent != parent:
        _guarded_parent = parent

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.2)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _iter_results(fn: Callable[[Any], Any], tasks: Sequence[Any], jobs: int, scheduler: str | None) -> Iterator[Any]:
    if scheduler:
        from distributed import as_completed

        with _connect(scheduler) as client:
            futures = [client.submit(fn, task, pure=False) for task in tasks]
            for future in as_completed(futures):
                yield future.result()
        return
    if jobs == 1:
        for task in tasks:
            yield fn(task)
        return
    from joblib import Parallel, delayed

    guarded = functools.partial(_die_with_parent, os.getpid(), fn)
    yield from Parallel(n_jobs=jobs, return_as="generator_unordered")(delayed(guarded)(task) for task in tasks)


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, jobs: int = 1, scheduler: str | None = None,
              desc: str = "", unit: str = "shard", frames_of: Callable[[Any], int] | None = None,
              progress: bool = True, on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Run ``fn(task)`` for every task; return the results (completion order) after all have finished.

    ``frames_of(result)`` lets the progress bar show frames per second beside the task count. ``on_result(result)``
    sees each result as it arrives; an exception it raises stops the run (tasks not started are dropped).
    """
    results = []
    frames = 0
    start = time.perf_counter()
    with tqdm(total=len(tasks), desc=desc, unit=unit, disable=not progress or not tasks) as bar:
        for result in _iter_results(fn, tasks, jobs, scheduler):
            results.append(result)
            if frames_of is not None:
                frames += frames_of(result)
                bar.set_postfix(frames_per_s=f"{frames / max(time.perf_counter() - start, 1e-9):.1f}")
            bar.update(1)
            if on_result is not None:
                on_result(result)
    return results
