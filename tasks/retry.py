"""Retry only what a retry can fix: transient I/O (unreachable store, connection resets, timeouts)."""

from __future__ import annotations

from typing import Any

from storage.errors import StorageError

__all__ = ["RETRY", "is_transient", "retry_transient"]


def is_transient(exc: BaseException | None) -> bool:
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


RETRY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [1, 5], "retry_condition_fn": retry_transient}
