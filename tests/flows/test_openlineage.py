"""A real curate run (digits, the tiny tower) sends its lineage to an OpenLineage backend — here a loopback HTTP
receiver standing in for Marquez: the events parse back through the openlineage-python client's classes, and
every artifact the run used is one of their input or output datasets, named by the OpenLineage convention."""

from __future__ import annotations

import pytest
from flow_helpers import FAST
from lineage_receiver import Receiver, no_openlineage_config
from openlineage.client.event_v2 import InputDataset, OutputDataset, RunEvent, RunState

from flows.curate import curate
from storage.lineage import EVENTS_PREFIX, dataset_naming, event_record, openlineage_event, parse_event
from tasks.store import open_store, store_spec


@pytest.fixture(autouse=True)
def _clean_env(tmp_path, monkeypatch):
    with no_openlineage_config(tmp_path, monkeypatch):
        yield


def test_curate_run_emits_openlineage_for_every_artifact(prefect_server, tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    with Receiver() as rx:
        monkeypatch.setenv("OPENLINEAGE_URL", rx.url)
        result = curate(**FAST, store_url=str(store_dir))
    st = open_store(store_spec(store_dir))
    stored = [event_record(parse_event(st.read_rel(r), r)) for r in st.list_paths(EVENTS_PREFIX)]
    assert {r["run_id"] for r in stored} == {result["run_id"]}
    assert {r["attempt"] for r in stored} == {1}  # Prefect's run count: the first try

    received = [body for path, body in rx.events if path == "/api/v1/lineage"]
    assert len(received) == len(rx.events) == len(stored)
    events = [openlineage_event(body) for body in received]  # through the client's classes
    assert all(isinstance(e, RunEvent) for e in events)
    assert {e.eventType for e in events} == {RunState.START, RunState.COMPLETE}
    assert {e.run.facets["parent"].run.runId for e in events} == {result["run_id"]}
    by_stage_run: dict[str, set] = {}
    for e in events:  # START and COMPLETE of one stage execution share its runId
        by_stage_run.setdefault(e.run.runId, set()).add((e.job.name, e.eventType))
    assert all(len(v) == 2 and len({name for name, _ in v}) == 1 for v in by_stage_run.values()), by_stage_run

    datasets = {(d.namespace, d.name) for e in events for d in [*e.inputs, *e.outputs]}
    assert all(isinstance(d, InputDataset) for e in events for d in e.inputs)
    assert all(isinstance(d, OutputDataset) for e in events for d in e.outputs)
    used = {ref for r in stored for ref in [*r["inputs"], *r["outputs"], r["selection"], r["model"]] if ref}
    kinds = {ref.kind for ref in used}
    assert {"dataset", "embeddings", "sketch", "selection", "model", "report"} <= kinds, kinds
    for ref in used:  # every artifact the run used, under its OpenLineage name
        namespace, name = dataset_naming(ref.uri)
        assert namespace == "file" and name == str(store_dir / ref.uri.split(str(store_dir) + "/", 1)[1])
        assert (namespace, name) in datasets, ref
    for e in events:
        for d in [*e.inputs, *e.outputs]:
            facet = d.facets["skmm_artifact"]
            assert dataset_naming(facet.uri) == (d.namespace, d.name) and d.facets["version"].datasetVersion == (
                facet.sha256)
