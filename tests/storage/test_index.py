"""The DuckDB lineage index and selection artifacts, on the local store and on a real S3 protocol server (same
bodies): the audit round trip, provenance, diffs, failures, dangling and malformed records, idempotent atomic
rebuilds, and ids that look like SQL."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pytest
from helpers import free_port, s3_options

from storage.artifacts import ArtifactStore
from storage.datasets import write_samples
from storage.errors import (
    ArtifactCorruptedError,
    ArtifactNotFoundError,
    MalformedRecordError,
    StoreUnavailableError,
)
from storage.index import IndexNotFoundError, LineageIndex, UnknownIdError
from storage.lineage import EVENTS_PREFIX, LineageRecorder
from storage.selections import read_selection, selection_metadata, write_selection


def _ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _pipeline(store: ArtifactStore, sample_ids: list[str], tag: str, upstream: dict | None = None) -> dict:
    """dataset → embed → sketch → select → train (with metrics); with ``upstream``, reuse its sketch."""
    rec = LineageRecorder(store, flow_run_id=f"flow-{tag}", git_commit="b" * 40, config={"tag": tag})
    out = {"run_id": rec.run_id}
    if upstream is None:
        out["dataset"] = store.put_bytes(b"the dataset", "dataset", ".parquet")
        with rec.stage("embed", [out["dataset"]]):
            out["emb"] = store.put_bytes(f"embeddings {tag}".encode(), "embeddings", ".npy")
            rec.complete("embed", [out["emb"]])
        with rec.stage("sketch", [out["emb"]]):
            out["sketch"] = store.put_bytes(f"sketch {tag}".encode(), "sketch", ".npy")
            rec.complete("sketch", [out["sketch"]])
    else:
        out["sketch"] = upstream["sketch"]
    with rec.stage("select", [out["sketch"]]):
        out["sel"] = write_selection(store, sample_ids, list(range(len(sample_ids)))[::-1],
                                     [1.0 + i for i in range(len(sample_ids))], "skmm", {"tag": tag})
        rec.complete("select", selection=out["sel"])
    with rec.stage("train", [out["sel"]]):
        out["model"] = store.put_bytes(f"model {tag}".encode(), "model", ".pt")
        rec.complete("train", [out["model"]], model=out["model"], metrics={"accuracy": 0.75, "epochs": 2})
    return out


@pytest.fixture
def recorded(store, tmp_path):
    a_ids, b_ids = _ids(30, "a"), _ids(20, "a")[5:] + _ids(10, "b")
    a = _pipeline(store, a_ids, "a")
    b = _pipeline(store, b_ids, "b", upstream=a)
    index = LineageIndex(tmp_path / "idx" / "lineage.duckdb")
    stats = index.rebuild(store)
    return {"store": store, "index": index, "stats": stats, "a": a, "b": b, "a_ids": a_ids, "b_ids": b_ids}


# ---------------------------------------------------------------------- selections
def test_selection_artifact_round_trip(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ids = ["c", "a", "b"]
    ref = write_selection(store, ids, [0, 2, 1], [0.5, 1.5, 2.5], "skmm", {"m": 8, "seed": 0})
    assert ref.kind == "selection" and ref.uri.endswith(".parquet")
    table = read_selection(store, ref)
    assert table.column_names == ["sample_id", "rank", "weight"]
    assert table.schema.field("rank").type == pa.int32() and table.schema.field("weight").type == pa.float64()
    assert table.to_pylist() == [{"sample_id": "a", "rank": 2, "weight": 1.5}, {"sample_id": "b", "rank": 1,
                                 "weight": 2.5}, {"sample_id": "c", "rank": 0, "weight": 0.5}]
    assert selection_metadata(table) == {"method": "skmm", "params": {"m": 8, "seed": 0}}
    assert write_selection(store, ids, [0, 2, 1], [0.5, 1.5, 2.5], "skmm", {"seed": 0, "m": 8}) == ref


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"sample_ids": ["a", "b", "a"]}, "duplicate"),
    ({"sample_ids": ["a", "b"], "ranks": [0]}, "same length"),
    ({"sample_ids": ["a", "b"], "weights": [1.0, 2.0, 3.0]}, "same length"),
    ({"sample_ids": ["a", "b"], "ranks": [0, 0]}, "permutation"),
    ({"sample_ids": ["a", ""]}, "non-empty"),
    ({"sample_ids": ["a"], "weights": [float("nan")]}, "finite"),
    ({"sample_ids": ["a"], "params": {"x": object()}}, "JSON"),
])
def test_selection_validation(tmp_path, kwargs, why):
    with pytest.raises(ValueError, match=why):
        write_selection(ArtifactStore(tmp_path / "store"), **kwargs)


def test_read_selection_rejects_other_artifacts(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_bytes(b"not parquet", "selection", ".parquet")
    with pytest.raises(MalformedRecordError, match=ref.uri):
        read_selection(store, ref)


# ---------------------------------------------------------------------- audit queries
def test_audit_round_trip(recorded):
    index, a, b = recorded["index"], recorded["a"], recorded["b"]
    assert recorded["stats"]["runs"] == 2 and recorded["stats"]["dangling"] == 0
    got = index.samples_for_model(a["model"].sha256)
    assert sorted(got.column("sample_id").to_pylist()) == sorted(recorded["a_ids"])  # exactly the selection
    assert got.column("rank").to_pylist() == list(range(30))  # in selection order
    assert got.column("sample_id").to_pylist() == recorded["a_ids"][::-1]  # ranks were given reversed
    assert set(got.column("selection_sha256").to_pylist()) == {a["sel"].sha256}
    assert index.samples_for_model(a["model"].uri).equals(got)
    assert index.samples_for_model(a["model"].sha256[:12]).equals(got)
    assert sorted(index.samples_for_model(b["model"].sha256).column("sample_id").to_pylist()) == sorted(
        recorded["b_ids"])

    shared, only_a = recorded["a_ids"][10], recorded["a_ids"][0]
    assert sorted(index.models_for_sample(shared).column("model_sha256").to_pylist()) == sorted(
        [a["model"].sha256, b["model"].sha256])
    assert index.models_for_sample(only_a).column("run_id").to_pylist() == [a["run_id"]]
    with pytest.raises(UnknownIdError, match="no model"):
        index.samples_for_model("f" * 64)
    with pytest.raises(UnknownIdError, match="in no recorded selection"):
        index.models_for_sample("never-selected")


def test_model_summary(recorded):
    index, a, b = recorded["index"], recorded["a"], recorded["b"]
    page = index.model_summary(b["model"].sha256[:12])
    assert (page["model"]["sha256"], page["model"]["uri"], page["model"]["stage"]) == (
        b["model"].sha256, b["model"].uri, "train")
    sel = page["selection"]
    assert (sel["sha256"], sel["method"], sel["params"]) == (b["sel"].sha256, "skmm", {"tag": "b"})
    assert sel["n_samples"] == len(recorded["b_ids"])
    assert [s["uri"] for s in sel["sketches"]] == [a["sketch"].uri]  # run b selected from run a's sketch
    assert page["datasets"] == [{"uri": a["dataset"].uri, "sha256": a["dataset"].sha256, "size": a["dataset"].size,
                                 "version": None, "num_rows": None}]  # recorded upstream; its bytes are no manifest
    run = page["run"]
    assert (run["run_id"], run["git_commit"], run["flow_run_id"], run["status"]) == (b["run_id"], "b" * 40,
                                                                                   "flow-b", "completed")
    assert len(run["config_hash"]) == 64 and page["other_runs"] == []
    assert {(m["stage"], m["name"], m["value"]) for m in page["metrics"]} == {("train", "accuracy", 0.75),
                                                                             ("train", "epochs", 2.0)}
    with pytest.raises(UnknownIdError, match="no model"):
        index.model_summary("f" * 64)


def test_provenance_chain(recorded):
    index, a, b = recorded["index"], recorded["a"], recorded["b"]
    prov = index.provenance(a["run_id"]).to_pylist()
    stages = list(dict.fromkeys(r["stage"] for r in prov))
    assert stages == ["embed", "sketch", "select", "train"]  # dataset → embeddings → sketch → selection → model
    assert {(r["stage"], r["role"], r["name"]) for r in prov} >= {
        ("embed", "input", a["dataset"].uri), ("embed", "output", a["emb"].uri),
        ("sketch", "output", a["sketch"].uri), ("select", "selection", a["sel"].uri),
        ("train", "input", a["sel"].uri), ("train", "model", a["model"].uri), ("train", "metric", "accuracy")}
    assert {r["status"] for r in prov} == {"completed"} and {r["depth"] for r in prov} == {0}

    upstream = index.provenance(b["run_id"]).to_pylist()  # run b reused run a's sketch: the chain follows it
    assert [(r["run_id"], r["stage"], r["depth"]) for r in upstream if r["role"] == "output"] == [
        (a["run_id"], "embed", 2), (a["run_id"], "sketch", 1)]
    assert {r["stage"] for r in upstream if r["run_id"] == b["run_id"]} == {"select", "train"}
    with pytest.raises(UnknownIdError, match="no run"):
        index.provenance("00000000-0000-0000-0000-000000000000")


def test_selection_diff(recorded):
    index, a, b = recorded["index"], recorded["a"], recorded["b"]
    diff = index.selection_diff(a["run_id"], b["run_id"]).to_pylist()
    by = {c: {r["sample_id"] for r in diff if r["change"] == c} for c in ("added", "removed", "kept")}
    assert by["added"] == set(_ids(10, "b"))
    assert by["removed"] == set(recorded["a_ids"]) - set(recorded["b_ids"])
    assert by["kept"] == set(recorded["a_ids"]) & set(recorded["b_ids"])
    kept = next(r for r in diff if r["change"] == "kept")
    assert kept["rank_a"] is not None and kept["rank_b"] is not None
    same = index.selection_diff(a["sel"].sha256, a["run_id"]).column("change").to_pylist()
    assert set(same) == {"kept"}


def test_attempts_of_one_flow_run_are_linked(tmp_path):
    """A Prefect retry re-runs the flow run: each attempt is its own lineage run, numbered and linked."""
    store = ArtifactStore(tmp_path / "store")
    first = LineageRecorder(store, flow_run_id="flow-retried", config={}, attempt=1)
    with pytest.raises(RuntimeError), first.stage("finetune"):
        raise RuntimeError("injected fault")
    second = LineageRecorder(store, flow_run_id="flow-retried", config={}, attempt=2)
    with second.stage("finetune"):
        second.complete("finetune")
    other = LineageRecorder(store, flow_run_id="flow-other", config={}, attempt=1)
    with other.stage("finetune"):
        other.complete("finetune")
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(store)
    runs = {r["run_id"]: r for r in index.table("runs").to_pylist()}
    assert (runs[first.run_id]["attempt"], runs[first.run_id]["previous_attempt"]) == (1, None)
    assert (runs[second.run_id]["attempt"], runs[second.run_id]["previous_attempt"]) == (2, first.run_id)
    assert (runs[other.run_id]["attempt"], runs[other.run_id]["previous_attempt"]) == (1, None)
    assert [runs[first.run_id]["status"], runs[second.run_id]["status"]] == ["failed", "completed"]
    assert {e["attempt"] for e in index.table("events").to_pylist() if e["run_id"] == second.run_id} == {2}


def test_each_selection_knows_its_dataset_and_version(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ids = _ids(4)
    dataset = write_samples(store, [{"sample_id": i, "source_uri": f"file:///pool/{n}.png", "label": "a",
                                     "split": "train"} for n, i in enumerate(ids)])
    rec = LineageRecorder(store, config={})
    with rec.stage("ingest"):
        rec.complete("ingest", [dataset.manifest])
    with rec.stage("sketch", [dataset.manifest]):
        sketch = store.put_bytes(b"sketch", "sketch", ".parquet")
        rec.complete("sketch", [sketch])
    with rec.stage("select", [sketch]):
        sel = write_selection(store, ids[:2])
        rec.complete("select", selection=sel)
    fake = _pipeline(store, ids, "fake")  # its "dataset" is no manifest: recorded, with the problem
    index = LineageIndex(tmp_path / "lineage.duckdb")
    assert index.rebuild(store)["datasets"] == 2
    (row,) = index.selection_datasets([sel.sha256]).to_pylist()
    assert (row["dataset_uri"], row["dataset_version"], row["dataset_rows"]) == (dataset.manifest.uri,
                                                                                dataset.version, 4)
    (bad,) = index.selection_datasets([fake["sel"].sha256]).to_pylist()
    assert bad["dataset_uri"] == fake["dataset"].uri and bad["dataset_version"] is None
    problems = {d["uri"]: d["problem"] for d in index.table("datasets").to_pylist()}
    assert problems[dataset.manifest.uri] is None and problems[fake["dataset"].uri].startswith("not a dataset")


def test_failed_runs(store, tmp_path):
    ok = _pipeline(store, _ids(5), "ok")
    broken = LineageRecorder(store, config={})
    with pytest.raises(RuntimeError), broken.stage("sketch", [ok["emb"]]):
        raise RuntimeError("out of memory in the sketch")
    hung = LineageRecorder(store, config={})
    hung.start("embed")
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(store)
    failed = index.failed_runs().to_pylist()
    assert [(r["run_id"], r["stage"], r["error"], r["run_status"]) for r in failed] == [
        (broken.run_id, "sketch", "RuntimeError: out of memory in the sketch", "failed")]
    with_open = index.failed_runs(include_incomplete=True).to_pylist()
    assert {(r["run_id"], r["stage"]) for r in with_open} == {(broken.run_id, "sketch"), (hung.run_id, "embed")}
    statuses = {r["run_id"]: r["status"] for r in index.table("runs").to_pylist()}
    assert statuses == {ok["run_id"]: "completed", broken.run_id: "failed", hung.run_id: "started"}


# ---------------------------------------------------------------------- rebuild semantics
def _snapshot(index: LineageIndex) -> dict:
    out = {}
    for name in ("runs", "events", "io", "artifacts", "dangling", "stages", "selection_files", "samples",
                 "selections", "run_selections", "models", "metrics"):
        out[name] = sorted(repr(row) for row in index.table(name).to_pylist())
    return out


def test_rebuild_is_idempotent_and_atomic(recorded):
    index, store = recorded["index"], recorded["store"]
    before = _snapshot(index)
    index.rebuild(store)
    assert _snapshot(index) == before
    assert sorted(os.listdir(index.db_path.parent)) == ["lineage.duckdb"]  # no temporary files left behind

    # a failing rebuild (a malformed record) leaves the previous index in place and nothing half-built
    bad = f"{EVENTS_PREFIX}/{recorded['a']['run_id']}/999999-train-COMPLETE-bad.json"
    uri = store.put_immutable(bad, b'{"eventType": "COMPLETE", "truncated')
    with pytest.raises(MalformedRecordError, match="not JSON") as info:
        index.rebuild(store)
    assert uri in str(info.value)
    assert sorted(os.listdir(index.db_path.parent)) == ["lineage.duckdb"]
    assert index.samples_for_model(recorded["a"]["model"].sha256).num_rows == 30

    stats = index.rebuild(store, skip_malformed=True)
    assert stats["malformed"] == 1 and stats["runs"] == 2
    assert index.table("malformed").to_pylist()[0]["object"] == uri


def test_readers_follow_an_index_swapped_in_by_another_process(tmp_path):
    first, second = ArtifactStore(tmp_path / "one"), ArtifactStore(tmp_path / "two")
    _pipeline(first, _ids(3), "one")
    _pipeline(second, _ids(3), "two")
    _pipeline(second, _ids(4), "three")
    reader = LineageIndex(tmp_path / "lineage.duckdb")
    reader.rebuild(first)
    assert reader.table("runs").num_rows == 1  # the reader now holds a cached connection
    LineageIndex(tmp_path / "other.duckdb").rebuild(second)
    os.replace(tmp_path / "other.duckdb", tmp_path / "lineage.duckdb")  # what another process's rebuild does
    assert reader.table("runs").num_rows == 2
    os.unlink(tmp_path / "lineage.duckdb")
    with pytest.raises(IndexNotFoundError):
        reader.table("runs")


def test_misfiled_event_is_malformed(recorded):
    store, index, a = recorded["store"], recorded["index"], recorded["a"]
    rel = store.list_paths(f"{EVENTS_PREFIX}/{a['run_id']}")[0]
    other = f"{EVENTS_PREFIX}/00000000-0000-4000-8000-000000000000/{rel.rsplit('/', 1)[1]}"
    store.put_immutable(other, store.read_rel(rel))
    with pytest.raises(MalformedRecordError, match="filed under run"):
        index.rebuild(store)


def test_missing_or_truncated_artifacts_are_dangling_and_excluded(recorded):
    store, index, a, b = recorded["store"], recorded["index"], recorded["a"], recorded["b"]
    store.fs.rm(store._path(store._rel_from_uri(a["model"].uri)))
    store.fs.pipe_file(store._path(store._rel_from_uri(b["sel"].uri)), b"truncated")
    store.fs.invalidate_cache()
    stats = index.rebuild(store)
    dangling = index.table("dangling").to_pylist()
    assert {(r["run_id"], r["stage"], r["uri"]) for r in dangling} >= {
        (a["run_id"], "train", a["model"].uri), (b["run_id"], "select", b["sel"].uri),
        (b["run_id"], "train", b["sel"].uri)}
    reasons = {r["uri"]: r["reason"] for r in dangling}
    assert reasons[a["model"].uri] == "missing" and reasons[b["sel"].uri].startswith("size 9")
    assert stats["dangling"] == len(dangling)
    with pytest.raises(ArtifactNotFoundError, match=a["model"].uri):  # never answered from a missing artifact
        index.samples_for_model(a["model"].sha256)
    with pytest.raises(ArtifactCorruptedError, match=b["sel"].uri):
        index.selection_diff(a["run_id"], b["run_id"])
    present = index.table("io").column("uri").to_pylist()
    assert a["model"].uri not in present and b["sel"].uri not in present
    assert {r["run_id"]: r["status"] for r in index.table("runs").to_pylist()}[a["run_id"]] == "started"


def _flip_a_byte(store: ArtifactStore, ref) -> None:
    path = store._path(store._rel_from_uri(ref.uri))
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 1
    store.fs.pipe_file(path, bytes(data))
    store.fs.invalidate_cache()


def test_rebuild_hashes_what_it_indexes_by_default(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    run = _pipeline(store, _ids(5), "x")
    _flip_a_byte(store, run["model"])
    index = LineageIndex(tmp_path / "lineage.duckdb")
    assert index.rebuild(store, verify_sha256=False)["dangling"] == 0  # fast: existence + size of a model
    assert index.rebuild(store)["dangling"] == 1
    assert index.table("dangling").to_pylist()[0]["reason"] == "sha256 mismatch"
    with pytest.raises(ArtifactCorruptedError, match=f"{run['model'].uri} it rests on is corrupted"):
        index.samples_for_model(run["model"].sha256)
    assert index.unusable_artifacts().to_pylist() == [{"uri": run["model"].uri, "kind": "model",
                                                      "reason": "sha256 mismatch", "events": 1}]


@pytest.mark.parametrize("verify_sha256", [True, False])
def test_a_corrupt_selection_never_yields_sample_ids(store, tmp_path, verify_sha256):
    ids = _ids(30)
    run = _pipeline(store, ids, "x")
    _flip_a_byte(store, run["sel"])  # same size: only its hash tells
    index = LineageIndex(tmp_path / "lineage.duckdb")
    # select COMPLETE, train START, and train COMPLETE: its model was trained from what that START read
    assert index.rebuild(store, verify_sha256=verify_sha256)["dangling"] == 3
    with pytest.raises(ArtifactCorruptedError, match=run["sel"].uri) as info:
        index.samples_for_model(run["model"].sha256)
    assert "no model" not in str(info.value) and "delete that object" in str(info.value)
    with pytest.raises(ArtifactCorruptedError, match=run["sel"].uri):
        index.selection_diff(run["run_id"], run["run_id"])
    for sample_id in ids:
        with pytest.raises(UnknownIdError):
            index.models_for_sample(sample_id)
    assert index.table("samples").num_rows == 0


@pytest.mark.parametrize("evil", ["x' OR '1'='1", "'; DROP TABLE runs; --", 'a" OR 1=1 --', "%", "*"])
def test_sql_looking_ids_are_just_data(tmp_path, evil):
    store = ArtifactStore(tmp_path / "store")
    run = _pipeline(store, [evil, "plain"], "evil")
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(store)
    assert set(index.samples_for_model(run["model"].sha256).column("sample_id").to_pylist()) == {evil, "plain"}
    assert index.models_for_sample(evil).column("run_id").to_pylist() == [run["run_id"]]
    for query in (index.samples_for_model, index.provenance):
        with pytest.raises(UnknownIdError):
            query(evil)
    with pytest.raises(UnknownIdError):
        index.selection_diff(evil, run["run_id"])
    assert index.table("runs").num_rows == 1 and index.table("samples").num_rows == 2


def test_missing_index_and_unreachable_store(tmp_path):
    index = LineageIndex(tmp_path / "nope.duckdb")
    with pytest.raises(IndexNotFoundError, match="skmm lineage rebuild"):
        index.samples_for_model("a" * 64)
    (tmp_path / "garbage.duckdb").write_bytes(b"not a database at all" * 100)
    with pytest.raises(IndexNotFoundError, match=r"garbage\.duckdb"):
        LineageIndex(tmp_path / "garbage.duckdb").failed_runs()
    options = s3_options(f"http://127.0.0.1:{free_port()}")
    options["secret"] = "sup3r-s3cret-value"
    with pytest.raises(StoreUnavailableError, match="cannot reach") as info:
        index.rebuild(ArtifactStore("s3://bucket/prefix", storage_options=options))
    assert "sup3r-s3cret-value" not in str(info.value)
    assert not index.db_path.exists()
    with pytest.raises(ValueError, match="unknown index table"):
        index.table("runs; DROP TABLE runs")
