"""The lineage index's audit queries: plain functions of a read-only DuckDB connection (all SQL parameterised).

:class:`storage.index.LineageIndex` opens the connection and calls these; each raises UnknownIdError for an id
the index does not know, and names the damaged artifact (ArtifactNotFoundError / ArtifactCorruptedError) when
the answer rests on one the rebuild found unusable.
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb
import pyarrow as pa

from storage.errors import ArtifactCorruptedError, ArtifactNotFoundError, StorageError

__all__ = ["UnknownIdError", "failed_runs", "model_summary", "models_for_sample", "provenance", "samples_for_model",
           "selection_datasets", "selection_diff", "unusable_artifacts"]

_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_S = pa.string()


class UnknownIdError(LookupError):
    """A model, sample, run or selection id the index does not know (the message names it)."""


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """The first row or None, fetching everything so the connection is free for the next statement."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pa.Table:
    return con.sql(sql, params=params or None).to_arrow_table()


def _damaged(subject: str, artifact: tuple) -> StorageError:
    """The error for an audit question whose answer rests on an artifact the rebuild found unusable: it names
    that artifact (uri, kind, reason) instead of answering from, or pretending not to know, damaged lineage."""
    uri, kind, reason = artifact
    if reason in ("missing", "not in this store"):
        return ArtifactNotFoundError(f"{subject} is left out of the lineage index: the {kind} {uri} it rests on is "
                                     f"{'missing from the store' if reason == 'missing' else reason}; rerun the "
                                     "run that wrote it, then `skmm lineage rebuild`")
    return ArtifactCorruptedError(f"{subject} is left out of the lineage index: the {kind} {uri} it rests on is "
                                  f"corrupted ({reason}), so its sample ids cannot be trusted; "
                                  f"{ArtifactCorruptedError.ADVICE}, then `skmm lineage rebuild`")


def _models(con: duckdb.DuckDBPyConnection, model: str) -> list[tuple]:
    model = str(model).strip()
    cols = "model_sha256, model_uri, sel_id, selection_sha256, run_id, stage"
    if "://" in model:
        rows = con.execute(f"SELECT {cols} FROM models WHERE model_uri = ?", [model]).fetchall()
    elif _HEX.match(model.lower()):
        rows = con.execute(f"SELECT {cols} FROM models WHERE starts_with(model_sha256, ?)",
                           [model.lower()]).fetchall()
        if len({r[0] for r in rows}) > 1:
            raise UnknownIdError(f"model prefix {model!r} is ambiguous ({len({r[0] for r in rows})} models); "
                                 "give more characters of its sha256")
    else:
        rows = []
    if not rows:
        if "://" in model:
            left_out = con.execute("SELECT DISTINCT model_sha256, uri, kind, reason FROM dangling "
                                   "WHERE model_uri = ? ORDER BY uri", [model]).fetchall()
        elif _HEX.match(model.lower()):
            left_out = con.execute("SELECT DISTINCT model_sha256, uri, kind, reason FROM dangling "
                                   "WHERE starts_with(model_sha256, ?) ORDER BY uri", [model.lower()]).fetchall()
        else:
            left_out = []
        if left_out:
            raise _damaged(f"model {left_out[0][0]}", left_out[0][1:])
        raise UnknownIdError(f"no model {model!r:.100} in the lineage index (give its sha256, a prefix of at "
                             "least 8 hex characters, or its uri)")
    return rows


def _run(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple:
    row = _one(con, "SELECT run_id, status FROM runs WHERE run_id = ?", [str(run_id).strip()])
    if row is None:
        raise UnknownIdError(f"no run {run_id!r:.100} in the lineage index")
    return row


def _selection_of(con: duckdb.DuckDBPyConnection, key: str) -> tuple[int, str]:
    """(sel_id, sha256) for a run id (the selection it produced, else the one it used) or a selection sha."""
    key = str(key).strip()
    if _HEX.match(key.lower()):
        rows = con.execute("SELECT sel_id, sha256 FROM selection_files WHERE starts_with(sha256, ?)",
                           [key.lower()]).fetchall()
        if len(rows) == 1:
            return rows[0]
        if len(rows) > 1:
            raise UnknownIdError(f"selection prefix {key!r} is ambiguous; give more characters")
    row = _one(con, """SELECT sel_id, selection_sha256 FROM run_selections WHERE run_id = ?
                         ORDER BY (role = 'output') DESC, event_time DESC LIMIT 1""", [key])
    if row is None:
        left_out = _one(con, "SELECT uri, kind, reason FROM dangling WHERE run_id = ? AND kind = 'selection' "
                             "ORDER BY uri LIMIT 1", [key])
        if left_out is not None:
            raise _damaged(f"run {key}'s selection", left_out)
        _run(con, key)  # raises "no run" for unknown ids
        raise UnknownIdError(f"run {key} has no recorded selection")
    return row


def samples_for_model(con: duckdb.DuckDBPyConnection, model: str) -> pa.Table:
    """The samples that trained ``model`` (sha256, unique sha prefix or uri): sample_id, rank, weight,
    selection_sha256 — ordered by rank. Exactly the selection's ids."""
    rows = _models(con, model)
    sels = sorted({(r[2], r[3]) for r in rows if r[2] is not None})
    if not sels:
        left_out = _one(con, """
            SELECT uri, kind, reason FROM artifacts WHERE list_contains(?, sha256) AND NOT present
            UNION ALL
            SELECT uri, kind, reason FROM dangling WHERE list_contains(?, run_id) AND kind = 'selection'
            LIMIT 1""", [sorted({r[3] for r in rows if r[3]}), sorted({r[4] for r in rows})])
        if left_out is not None:  # its selection was left out: name it, never "no selection"
            raise _damaged(f"model {rows[0][0]}", left_out)
        raise UnknownIdError(f"model {rows[0][0]} has no recorded selection")
    parts = [_arrow(con, """
        SELECT s.sample_id, x.rank, x.weight, ?::VARCHAR AS selection_sha256
        FROM selections x JOIN samples s ON s.sample_key = x.sample_key
        WHERE x.sel_id = ? ORDER BY x.rank""", [sha, sel_id]) for sel_id, sha in sels]
    return pa.concat_tables(parts)


def models_for_sample(con: duckdb.DuckDBPyConnection, sample_id: str) -> pa.Table:
    """The models whose training selection contained ``sample_id``, oldest first."""
    key = _one(con, "SELECT sample_key FROM samples WHERE sample_id = ?", [str(sample_id)])
    if key is None:
        raise UnknownIdError(f"sample {sample_id!r:.100} is in no recorded selection")
    return _arrow(con, """
        SELECT m.model_sha256, m.model_uri, m.run_id, m.stage, m.trained_at, x.rank, x.weight,
               m.selection_sha256
        FROM selections x JOIN models m ON m.sel_id = x.sel_id
        WHERE x.sample_key = ? ORDER BY m.trained_at, m.model_sha256""", [key[0]])


def provenance(con: duckdb.DuckDBPyConnection, run_id: str) -> pa.Table:
    """A run's full chain, oldest stage first: every stage (with the upstream stages of other runs that
    produced its inputs) and its inputs, outputs, selection, model, metrics and error.

    Columns: depth (0 = this run, 1+ = upstream producers), run_id, stage, status, started_at, ended_at,
    role (input/output/selection/model/metric/error), kind, name (uri, metric name or error), sha256, value.
    """
    run_id, _ = _run(con, run_id)
    stage_cols = "run_id, stage, status, started_at, ended_at, error"
    todo = [(0, r) for r in con.execute(f"SELECT {stage_cols} FROM stages WHERE run_id = ? "
                                        "ORDER BY started_at, seq", [run_id]).fetchall()]
    seen = {(r[0], r[1]) for _, r in todo}
    produced_here = {r[0] for r in con.execute(
        "SELECT sha256 FROM io WHERE run_id = ? AND role = 'output'", [run_id]).fetchall()}
    out: list[dict[str, Any]] = []
    while todo:
        depth, (rid, stage, status, started, ended, error) = todo.pop(0)
        base = {"depth": depth, "run_id": rid, "stage": stage, "status": status, "started_at": started,
                "ended_at": ended}
        model_uri = _one(con, "SELECT any_value(model_uri) FROM models WHERE run_id = ? AND stage = ?",
                                [rid, stage])[0]
        io = con.execute("""SELECT DISTINCT role, kind, uri, sha256 FROM io WHERE run_id = ? AND stage = ?
                            ORDER BY role, kind, uri""", [rid, stage]).fetchall()
        for role, kind, uri, sha in io:
            label = role
            if role == "output" and kind == "selection":
                label = "selection"
            elif role == "output" and uri == model_uri:
                label = "model"
            out.append({**base, "role": label, "kind": kind, "name": uri, "sha256": sha, "value": None})
            if role == "input" and (depth > 0 or sha not in produced_here):
                producer = _one(con, f"""
                    SELECT {', '.join('s.' + c for c in stage_cols.split(', '))}
                    FROM io i JOIN stages s ON s.run_id = i.run_id AND s.stage = i.stage
                    WHERE i.role = 'output' AND i.sha256 = ? AND NOT (i.run_id = ? AND i.stage = ?)
                    ORDER BY i.event_time LIMIT 1""", [sha, rid, stage])
                if producer is not None and (producer[0], producer[1]) not in seen:
                    seen.add((producer[0], producer[1]))
                    todo.append((depth + 1, producer))
        for name, text in con.execute("""
                SELECT name, text FROM metrics WHERE run_id = ? AND stage = ?
                ORDER BY event_time, name""", [rid, stage]).fetchall():
            out.append({**base, "role": "metric", "kind": None, "name": name, "sha256": None,
                        "value": text})
        if error:
            out.append({**base, "role": "error", "kind": None, "name": error, "sha256": None, "value": None})
        if not io and not error and status != "completed":
            out.append({**base, "role": None, "kind": None, "name": None, "sha256": None, "value": None})
    ts = pa.timestamp("us", tz="UTC")
    schema = pa.schema([("depth", pa.int32()), ("run_id", _S), ("stage", _S), ("status", _S),
                        ("started_at", ts), ("ended_at", ts), ("role", _S), ("kind", _S), ("name", _S),
                        ("sha256", _S), ("value", _S)])
    # oldest first, so the chain reads top-down: dataset → embeddings → sketch → selection → model → metrics
    out.sort(key=lambda r: (r["started_at"] is None, r["started_at"].timestamp() if r["started_at"] else 0,
                            -r["depth"]))
    return pa.Table.from_pylist(out, schema=schema)


def selection_diff(con: duckdb.DuckDBPyConnection, a: str, b: str) -> pa.Table:
    """Samples added (only in b), removed (only in a) and kept between two runs' selections (run ids or
    selection sha256s): sample_id, change, rank_a, rank_b, weight_a, weight_b."""
    sel_a, _ = _selection_of(con, a)
    sel_b, _ = _selection_of(con, b)
    return _arrow(con, """
        WITH a AS (SELECT sample_key, rank, weight FROM selections WHERE sel_id = ?),
             b AS (SELECT sample_key, rank, weight FROM selections WHERE sel_id = ?)
        SELECT s.sample_id,
               CASE WHEN a.sample_key IS NULL THEN 'added' WHEN b.sample_key IS NULL THEN 'removed'
                    ELSE 'kept' END AS change,
               a.rank AS rank_a, b.rank AS rank_b, a.weight AS weight_a, b.weight AS weight_b
        FROM a FULL OUTER JOIN b ON a.sample_key = b.sample_key
        JOIN samples s ON s.sample_key = coalesce(a.sample_key, b.sample_key)
        ORDER BY change, s.sample_id""", [sel_a, sel_b])


def failed_runs(con: duckdb.DuckDBPyConnection, include_incomplete: bool = False) -> pa.Table:
    """Every FAIL event: run_id, stage, error, failed_at, run_status (now), flow_run_id, git_commit.

    ``include_incomplete`` adds stages that started and never ended (a crashed or still-running writer),
    with error NULL."""
    return _arrow(con, """
        SELECT e.run_id, e.stage, e.error, e.event_time AS failed_at, r.status AS run_status,
               r.flow_run_id, r.git_commit
        FROM events e JOIN runs r USING (run_id)
        WHERE e.event_type = 'FAIL' AND NOT e.dangling
        UNION ALL
        SELECT s.run_id, s.stage, NULL, s.started_at, r.status, r.flow_run_id, r.git_commit
        FROM stages s JOIN runs r USING (run_id)
        WHERE ? AND s.status = 'started'
        ORDER BY failed_at, run_id, stage""", [bool(include_incomplete)])


def selection_datasets(con: duckdb.DuckDBPyConnection, selection_sha256s: list[str]) -> pa.Table:
    """The datasets each selection was made from: selection_sha256, dataset_uri, dataset_sha256, dataset_size,
    dataset_version and dataset_rows (null when the manifest could not be read at rebuild)."""
    return _arrow(con, "SELECT * FROM selection_datasets WHERE list_contains(?, selection_sha256) "
                       "ORDER BY selection_sha256, dataset_uri", [sorted(set(selection_sha256s))])


def _upstream(con: duckdb.DuckDBPyConnection, sha256: str, kind: str) -> list[dict[str, Any]]:
    """The artifacts of ``kind`` that the stages which output ``sha256`` read, walking upstream through inputs of
    other kinds (a chosen selection → its candidate selections → their sketch)."""
    found: dict[str, dict[str, Any]] = {}
    seen, todo = {sha256}, [sha256]
    while todo:
        rows = con.execute("""
            SELECT DISTINCT i.uri, i.sha256, i.size, i.kind FROM io o
            JOIN io i ON i.run_id = o.run_id AND i.stage = o.stage AND i.role = 'input'
            WHERE o.role = 'output' AND o.sha256 = ?""", [todo.pop()]).fetchall()
        for uri, sha, size, k in rows:
            if k == kind:
                found.setdefault(sha, {"uri": uri, "sha256": sha, "size": size, "kind": k})
            elif sha not in seen:
                seen.add(sha)
                todo.append(sha)
    return sorted(found.values(), key=lambda r: r["uri"])


def _record(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> dict[str, Any] | None:
    cur = con.execute(sql, params)
    row = cur.fetchone()
    names = [d[0] for d in cur.description]
    cur.fetchall()
    return None if row is None else dict(zip(names, row, strict=True))


def model_summary(con: duckdb.DuckDBPyConnection, model: str) -> dict[str, Any]:
    """One page about ``model`` (sha256, unique prefix or uri): the model, its selection (method, params, size),
    the sketch artifact(s) the selection was made from, its dataset(s), the run that trained it (commit, config
    hash, attempt) and the metrics recorded about it (by the stage that trained it and the stages that read it).
    The latest training event is described; ``other_runs`` lists the other runs that recorded the same model."""
    rows = _models(con, model)
    sha = rows[0][0]
    m = _record(con, """
        SELECT model_sha256 AS sha256, model_uri AS uri, model_size AS size, model_kind AS kind, trained_at,
               run_id, stage, selection_sha256, object FROM models WHERE model_sha256 = ?
        ORDER BY trained_at DESC LIMIT 1""", [sha])
    other = [r[0] for r in con.execute("SELECT DISTINCT run_id FROM models WHERE model_sha256 = ? AND run_id <> ? "
                                       "ORDER BY run_id", [sha, m["run_id"]]).fetchall()]
    selection = None
    if m["selection_sha256"] is not None:
        selection = _record(con, "SELECT uri, sha256, size, n_samples, method, params FROM selection_files "
                                 "WHERE sha256 = ?", [m["selection_sha256"]])
        if selection is None:
            selection = {"uri": None, "sha256": m["selection_sha256"], "size": None, "n_samples": None,
                         "method": None, "params": None}
        if selection["params"] is not None:
            try:
                selection["params"] = json.loads(selection["params"])
            except ValueError:
                pass
        selection["sketches"] = _upstream(con, m["selection_sha256"], "sketch")
    datasets = selection_datasets(con, [m["selection_sha256"]] if m["selection_sha256"] else []).to_pylist()
    run = _record(con, """SELECT run_id, flow_run_id, attempt, previous_attempt, status, git_commit, skmm_version,
                                 config_hash, started_at FROM runs WHERE run_id = ?""", [m["run_id"]])
    metrics = [{"stage": stage, "name": name, "value": value if value is not None else text}
               for stage, name, value, text in con.execute("""
                   SELECT x.stage, x.name, x.value, x.text FROM metrics x
                   WHERE x.object = ? OR (x.run_id = ? AND x.stage IN (
                       SELECT stage FROM io WHERE role = 'input' AND sha256 = ? AND run_id = ?))
                   ORDER BY x.event_time, x.stage, x.name""", [m.pop("object"), m["run_id"], sha, m["run_id"]]
               ).fetchall()]
    return {"model": m, "selection": selection, "datasets": [
        {"uri": d["dataset_uri"], "sha256": d["dataset_sha256"], "size": d["dataset_size"],
         "version": d["dataset_version"], "num_rows": d["dataset_rows"]} for d in datasets],
        "run": run, "metrics": metrics, "other_runs": other}


def unusable_artifacts(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """The artifacts the events name that are missing, corrupt or unreadable: uri, kind, reason, and how many
    events (left out of the audit tables) name each."""
    return _arrow(con, """
        SELECT a.uri, a.kind, a.reason, count(DISTINCT d.object) AS events
        FROM artifacts a LEFT JOIN dangling d ON d.uri = a.uri
        WHERE NOT a.present GROUP BY a.uri, a.kind, a.reason ORDER BY a.uri""")
