"""A real standing Prefect server and its processes, for the deployment tests (importable as ``server_helpers``).

``prefect server start`` on a free loopback port with its own PREFECT_HOME and SQLite file (not the test
harness, whose temporary server never fires schedules); workers and other Prefect processes run in their own
process group and are stopped, with the flow runs they spawned, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from helpers import free_port
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVER_START_S = 180  # ~15 s idle here; much more while other suites load the 2 cores
RUN_TIMEOUT_S = 300  # a first digits run through a worker: ~60 s idle here


@dataclass(frozen=True)
class Server:
    api_url: str
    root: pathlib.Path  # per-module folder: server home and database, client homes


def prefect_env(home: pathlib.Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a Prefect subprocess: its own PREFECT_HOME, offline, talking to ``api_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def tail(log: pathlib.Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else ["<no log>"]
    return f"--- {log.name} (last {n} lines) ---\n" + "\n".join(lines[-n:])


def stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process group we started (Prefect shuts down gracefully), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def running(cmd: list[str], log: pathlib.Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in the checkout (output to ``log``) in a new process group; always stop it on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def wait_healthy(api_url: str, proc: subprocess.Popen, log: pathlib.Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}\n{tail(log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {SERVER_START_S} s\n{tail(log)}")


@contextlib.contextmanager
def standing_server(root: pathlib.Path) -> Iterator[Server]:
    """``prefect server start`` on a free loopback port, with its home and SQLite database under ``root``."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(root / "server-home", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                      PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}")
    log = root / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with running(cmd, log, env) as proc:
        wait_healthy(api_url, proc, log)
        yield Server(api_url, root)


def worker_command(pool: str, name: str = "test-worker") -> list[str]:
    """A real process worker on ``pool`` (run it with :func:`running`; env: PREFECT_WORKER_QUERY_SECONDS=1)."""
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name]


@contextlib.contextmanager
def api(url: str) -> Iterator[Any]:
    """A sync client of the module's server (settings scoped to the block, so no harness is involved)."""
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def flow_run_logs(client: Any, flow_run_id: UUID, n: int = 40) -> str:
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(x.message for x in logs[-n:])


def wait_done(url: str, flow_run_id: UUID, log: pathlib.Path) -> FlowRun:
    """Poll a flow run until it is final (whatever the state); fail with ``log`` if it is not in time."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with api(url) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} not final after {RUN_TIMEOUT_S} s\n{tail(log)}")


def wait_final(url: str, flow_run_id: UUID, log: pathlib.Path) -> FlowRun:
    """:func:`wait_done`, and fail with the run's logs and the executing process's log unless it Completed."""
    run = wait_done(url, flow_run_id, log)
    if not run.state.is_completed():
        with api(url) as client:
            pytest.fail(f"{run.state!r}\n{flow_run_logs(client, run.id)}\n{tail(log)}")
    return run
