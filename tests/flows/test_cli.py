"""The ``skmm`` command line: the synthetic benchmark end to end, and clear errors for bad options."""

from __future__ import annotations

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
