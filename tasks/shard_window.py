"""How many shard tasks a stage keeps in flight: a window over its submissions.

Prefect's default task runner, the ``ThreadPoolTaskRunner``, has no bound (``sys.maxsize`` threads), so a stage
that submitted one task per shard ran every shard at once: a 10^6-image pool in 2 048-row shards would be ~490
concurrent embed calls, each holding its shard's images and forking its own workers (cores − 1 decode workers
each), and ~490 FT models sizing their batches against the same free device memory. The stages now submit through
:func:`submit_windowed`: at most :func:`shard_task_window` tasks in flight, the next submitted as soon as one
finishes. On a thread-pool runner the default is 2, because every embed or FT task already uses all of the
machine's cores (the process's shared block or decode workers, torch threads) or its device, and a second
overlaps one task's reads and writes with the other's compute; more did not help (bench/README.md §13, "A
bounded window of shard tasks": 8 shards of 512 JPEGs on 2 cores took 0.55–0.57× the memory of all at once,
and 1.07× the time; three to eight in flight, the same time). On other runners (Dask) the cluster's worker
threads bound the concurrency, so there is no window by default. ``$SKMM_SHARD_TASKS`` sets it for any runner.

The window never changes a result: the futures come back in submission order, and each task's inputs and cache
key are what they were. A task that fails stops further submissions and its error is raised; tasks already in
flight finish (they write whole artifacts or nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["DEFAULT_SHARD_TASKS", "SHARD_TASKS_ENV", "shard_task_window", "submit_windowed"]

SHARD_TASKS_ENV = "SKMM_SHARD_TASKS"
DEFAULT_SHARD_TASKS = 2

T = TypeVar("T")


def shard_task_window(runner: Any = None, environ: Mapping[str, str] | None = None) -> int | None:
    """Shard tasks in flight at a time on ``runner`` (default: the current flow run's task runner):
    ``$SKMM_SHARD_TASKS`` (a positive integer) on any runner; else :data:`DEFAULT_SHARD_TASKS` on Prefect's
    thread pool and None (no bound) on other runners, whose workers bound it."""
    env = os.environ if environ is None else environ
    text = (env.get(SHARD_TASKS_ENV) or "").strip()
    if text:
        try:
            window = int(text)
        except ValueError:
            window = 0
        if window < 1:
            raise ValueError(f"${SHARD_TASKS_ENV} must be a positive integer (shard tasks in flight at a time); "
                             f"got {text!r}")
        return window
    from prefect.task_runners import ThreadPoolTaskRunner

    if runner is None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        runner = context.task_runner if context is not None else None
    return DEFAULT_SHARD_TASKS if runner is None or isinstance(runner, ThreadPoolTaskRunner) else None


def submit_windowed(submit: Callable[[T], Any], items: Iterable[T], window: int | None) -> list[Any]:
    """``submit(item)`` for each item (a Prefect task submission: it returns a future), with at most ``window``
    futures unfinished at a time (None: no bound); the futures in submission order. Returns once every item is
    submitted, so up to ``window`` of them may still be running. A future that ends in failure before the last
    submission raises its error at once, and nothing more is submitted."""
    from prefect.futures import as_completed

    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None; got {window!r}")
    futures: list[Any] = []
    unfinished: list[Any] = []
    for item in items:
        if window is not None and len(unfinished) >= window:
            done = next(iter(as_completed(unfinished)))  # done callbacks: no polling of the API
            done.wait()  # already finished: records its final state locally
            unfinished.remove(done)
            if not done.state.is_completed():  # failed or crashed (a cache hit is a completed state)
                done.result()  # raises the task's error
        future = submit(item)
        futures.append(future)
        unfinished.append(future)
    return futures
