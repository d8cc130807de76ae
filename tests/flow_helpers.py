"""Helpers shared by the flow tests (importable as ``flow_helpers``): fast curate parameters, task-run states."""

from __future__ import annotations

from typing import Any

from flows.curate import ModelConfig

# The tiny open_clip tower, one small budget, a 16-d sketch: a whole curate run in seconds.
FAST: dict[str, Any] = {"budgets": [20], "methods": ["skmm_best", "uniform"], "seeds": [0], "sketch_dim": 16,
                        "model": ModelConfig(name="skmm-tiny-vit")}


def task_states(flow_state: Any, settle_s: float = 30.0) -> dict[str, list[str]]:
    """Task name → sorted state names of one flow run's task runs (read from the Prefect server).

    Task-run states reach the server as events, written a moment after the flow returns: read until every task
    run the server knows is final and two reads agree (at most ``settle_s`` seconds)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    deadline, previous = time.monotonic() + settle_s, None
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_filter)
            seen = sorted((str(tr.id), tr.state.name if tr.state else "") for tr in runs)
            final = all(tr.state is not None and tr.state.is_final() for tr in runs)
            if (final and seen == previous) or time.monotonic() > deadline:
                break
            previous = seen
            time.sleep(0.5)
    out: dict[str, list[str]] = {}
    for tr in runs:
        out.setdefault(tr.name.rsplit("-", 1)[0], []).append(tr.state.name)  # run name = "<task name>-<3 hex>"
    return {k: sorted(v) for k, v in out.items()}


def state_names(flow_state: Any) -> list[str]:
    """Every task run's state name in one flow run, sorted."""
    return sorted(s for names in task_states(flow_state).values() for s in names)
