"""Map one per-shard function over tasks, locally with joblib or on a dask.distributed cluster.

Stages never import an executor: they hand ``run_tasks`` a picklable function and its tasks. Results arrive in
completion order and drive one progress bar, so a stage can report videos and frames per second on either backend.

Security: ``--scheduler`` connects to an existing cluster, which runs whatever tasks its clients send; only point it
at a scheduler you trust, or one secured with TLS (``tls://``). Nothing here opens a listener.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm


def _iter_results(fn: Callable[[Any], Any], tasks: Sequence[Any], jobs: int, scheduler: str | None) -> Iterator[Any]:
    if scheduler:
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = [client.submit(fn, task, pure=False) for task in tasks]
            for future in as_completed(futures):
                yield future.result()
        return
    if jobs == 1:
        for task in tasks:
            yield fn(task)
        return
    from joblib import Parallel, delayed

    yield from Parallel(n_jobs=jobs, return_as="generator_unordered")(delayed(fn)(task) for task in tasks)


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, jobs: int = 1, scheduler: str | None = None,
              desc: str = "", unit: str = "shard", frames_of: Callable[[Any], int] | None = None,
              progress: bool = True) -> list[Any]:
    """Run ``fn(task)`` for every task; return the results (completion order) after all have finished.

    ``frames_of(result)`` lets the progress bar show frames per second beside the task count.
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
    return results
