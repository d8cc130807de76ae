"""Lineage events → the row lists the DuckDB index loads: a pure function of the parsed events, no I/O, no DuckDB.

Everything is read through :func:`storage.lineage.event_record` (one flat record per event, whatever the event
format version), never through raw event paths. :func:`index_rows` takes the records with the verdict of the
artifact check (which artifacts are usable) and returns the rows of the ``events``, ``io``, ``metrics``,
``models`` and ``dangling`` tables, the valid event objects, and which dataset each selection was made from
(found by walking the recorded inputs upstream: selection ← sketch ← embeddings ← dataset manifest).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from storage.artifacts import ArtifactRef
from storage.datasets import DatasetManifest
from storage.errors import MalformedRecordError

__all__ = [
    "DANGLING_SCHEMA",
    "DATASETS_SCHEMA",
    "EVENTS_SCHEMA",
    "IO_SCHEMA",
    "METRICS_SCHEMA",
    "MODELS_SCHEMA",
    "SELECTION_DATASETS_SCHEMA",
    "IndexRows",
    "dataset_links",
    "dataset_row",
    "index_rows",
    "named_refs",
]

_S = pa.string()
EVENTS_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("seq", pa.int32()), ("stage", _S), ("event_type", _S),
                          ("event_time", _S), ("flow_run_id", _S), ("attempt", pa.int32()), ("git_commit", _S),
                          ("skmm_version", _S), ("config_hash", _S), ("error", _S)])
IO_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("event_type", _S), ("event_time", _S),
                      ("role", _S), ("uri", _S), ("sha256", _S), ("size", pa.int64()), ("kind", _S)])
METRICS_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("event_time", _S), ("name", _S),
                           ("value", pa.float64()), ("text", _S)])
MODELS_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("trained_at", _S), ("model_uri", _S),
                          ("model_sha256", _S), ("model_size", pa.int64()), ("model_kind", _S),
                          ("selection_sha256", _S)])
DANGLING_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("event_type", _S), ("uri", _S),
                            ("kind", _S), ("reason", _S), ("model_uri", _S), ("model_sha256", _S)])
SELECTION_DATASETS_SCHEMA = pa.schema([("selection_sha256", _S), ("dataset_uri", _S), ("dataset_sha256", _S),
                                      ("dataset_size", pa.int64())])
DATASETS_SCHEMA = pa.schema([("uri", _S), ("sha256", _S), ("size", pa.int64()), ("version", _S),
                            ("num_rows", pa.int64()), ("shards", pa.int32()), ("problem", _S)])


@dataclass
class IndexRows:
    """The rows of one index build (dicts shaped like the ``*_SCHEMA`` of this module)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    io: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    dangling: list[dict[str, Any]] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)  # objects of the events that name only usable artifacts
    selection_datasets: list[dict[str, Any]] = field(default_factory=list)


def named_refs(record: Mapping[str, Any]) -> list[ArtifactRef]:
    """Every artifact a record names (inputs, outputs, selection, model), each uri once."""
    refs = [*record["inputs"], *record["outputs"], record["selection"], record["model"]]
    return list({r.uri: r for r in refs if r is not None}.values())


def _metric_row(obj: str, rec: Mapping[str, Any], name: str, value: Any) -> dict[str, Any]:
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    text = None if value is None else json.dumps(value) if number is None else repr(value)
    return {"object": obj, "run_id": rec["run_id"], "stage": rec["stage"], "event_time": rec["event_time"],
            "name": name, "value": number, "text": text}


def index_rows(records: Sequence[tuple[str, Mapping[str, Any]]], unusable: Mapping[str, str]) -> IndexRows:
    """The index rows of ``records`` ((event object uri, :func:`~storage.lineage.event_record`) pairs).

    ``unusable``: uri → reason for the artifacts found missing, corrupt or unreadable; an event naming one is
    kept in ``events`` but goes to ``dangling`` (one row per bad artifact) instead of the audit rows. A model's
    selection is the one its event names, else the one its stage started from (a model whose stage started from
    an unusable selection is dangling too, never credited to another selection), else the run's latest produced
    selection, else the run's latest used one."""
    out = IndexRows()
    start_sel: dict[tuple[str, str], str] = {}
    run_sel_out: dict[str, list[str]] = {}
    run_sel_in: dict[str, list[str]] = {}
    left_out: dict[tuple[str, str], list[ArtifactRef]] = {}  # (run, stage) → unusable selections it started from
    ordered = sorted(records, key=lambda r: (r[1]["run_id"], r[1]["event_time"], r[1]["seq"]))
    for obj, rec in ordered:
        run_id, stage, etype, etime = rec["run_id"], rec["stage"], rec["event_type"], rec["event_time"]
        out.events.append({"object": obj, "run_id": run_id, "seq": rec["seq"], "stage": stage, "event_type": etype,
                           "event_time": etime, "flow_run_id": rec.get("flow_run_id"), "attempt": rec.get("attempt"),
                           "git_commit": rec.get("git_commit"), "skmm_version": rec.get("skmm_version"),
                           "config_hash": rec.get("config_hash"), "error": rec.get("error")})
        model, selection = rec["model"], rec["selection"]
        bad = [ref for ref in named_refs(rec) if ref.uri in unusable]
        if not bad and model is not None and selection is None:
            bad = list(left_out.get((run_id, stage), []))  # trained from what its stage started from: unusable too
        if bad:
            left_out.setdefault((run_id, stage), []).extend(r for r in bad if r.kind == "selection")
            out.dangling.extend({"object": obj, "run_id": run_id, "stage": stage, "event_type": etype,
                                 "uri": ref.uri, "kind": ref.kind, "reason": unusable[ref.uri],
                                 "model_uri": model.uri if model else None,
                                 "model_sha256": model.sha256 if model else None} for ref in bad)
            continue
        out.valid.append(obj)
        for role, items in (("input", rec["inputs"]), ("output", rec["outputs"])):
            for ref in items:
                out.io.append({"object": obj, "run_id": run_id, "stage": stage, "event_type": etype,
                               "event_time": etime, "role": role, "uri": ref.uri, "sha256": ref.sha256,
                               "size": ref.size, "kind": ref.kind})
                if ref.kind != "selection":
                    continue
                if role == "input":
                    start_sel[(run_id, stage)] = ref.sha256
                    run_sel_in.setdefault(run_id, []).append(ref.sha256)
                elif selection is None or selection.uri != ref.uri:
                    run_sel_out.setdefault(run_id, []).append(ref.sha256)
        if selection is not None:
            run_sel_out.setdefault(run_id, []).append(selection.sha256)
        out.metrics.extend(_metric_row(obj, rec, name, value) for name, value in (rec.get("metrics") or {}).items())
        if model is not None:
            sel_sha = (selection.sha256 if selection else start_sel.get((run_id, stage))
                       or (run_sel_out.get(run_id) or [None])[-1] or (run_sel_in.get(run_id) or [None])[-1])
            out.models.append({"object": obj, "run_id": run_id, "stage": stage, "trained_at": etime,
                               "model_uri": model.uri, "model_sha256": model.sha256, "model_size": model.size,
                               "model_kind": model.kind, "selection_sha256": sel_sha})
    out.selection_datasets = dataset_links(out.io)
    return out


def dataset_links(io: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each selection (by sha256) produced in ``io`` rows, the dataset manifests (kind ``dataset``) it was
    made from: the inputs of the stages that output it, walked upstream through the stages that output those
    inputs (in any run), until a dataset is reached. Sorted; a selection with no recorded dataset has no row."""
    inputs_of: dict[str, set[tuple[str, str]]] = {}  # (run, stage) → input shas
    producers: dict[str, set[tuple[str, str]]] = {}  # output sha → (run, stage)s that wrote it
    refs: dict[str, Mapping[str, Any]] = {}
    for row in io:
        key = (row["run_id"], row["stage"])
        refs.setdefault(row["sha256"], row)
        if row["role"] == "input":
            inputs_of.setdefault(key, set()).add(row["sha256"])
        else:
            producers.setdefault(row["sha256"], set()).add(key)
    out = []
    for sel in sorted({r["sha256"] for r in io if r["kind"] == "selection" and r["role"] == "output"}):
        found, seen, todo = set(), {sel}, [sel]
        while todo:
            sha = todo.pop()
            for key in producers.get(sha, ()):
                for up in inputs_of.get(key, ()):
                    if refs[up]["kind"] == "dataset":
                        found.add(up)
                    elif up not in seen:
                        seen.add(up)
                        todo.append(up)
        out.extend({"selection_sha256": sel, "dataset_uri": refs[d]["uri"], "dataset_sha256": d,
                    "dataset_size": refs[d]["size"]} for d in sorted(found))
    return out


def dataset_row(ref: ArtifactRef, data: bytes | Exception) -> dict[str, Any]:
    """The ``datasets`` row of a dataset manifest artifact from its bytes (or the error reading them): its
    version, rows and shard count, or — for bytes that do not hash to the ref or are no manifest — a problem."""
    row: dict[str, Any] = {"uri": ref.uri, "sha256": ref.sha256, "size": ref.size, "version": None,
                           "num_rows": None, "shards": None, "problem": None}
    if isinstance(data, Exception):
        row["problem"] = " ".join(str(data).split()) or type(data).__name__
    elif (hashlib.sha256(data).hexdigest(), len(data)) != (ref.sha256, ref.size):
        row["problem"] = "sha256 mismatch"
    else:
        try:
            manifest = DatasetManifest.from_json(data)
        except MalformedRecordError as exc:
            row["problem"] = f"not a dataset manifest: {' '.join(str(exc).split())[:200]}"
        else:
            row.update(version=manifest.version, num_rows=manifest.num_rows, shards=len(manifest.shards))
    return row
