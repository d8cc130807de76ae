"""Every curate / reselect / reevaluate run writes its result to the store (runs/<run_id>.json), so later runs
start from a run id (or a unique prefix) instead of a saved ``--json`` file: the flows and the CLI."""

from __future__ import annotations

import json
import uuid

import pytest
from flow_helpers import FAST
from typer.testing import CliRunner

from flows.cli import app
from flows.curate import curate
from flows.rerun import reevaluate, reselect
from storage.artifacts import ArtifactRef
from storage.errors import ArtifactNotFoundError
from storage.index import LineageIndex
from storage.runs import read_run_result
from tasks.store import open_store, store_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def first(prefect_server, tmp_path_factory) -> dict:
    """One small curate run (tiny tower, budget 20, uniform) in a store of its own."""
    return curate(**{**FAST, "methods": ["uniform"]}, store_url=str(tmp_path_factory.mktemp("runs") / "store"))


def as_json(result: dict) -> dict:
    return json.loads(json.dumps(result))


def test_curate_then_reselect_and_reevaluate_by_run_id(first, tmp_path):
    st = open_store(store_spec(first["store"]))
    ref = ArtifactRef.from_dict(first["result"])
    assert ref.uri == st.uri(f"runs/{first['run_id']}.json")
    assert read_run_result(st, first["run_id"]) == as_json(first)

    again = reselect(run=first["run_id"], budgets=[20], methods=["skmm"], store_url=first["store"])
    (row,) = again["results"]
    assert (row["method"], row["n"]) == ("skmm", 20) and 0 <= row["accuracy"] <= 1
    assert again["sketch"] == first["sketch"] and read_run_result(st, again["run_id"]) == as_json(again)

    redo = reevaluate(run=first["run_id"][:8], store_url=first["store"])
    assert [r["accuracy"] for r in redo["results"]] == [r["accuracy"] for r in first["results"]]
    assert read_run_result(st, redo["run_id"][:8]) == as_json(redo)

    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(st)
    done = {(s["run_id"], s["stage"], s["status"]) for s in index.table("stages").to_pylist()}
    for run in (first, again, redo):
        assert (run["run_id"], "result", "completed") in done


def test_cli_takes_a_run_id_or_prefix(first):
    picked = runner.invoke(app, ["reselect", first["run_id"], "--store", first["store"], "--budgets", "20",
                                 "--methods", "uniform", "--json"])
    assert picked.exit_code == 0, picked.output
    out = json.loads(picked.stdout)
    assert out["results"][0]["method"] == "uniform" and out["result"]["uri"].endswith(f"runs/{out['run_id']}.json")

    redone = runner.invoke(app, ["reevaluate", first["run_id"][:8], "--store", first["store"]])
    assert redone.exit_code == 0, redone.output
    assert "| uniform |" in redone.stdout and "run id:" in redone.stdout


def test_a_missing_run_id_is_a_one_line_error(first, tmp_path):
    missing = str(uuid.uuid4())
    for command in (["reevaluate", missing], ["reselect", missing[:8], "--budgets", "20"]):
        result = runner.invoke(app, [*command, "--store", first["store"]])
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: no result for run id ") and command[1] in line and first["store"] in line
    neither = runner.invoke(app, ["reevaluate", str(tmp_path / "run.json"), "--store", first["store"]])
    assert neither.exit_code == 2 and "neither a file nor a run id" in neither.stderr
    with pytest.raises(ArtifactNotFoundError, match=missing):
        reevaluate(run=missing, store_url=first["store"])
