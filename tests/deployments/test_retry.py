"""Prefect-native retry of a failed deployment run, on a real standing server with a real process worker.

A curate deployment carries the test-only fault switch (flows.faults) in its job variables; the fault file names
``evaluate``, so the run fails there. The "operator" deletes the file and runs ``prefect flow-run retry <name>``
(Prefect's own CLI, against the same server); the worker runs the same flow run again. The retry must complete,
serve every stage that ran before the fault from the cache (task runs in state Cached), and lineage must hold both
attempts under the one flow run id: attempt 1 with its FAIL at the fault stage, attempt 2 complete.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from typing import Any
from uuid import UUID

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from server_helpers import (
    REPO,
    RUN_TIMEOUT_S,
    api,
    flow_run_logs,
    prefect_env,
    running,
    wait_done,
    wait_final,
    worker_command,
)

from deployments.curate_nightly import build_deployments, nightly_parameters, register
from flows.curate import ModelConfig
from flows.faults import FAULT_ENV
from skmm.models import TINY_MODEL
from storage.index import LineageIndex
from storage.lineage import EVENTS_PREFIX, event_record, parse_event
from tasks.store import open_store, store_spec

POOL = "skmm-retry"  # a pool of its own: no other test's worker picks these runs up
FAULT_STAGE = "evaluate.uniform.n20.s0"
AFTER_FAULT = {"evaluate", "report"}  # task names that first run on the retry
SETTLE_S = 60  # task-run states reach the server as events, a moment after the flow run's own state


def task_runs(url: str, flow_run_id: UUID, attempt: int, expected: set[str]) -> dict[str, list[str]]:
    """Task name → sorted state names of the flow run's task runs in ``attempt`` (its run count).

    Read until every task run is final, the ``expected`` task names are all there, and two reads agree; states
    are written from events after the flow run is already final, so an early read can miss some."""
    deadline, previous = time.monotonic() + SETTLE_S, None
    with api(url) as client:
        while True:
            runs = [tr for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id]))) if tr.flow_run_run_count == attempt]
            out: dict[str, list[str]] = {}
            for tr in runs:  # run name = "<task name>-<3 hex>"
                out.setdefault(tr.name.rsplit("-", 1)[0], []).append(tr.state.name if tr.state else "")
            out = {name: sorted(states) for name, states in out.items()}
            final = all(tr.state is not None and tr.state.is_final() for tr in runs)
            if (final and expected <= out.keys() and out == previous) or time.monotonic() > deadline:
                return out
            previous = out
            time.sleep(0.5)


def lineage_attempts(store_dir: pathlib.Path, flow_run_id: UUID) -> list[list[dict[str, Any]]]:
    """The store's lineage events of one flow run, as one list of event records per lineage run, in order."""
    st = open_store(store_spec(store_dir))
    records = [event_record(parse_event(st.read_rel(rel), rel)) for rel in st.list_paths(EVENTS_PREFIX)
               if rel.endswith(".json")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["flow_run_id"] == str(flow_run_id):
            runs.setdefault(r["run_id"], []).append(r)
    return sorted((sorted(events, key=lambda e: e["seq"]) for events in runs.values()),
                  key=lambda events: events[0]["event_time"])


def test_a_failed_run_retried_with_the_prefect_cli_reuses_every_stage_before_the_fault(server, tmp_path):
    store_dir, fault = tmp_path / "store", tmp_path / "fault"
    params = nightly_parameters(budgets=[20], methods=["uniform"], seeds=[0], model=ModelConfig(name=TINY_MODEL),
                                sketch_dim=16, store_url=str(store_dir))
    with api(server.api_url) as client:
        # No schedule: only the runs this test triggers, however the clock stands.
        register(build_deployments(params, None, POOL, name="retry", checkout=REPO, env={FAULT_ENV: str(fault)}),
                 POOL)
        deployment = client.read_deployment_by_name("curate/retry")
    assert deployment.job_variables == {"env": {FAULT_ENV: str(fault)}} and deployment.schedules == []

    fault.write_text("evaluate")
    worker_log = tmp_path / "worker.log"
    env = prefect_env(server.root / "retry-worker-home", server.api_url, PREFECT_WORKER_QUERY_SECONDS="1")
    with running(worker_command(POOL), worker_log, env):
        with api(server.api_url):
            triggered = run_deployment("curate/retry", timeout=0, as_subflow=False)
        failed = wait_done(server.api_url, triggered.id, worker_log)
        with api(server.api_url) as client:
            logs = flow_run_logs(client, failed.id, n=200)
        assert failed.state.is_failed(), f"{failed.state!r}\n{logs}"
        assert failed.state.message.endswith(f"InjectedFault: fault injected at evaluate by {FAULT_ENV}={fault}"), (
            f"{failed.state!r}\n{logs}")
        first = task_runs(server.api_url, failed.id, 1, {"finetune-linear-probe"})

        fault.unlink()  # the operator's fix
        cli = subprocess.run([str(pathlib.Path(sys.executable).parent / "prefect"), "flow-run", "retry", failed.name],
                             cwd=REPO, env=prefect_env(server.root / "retry-cli-home", server.api_url), text=True,
                             capture_output=True, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S, check=False)
        assert cli.returncode == 0 and "scheduled for retry" in cli.stdout, cli.stdout + cli.stderr
        retried = wait_final(server.api_url, failed.id, worker_log)
        second = task_runs(server.api_url, failed.id, 2, AFTER_FAULT)

    assert (retried.id, retried.name, retried.run_count) == (failed.id, failed.name, 2)
    # Attempt 1 ran every stage up to the fault (nothing after it), and each completed.
    assert not AFTER_FAULT & first.keys(), first
    assert {"ingest", "embed", "gradients-sketch-lp-run", "select", "finetune-linear-probe"} <= first.keys(), first
    assert all(state == "Completed" for states in first.values() for state in states), first
    # Attempt 2: every one of those stages is served from the cache; the stages after the fault really run.
    before = {name: states for name, states in second.items() if name not in AFTER_FAULT}
    assert before.keys() == first.keys(), (first, second)
    assert all(state == "Cached" for states in before.values() for state in states), second
    assert {name: second.get(name) for name in AFTER_FAULT} == {"evaluate": ["Completed"], "report": ["Completed"]}

    # Lineage: two runs under the one flow run id, the failed attempt first.
    attempts = lineage_attempts(store_dir, failed.id)
    assert len(attempts) == 2, [[(e["stage"], e["event_type"]) for e in events] for events in attempts]
    one, two = attempts
    fails = [(e["stage"], e["error"]) for e in one if e["event_type"] == "FAIL"]
    assert fails == [(FAULT_STAGE, f"InjectedFault: fault injected at evaluate by {FAULT_ENV}={fault}")], fails
    assert "report" not in {e["stage"] for e in one}
    assert not [e for e in two if e["event_type"] == "FAIL"]
    assert ("report", "COMPLETE") in {(e["stage"], e["event_type"]) for e in two}
    assert {e["attempt"] for e in one} == {1} and {e["attempt"] for e in two} == {2}, (
        "lineage records no attempt number", {e["attempt"] for e in one}, {e["attempt"] for e in two})
    # ... and the index links them: the retry names the failed attempt it follows.
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(open_store(store_spec(store_dir)))
    runs = {r["attempt"]: r for r in index.table("runs").to_pylist() if r["flow_run_id"] == str(failed.id)}
    assert (runs[1]["status"], runs[1]["run_id"], runs[1]["previous_attempt"]) == ("failed", one[0]["run_id"], None)
    assert (runs[2]["status"], runs[2]["previous_attempt"]) == ("completed", one[0]["run_id"]), runs
