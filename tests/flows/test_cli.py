"""The ``skmm`` command line: the synthetic benchmark end to end, and clear errors for bad options."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

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


def run_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    """The real ``skmm`` console script in a subprocess, talking to the session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "CRITICAL"}
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
