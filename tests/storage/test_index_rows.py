"""Lineage events → index rows, without DuckDB: real recorded events, parsed back, through the pure function."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pyarrow as pa

from storage.artifacts import ArtifactStore
from storage.datasets import write_samples
from storage.index_rows import (
    DANGLING_SCHEMA,
    DATASETS_SCHEMA,
    EVENTS_SCHEMA,
    IO_SCHEMA,
    METRICS_SCHEMA,
    MODELS_SCHEMA,
    SELECTION_DATASETS_SCHEMA,
    dataset_links,
    dataset_row,
    index_rows,
)
from storage.lineage import EVENTS_PREFIX, LineageRecorder, event_record, parse_event
from storage.selections import write_selection


def _ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _records(store: ArtifactStore) -> list[tuple[str, dict]]:
    out = []
    for rel in store.list_paths(EVENTS_PREFIX):
        uri = store.uri(rel)
        out.append((uri, event_record(parse_event(store.read_rel(rel), uri))))
    return out


def _pipeline(store: ArtifactStore) -> dict:
    """ingest → embed → sketch → two candidate selections → the chosen one → train (metrics)."""
    dataset = write_samples(store, [{"data": f"img{i}".encode(), "source_uri": f"file:///pool/{i}.png",
                                     "label": str(i % 2), "split": "train"} for i in range(6)])
    rec = LineageRecorder(store, flow_run_id="flow-1", git_commit="c" * 40, config={"x": 1})
    with rec.stage("ingest"):
        rec.complete("ingest", [dataset.manifest], metrics={"samples": 6, "source": "pool"})
    with rec.stage("embed", [dataset.manifest]):
        emb = store.put_bytes(b"embeddings", "embeddings", ".parquet")
        rec.complete("embed", [emb])
    with rec.stage("sketch", [emb]):
        sketch = store.put_bytes(b"sketch", "sketch", ".parquet")
        rec.complete("sketch", [sketch])
    ids = _ids(4)
    cands = []
    for tag in ("a", "b"):
        with rec.stage(f"select.{tag}", [sketch]):
            cands.append(write_selection(store, ids[:3] if tag == "a" else ids[1:], method=tag))
            rec.complete(f"select.{tag}", selection=cands[-1])
    with rec.stage("select", cands):
        rec.complete("select", selection=cands[1], metrics={"chosen": "b"})
    with rec.stage("train", [cands[1]]):
        model = store.put_bytes(b"model", "model", ".pt")
        rec.complete("train", [model], model=model, metrics={"accuracy": 0.5})
    return {"rec": rec, "dataset": dataset, "emb": emb, "sketch": sketch, "cands": cands, "model": model}


def test_rows_of_a_recorded_pipeline(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    p = _pipeline(store)
    records = _records(store)
    rows = index_rows(records, unusable={})
    for name, schema in (("events", EVENTS_SCHEMA), ("io", IO_SCHEMA), ("metrics", METRICS_SCHEMA),
                         ("models", MODELS_SCHEMA), ("dangling", DANGLING_SCHEMA),
                         ("selection_datasets", SELECTION_DATASETS_SCHEMA)):
        pa.Table.from_pylist(getattr(rows, name), schema=schema)  # every row fits its table's schema
    assert len(rows.events) == len(records) == 14 and sorted(rows.valid) == sorted(u for u, _ in records)
    assert {e["flow_run_id"] for e in rows.events} == {"flow-1"} and not rows.dangling
    (model,) = rows.models
    assert (model["model_sha256"], model["selection_sha256"], model["stage"]) == (
        p["model"].sha256, p["cands"][1].sha256, "train")
    metrics = {(m["stage"], m["name"]): (m["value"], m["text"]) for m in rows.metrics}
    assert metrics[("train", "accuracy")] == (0.5, "0.5") and metrics[("select", "chosen")] == (None, '"b"')
    assert metrics[("ingest", "samples")] == (6.0, "6")
    inputs = {(r["stage"], r["kind"]) for r in rows.io if r["role"] == "input"}
    assert ("embed", "dataset") in inputs and ("select", "selection") in inputs
    # every selection leads back to the dataset manifest: select ← candidates ← sketch ← embeddings ← dataset
    links = {(r["selection_sha256"], r["dataset_sha256"]) for r in rows.selection_datasets}
    assert links == {(c.sha256, p["dataset"].manifest.sha256) for c in p["cands"]}


def test_an_unusable_artifact_makes_its_events_dangling(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    p = _pipeline(store)
    rows = index_rows(_records(store), unusable={p["cands"][1].uri: "sha256 mismatch"})
    bad = {(d["stage"], d["event_type"]) for d in rows.dangling}
    # every event naming the damaged selection: its own select stage, the choice, and the training on it
    assert bad == {("select.b", "COMPLETE"), ("select", "START"), ("select", "COMPLETE"), ("train", "START"),
                   ("train", "COMPLETE")}
    assert {d["reason"] for d in rows.dangling} == {"sha256 mismatch"}
    assert {d["model_sha256"] for d in rows.dangling if d["stage"] == "train" and d["event_type"] == "COMPLETE"} == {
        p["model"].sha256}
    assert not rows.models and len(rows.events) == 14 and len(rows.valid) == 14 - len(bad)
    assert all(r["sha256"] != p["cands"][1].sha256 for r in rows.io)


def test_a_model_without_a_named_selection_takes_the_one_its_stage_started_from():
    sel = {"uri": "file:///s/objects/selection/x.parquet", "sha256": "a" * 64, "size": 10, "kind": "selection"}
    from storage.artifacts import ArtifactRef

    ref = ArtifactRef(**sel)
    model = ArtifactRef("file:///s/objects/model/m.pt", "b" * 64, 5, "model")
    base = {"run_id": "r", "flow_run_id": None, "attempt": None, "git_commit": None, "skmm_version": None,
            "config_hash": "0" * 64, "error": None, "metrics": None, "selection": None, "model": None}
    records = [("o1", {**base, "event_type": "START", "event_time": "2026-01-01T00:00:00Z", "stage": "train",
                       "seq": 0, "inputs": [ref], "outputs": []}),
               ("o2", {**base, "event_type": "COMPLETE", "event_time": "2026-01-01T00:00:01Z", "stage": "train",
                       "seq": 1, "inputs": [], "outputs": [model], "model": model, "attempt": 2})]
    rows = index_rows(records, unusable={})
    assert rows.models[0]["selection_sha256"] == "a" * 64
    assert [e["attempt"] for e in rows.events] == [None, 2]
    assert rows.selection_datasets == [] and dataset_links(rows.io) == []


def test_dataset_rows_from_manifest_bytes(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ds = write_samples(store, [{"data": b"x", "source_uri": "file:///x", "label": "1", "split": "train"}])
    good = dataset_row(ds.manifest, store.get_bytes(ds.manifest))
    assert (good["version"], good["num_rows"], good["shards"], good["problem"]) == (ds.version, 1, 1, None)
    fake = store.put_bytes(b"not a manifest", "dataset", ".json")
    assert dataset_row(fake, b"not a manifest")["problem"].startswith("not a dataset manifest")
    assert dataset_row(ds.manifest, b"{}")["problem"] == "sha256 mismatch"
    assert dataset_row(ds.manifest, OSError("gone"))["problem"] == "gone"
    pa.Table.from_pylist([good], schema=DATASETS_SCHEMA)


def test_the_rows_module_needs_no_duckdb():
    code = "import sys, storage.index_rows; assert 'duckdb' not in sys.modules, 'duckdb imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
