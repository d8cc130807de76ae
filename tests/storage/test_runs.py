"""Run results in the store (runs/<run_id>.json): canonical, immutable, found by run id or prefix, in lineage.

Every test runs against a local folder and moto's S3 server (the ``store`` fixture).
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from storage.artifacts import ArtifactRef
from storage.errors import ArtifactNotFoundError, StorageError
from storage.index import LineageIndex
from storage.lineage import EVENTS_PREFIX, LineageRecorder, event_refs, parse_event
from storage.runs import (
    RESULT_KIND,
    looks_like_run_id,
    read_run_result,
    record_run_result,
    resolve_run_id,
    write_run_result,
)


def a_result(run_id: str, **extra) -> dict:
    return {"run_id": run_id, "store": "file:///x", "results": [{"n": 20, "accuracy": 0.75, "method": "uniform"}],
            "embeddings": None, "zeta": "ü", **extra}


def test_written_once_as_canonical_json_and_read_back(store):
    rid = str(uuid.uuid4())
    result = a_result(rid)
    ref = write_run_result(store, rid, {**result, "result": {"uri": "ignored"}})
    assert ref.uri == store.uri(f"runs/{rid}.json") and ref.kind == RESULT_KIND
    raw = store.get_bytes(ref)  # verified against the ref's sha256 and size
    assert raw == json.dumps(result, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert read_run_result(store, rid) == {**result, "result": ref.to_dict()}
    assert read_run_result(store, rid.upper()) == read_run_result(store, f" {rid[:6]} ")  # case, prefix, spaces

    assert write_run_result(store, rid, result) == ref  # the same bytes again: a no-op
    with pytest.raises(StorageError, match="refusing to overwrite"):
        write_run_result(store, rid, a_result(rid, results=[]))
    assert store.get_bytes(ref) == raw  # never overwritten


def test_missing_ambiguous_and_bad_run_ids(store):
    ids = [str(uuid.UUID(f"abc{i}" + str(uuid.uuid4())[4:])) for i in range(2)]  # two runs sharing "abc"
    for rid in ids:
        write_run_result(store, rid, a_result(rid))
    missing = str(uuid.uuid4())
    for text in (missing, "fff0"):
        with pytest.raises(ArtifactNotFoundError) as err:
            read_run_result(store, text)
        message = str(err.value)
        assert text in message and store.url in message and "\n" not in message
    with pytest.raises(ValueError, match="matches 2 runs"):
        resolve_run_id(store, "abc")
    assert resolve_run_id(store, ids[1][:5]) == ids[1]
    for bad in ("../etc/passwd", "", "run.json", "0" * 37):
        assert not looks_like_run_id(bad)
        with pytest.raises(ValueError, match="not a run id"):
            resolve_run_id(store, bad)


def test_refuses_results_that_are_not_finite_json_or_of_another_run(store):
    rid = str(uuid.uuid4())
    with pytest.raises(ValueError, match="finite"):
        write_run_result(store, rid, a_result(rid, results=[{"accuracy": float("nan")}]))
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        write_run_result(store, rid, a_result(rid, extra=object()))
    with pytest.raises(ValueError, match="belongs to run"):
        write_run_result(store, rid, a_result(str(uuid.uuid4())))
    with pytest.raises(ValueError, match="must be a UUID"):
        write_run_result(store, "not-a-uuid", a_result(rid))
    assert store.list_paths("runs") == []  # nothing written


def test_numpy_scalars_are_written_as_numbers(store):
    rid = str(uuid.uuid4())
    write_run_result(store, rid, a_result(rid, n=np.int64(3), score=np.float32(0.5)))
    got = read_run_result(store, rid)
    assert (got["n"], got["score"]) == (3, 0.5)


def test_recorded_as_the_output_of_the_result_stage(store, tmp_path):
    rec = LineageRecorder(store)
    out = record_run_result(rec, a_result(rec.run_id))
    ref = ArtifactRef.from_dict(out["result"])
    assert read_run_result(store, rec.run_id) == out
    events = [parse_event(store.read_rel(p)) for p in store.list_paths(f"{EVENTS_PREFIX}/{rec.run_id}")]
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [("result", "START"), ("result", "COMPLETE")]
    assert event_refs(events[1])["outputs"] == [ref]

    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(store, verify_sha256=True)
    (row,) = [r for r in index.table("io").to_pylist() if r["role"] == "output"]
    assert (row["run_id"], row["stage"], row["uri"], row["sha256"]) == (rec.run_id, "result", ref.uri, ref.sha256)
    assert index.table("dangling").num_rows == 0
