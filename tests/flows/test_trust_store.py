"""A local store is trusted no more than a shared bucket, through the real flows and the ``skmm`` command line:
a pickle planted as a cached result never runs, and a damaged model or selection is never hidden behind a cache
hit or an audit answer (the errors name the damaged object and what to do)."""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator

import pytest
from flow_helpers import FAST
from typer.testing import CliRunner

from flows.cli import app
from flows.curate import curate
from storage.runs import read_run_result
from tasks.store import open_store, store_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def first(prefect_server, tmp_path_factory) -> dict:
    """One small curate run (tiny tower, budget 20, uniform) in a local store of its own."""
    return curate(**{**FAST, "methods": ["uniform"]}, store_url=str(tmp_path_factory.mktemp("trust") / "store"))


def _local(uri: str) -> pathlib.Path:
    return pathlib.Path(uri.removeprefix("file://"))


@contextlib.contextmanager
def _flipped(uri: str) -> Iterator[None]:
    """One byte of the object flipped (same size: only its hash tells) for the block, then restored."""
    path = _local(uri)
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def _error_line(output: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith("error: ")]
    return line


class _Planted:
    """Unpickling this writes a marker file: proof that a planted record's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_planted_in_a_local_store_never_run(first, tmp_path):
    from prefect.results import ResultStore
    from prefect.serializers import PickleSerializer

    marker = tmp_path / "code-ran"
    planted = ResultStore(serializer=PickleSerializer()).create_result_record(_Planted(str(marker)), key="k")
    records = [p for p in (_local(first["store"]) / "prefect-results").iterdir() if not p.name.startswith(".")]
    assert records
    for record in records:
        record.write_bytes(planted.serialize())

    redone = runner.invoke(app, ["reevaluate", first["run_id"], "--store", first["store"], "--json"])
    assert redone.exit_code == 0, redone.output
    assert not marker.exists()
    out = json.loads(redone.stdout)
    metrics = [(r["accuracy"], r["macro_f1"]) for r in out["results"]]
    assert metrics == [(r["accuracy"], r["macro_f1"]) for r in first["results"]]
    stored = read_run_result(open_store(store_spec(first["store"])), out["run_id"])
    assert [(r["accuracy"], r["macro_f1"]) for r in stored["results"]] == metrics


def test_a_damaged_model_is_never_reevaluated_from_the_cache(first):
    model = first["results"][0]["model"]["uri"]
    with _flipped(model):
        redone = runner.invoke(app, ["reevaluate", first["run_id"], "--store", first["store"]])
        assert redone.exit_code == 2, redone.output
        line = _error_line(redone.output)
        assert model in line and "corrupted" in line and "delete that object, then rerun" in line
    again = runner.invoke(app, ["reevaluate", first["run_id"], "--store", first["store"], "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["results"][0]["accuracy"] == first["results"][0]["accuracy"]


def test_a_damaged_selection_never_yields_sample_ids(first):
    selection, model = first["results"][0]["selection"]["uri"], first["results"][0]["model"]["sha256"]
    lineage = ["--store", first["store"]]
    with _flipped(selection):
        rebuilt = runner.invoke(app, ["lineage", "rebuild", *lineage])
        assert rebuilt.exit_code == 0, rebuilt.output
        assert f"warning: selection {selection} cannot be used (sha256 mismatch)" in rebuilt.output
        answer = runner.invoke(app, ["lineage", "samples-of-model", model, "--json", *lineage])
        assert answer.exit_code == 2 and not answer.stdout.strip()
        line = _error_line(answer.output)
        assert selection in line and "corrupted" in line and "no model" not in line

    assert runner.invoke(app, ["lineage", "rebuild", *lineage]).exit_code == 0
    answer = runner.invoke(app, ["lineage", "samples-of-model", model, "--json", *lineage])
    assert answer.exit_code == 0, answer.output
    assert len(json.loads(answer.stdout)) == first["results"][0]["n"]
