"""Which failures a pipeline task retries (transient I/O) and which fail at once (bad input, corrupt data, bugs),
through a real Prefect task with the pipeline's RETRY settings."""

from __future__ import annotations

import pytest
from prefect import flow, task

from storage.errors import (
    ArtifactCorruptedError,
    ArtifactNotFoundError,
    MalformedRecordError,
    StorageError,
    StoreUnavailableError,
)
from tasks.retry import RETRY, is_transient

ERRORS = {
    "transient storage error": StorageError("connection reset while reading x", transient=True),
    "unreachable store": StoreUnavailableError("cannot reach the store for s3://b/x (ReadTimeoutError)",
                                               transient=True),
    "connection error": ConnectionResetError("reset by peer"),
    "timeout": TimeoutError("timed out"),
    "bad input": ValueError("budget n=5000 is larger than the pool"),
    "corrupt artifact": ArtifactCorruptedError("artifact s3://b/x is corrupted"),
    "missing artifact": ArtifactNotFoundError("not found: artifact s3://b/x"),
    "malformed record": MalformedRecordError("malformed lineage record"),
    "missing bucket": StoreUnavailableError("bucket does not exist for s3://b/x"),
    "bug": KeyError("oops"),
}
RETRIED = {"transient storage error", "unreachable store", "connection error", "timeout"}

attempts: list[str] = []


@task(name="fails-once", **RETRY)
def fails_once(kind: str) -> str:
    attempts.append(kind)
    if len(attempts) == 1:
        raise ERRORS[kind]
    return "ok"


@flow(name="retry-check")
def run_once(kind: str) -> tuple[str, object]:
    state = fails_once.with_options(retry_delay_seconds=0)(kind, return_state=True)
    return state.type.value, state.result(raise_on_failure=False)


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_only_transient_failures_are_retried(prefect_api, kind):
    attempts.clear()
    state, outcome = run_once(kind)
    assert is_transient(ERRORS[kind]) == (kind in RETRIED)
    if kind in RETRIED:
        assert (state, outcome, len(attempts)) == ("COMPLETED", "ok", 2)
    else:
        assert (state, type(outcome), len(attempts)) == ("FAILED", type(ERRORS[kind]), 1)

