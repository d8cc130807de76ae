"""The ``skmm`` command line: the synthetic benchmark end to end, clear one-line errors for bad options and
failing flows (tracebacks only with --debug, and in Prefect's run logs), and ``skmm store gc``."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
import uuid

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_bench_synthetic_small_run(tmp_path):
    out = tmp_path / "syn"
    result = runner.invoke(app, ["bench", "synthetic", "--n-samples", "150", "--dim", "40", "--sketch-dim", "8",
                                 "--seeds", "2", "--budgets", "12,24", "--methods", "skmm_best,uniform",
                                 "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| skmm_best |" in result.stdout and "| uniform |" in result.stdout
    assert "| skmm_best_val |" in result.stdout  # the pipeline's variant rule, beside the label-free proxy
    assert "Full-data ridge risk" in result.stdout
    assert {p.name for p in out.iterdir()} == {"runs.csv", "summary.csv", "table.md", "risk_vs_n.png"}


def test_bench_synthetic_bad_options(tmp_path):
    bad_budget = runner.invoke(app, ["bench", "synthetic", "--budgets", "12,x", "--out", str(tmp_path)])
    assert bad_budget.exit_code != 0 and "comma-separated integers" in bad_budget.output
    bad_method = runner.invoke(app, ["bench", "synthetic", "--methods", "nope", "--out", str(tmp_path)])
    assert bad_method.exit_code != 0 and "unknown method" in bad_method.output
    too_big = runner.invoke(app, ["bench", "synthetic", "--n-samples", "50", "--dim", "20", "--budgets", "60",
                                  "--methods", "uniform", "--out", str(tmp_path)])
    assert too_big.exit_code == 2 and "larger than the pool" in too_big.output
    assert not any(tmp_path.iterdir())  # nothing half-written on failure


def test_curate_command_on_digits(prefect_server, tmp_path):
    store = tmp_path / "store"
    result = runner.invoke(app, ["curate", "digits", "--model", "skmm-tiny-vit", "--budgets", "20",
                                 "--methods", "skmm,uniform", "--sketch-dim", "16", "--store", str(store),
                                 "--progress"])
    assert result.exit_code == 0, result.output
    assert "embed skmm-tiny-vit" in result.stderr  # the embedding progress bar
    assert "| skmm |" in result.stdout and "| uniform |" in result.stdout
    assert "run id:" in result.stdout and f"file://{store}" in result.stdout
    assert f"result:      file://{store}/runs/" in result.stdout
    assert (store / "objects" / "model").is_dir() and (store / "lineage" / "events").is_dir()
    assert "selection file://" not in result.stdout and "model     file://" not in result.stdout  # quiet by default
    assert "models:      2 (paths: --verbose, or --json)" in result.stdout


def test_curate_is_quiet_unless_verbose(prefect_server, tmp_path):
    """Prefect's default logging, as a user sees it: the table, the choices, the run id and the report location;
    no per-task log lines and no per-model paths. --verbose brings both back."""
    args = ("curate", "digits", "--model", "skmm-tiny-vit", "--budgets", "20", "--methods", "skmm_best,uniform",
            "--seeds", "0,1", "--sketch-dim", "16", "--store", str(tmp_path / "s"))
    quiet = run_cli(*args, tmp_path=tmp_path, log_level=None)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = quiet.stdout.splitlines()
    assert out[:6] == ["**accuracy** on the test split (mean ± std over seeds)", "", "| method | n=20 |", "|---|---|",
                       out[4], out[5]] and out[4].startswith("| skmm_best |") and out[5].startswith("| uniform |")
    assert any(line.startswith("skmm_best kept (chosen on the val split): n=20: ") for line in out)
    for label in ("run id:", "report:", "plot:", "result:"):
        assert sum(line.startswith(label) for line in out) == 1, quiet.stdout
    assert len(out) <= 16 and " selection file://" not in quiet.stdout, quiet.stdout  # no path per selection/model
    assert " model     file://" not in quiet.stdout
    assert "Beginning flow run" in quiet.stderr and "View at" in quiet.stderr  # the flow run's lines stay
    assert "Task run '" not in quiet.stderr, quiet.stderr[-3000:]

    verbose = run_cli(*args, "--verbose", tmp_path=tmp_path, log_level=None)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert verbose.stdout.count(" selection file://") == 4 and verbose.stdout.count(" model     file://") == 4
    assert "Task run '" in verbose.stderr


def run_cli(*args: str, tmp_path, log_level: str | None = "CRITICAL") -> subprocess.CompletedProcess:
    """The real ``skmm`` console script in a subprocess, talking to the session's Prefect test server
    (``log_level`` None: Prefect's default logging, as a user sees it)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_LOGGING_LEVEL", "SKMM_DEBUG")}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    if log_level:
        env["PREFECT_LOGGING_LEVEL"] = log_level
    return subprocess.run([str(pathlib.Path(sys.executable).with_name("skmm")), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


def test_curate_command_bad_input_is_one_line(prefect_server, tmp_path):
    missing = runner.invoke(app, ["curate", str(tmp_path / "nope"), "--store", str(tmp_path / "s")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, expected in (([str(empty)], "is empty"),
                           (["digits", "--budgets", "99999", "--methods", "uniform"], "larger than the pool")):
        proc = run_cli("curate", *args, "--model", "skmm-tiny-vit", "--store", str(tmp_path / "s"),
                       tmp_path=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", ","], r"--seeds lists nothing \(got ','\); give at least one value, comma-separated"),
    (["--seeds", "abc"], r"--seeds must be comma-separated integers; got 'abc'"),
    (["--seeds", "0,-1"], r"--seeds must be non-negative integers; got '0,-1'"),
    (["--methods", ","], r"--methods lists nothing \(got ','\); give at least one value, comma-separated"),
    (["--methods", " , "], r"--methods lists nothing .*"),
    (["--budgets", ","], r"--budgets lists nothing .*"),
    (["--budgets", "0"], r"--budgets must be positive integers; got '0'"),
])
@pytest.mark.parametrize("command", ["curate", "reselect"])
def test_list_options_fail_in_one_line_naming_the_option(tmp_path, command, args, message):
    """Checked before any flow starts: exit 2, one line that names the option (no IndexError, no empty report)."""
    run = [] if command == "curate" else [str(tmp_path / "run.json")]
    result = runner.invoke(app, [command, *run, *args, "--store", str(tmp_path / "s")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert re.fullmatch(f"error: {message}\n", result.stderr), result.stderr
    assert not (tmp_path / "s").exists()


def _flow_run_logs(store: pathlib.Path) -> str:
    """Everything the store's (one) flow run logged to the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from storage.lineage import EVENTS_PREFIX, event_record, parse_event
    from tasks.store import open_store, store_spec

    st = open_store(store_spec(store))
    (flow_run_id,) = {event_record(parse_event(st.read_rel(r), r))["flow_run_id"]
                      for r in st.list_paths(EVENTS_PREFIX)}
    with get_client(sync_client=True) as client:
        for _ in range(30):  # logs reach the server in batches, a moment after the run
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any("Traceback" in log.message for log in logs):
                break
            time.sleep(1)
    return "\n".join(log.message for log in logs)


def test_a_failing_flow_prints_one_line_and_keeps_the_traceback_in_prefect(prefect_server, tmp_path):
    """Prefect's default logging, a task failing inside the flow: stderr has Prefect's progress lines and our one
    error line, nothing traceback-like; the run's logs on the server still have the traceback."""
    store = tmp_path / "s"
    proc = run_cli("curate", "digits", "--budgets", "99999", "--methods", "uniform", "--model", "skmm-tiny-vit",
                   "--sketch-dim", "8", "--store", str(store), tmp_path=tmp_path, log_level=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and "budget n=99999 is larger than the pool" in errors[0], proc.stderr[-3000:]
    assert "Beginning flow run" in proc.stderr  # Prefect's console output is still there...
    for noise in ("Traceback", 'File "', "| ERROR"):  # ...without the run's errors
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" in _flow_run_logs(store)


def test_debug_shows_the_tracebacks(prefect_server, tmp_path):
    proc = run_cli("--debug", "curate", "digits", "--model", "no-such-model", "--store", str(tmp_path / "s"),
                   tmp_path=tmp_path, log_level=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown open_clip model 'no-such-model'")
    assert proc.stderr.count("Traceback") >= 2 and "| ERROR" in proc.stderr  # Prefect's and skmm's


def test_store_gc_removes_old_staging_files_only(tmp_path):
    store = tmp_path / "store"
    ref_dir = store / "objects" / "blob"
    ref_dir.mkdir(parents=True)
    (ref_dir / ("0" * 64)).write_bytes(b"published")
    (store / "tmp").mkdir()
    old, fresh = store / "tmp" / f".{uuid.uuid4().hex}-killed", store / "tmp" / f".{uuid.uuid4().hex}-live"
    old.write_bytes(b"x" * 30)
    fresh.write_bytes(b"y" * 10)
    then = time.time() - 25 * 3600
    os.utime(old, (then, then))

    dry = runner.invoke(app, ["store", "gc", "--store", str(store), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would remove {old}  (30 bytes, 25.0 h old)" in dry.stdout and str(fresh) not in dry.stdout
    assert "would remove 1 staging leftover(s), 30 bytes, older than 24 h" in dry.stdout and old.exists()
    done = runner.invoke(app, ["store", "gc", "--store", str(store)])
    assert done.exit_code == 0 and "removed 1 staging leftover(s), 30 bytes" in done.stdout, done.output
    assert not old.exists() and fresh.exists() and (ref_dir / ("0" * 64)).read_bytes() == b"published"
    young = runner.invoke(app, ["store", "gc", "--store", str(store), "--older-than", "0"])
    assert young.exit_code == 0 and not fresh.exists(), young.output  # --older-than 0: everything staged
    missing = runner.invoke(app, ["store", "gc", "--store", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and missing.stderr == f"error: store {tmp_path / 'nope'} does not exist; check " \
        "--store\n", missing.stderr
    assert not (tmp_path / "nope").exists()
