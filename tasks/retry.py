"""Retry only what a retry can fix: transient I/O (unreachable store, connection resets, timeouts).

Every store request already has its own attempts (see :class:`tasks.store.StoreTimeouts`), so a task is retried
once, 2 s later: together they bound how long a stage takes to fail against a frozen endpoint
(:func:`stage_bound_s`, under two minutes with the default limits).
"""

from __future__ import annotations

from typing import Any

from storage.errors import StorageError

__all__ = ["RETRY", "is_transient", "retry_transient", "stage_bound_s"]


def is_transient(exc: BaseException | None) -> bool:
    """True for errors a retry can fix: StorageErrors marked transient, ConnectionError, TimeoutError."""
    if isinstance(exc, StorageError):
        return exc.transient
    return isinstance(exc, ConnectionError | TimeoutError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: bad input, corrupt data and bugs fail at once; I/O hiccups retry."""
    try:
        state.result()
    except BaseException as exc:  # classify, never swallow: the state already holds it
        return is_transient(exc)
    return False


RETRY: dict[str, Any] = {"retries": 1, "retry_delay_seconds": [2], "retry_condition_fn": retry_transient}


def stage_bound_s(request_s: float | None = None) -> float:
    """Worst case (seconds) before a stage fails against a frozen object store, given the bound of one store
    request (default: :meth:`tasks.store.StoreTimeouts.request_bound_s` from the environment).

    Each task attempt probes the cache (one request: reading the result record) and then fails on its first
    store request; attempts are separated by RETRY's delays; then the flow records the stage's FAIL event (one
    more request). The time to compute a stage's result is not included."""
    if request_s is None:
        from tasks.store import StoreTimeouts

        request_s = StoreTimeouts.from_env().request_bound_s()
    delays = RETRY["retry_delay_seconds"]
    waits = [delays] * RETRY["retries"] if isinstance(delays, int | float) else list(delays)[:RETRY["retries"]]
    return (RETRY["retries"] + 1) * 2 * request_s + sum(waits) + request_s
