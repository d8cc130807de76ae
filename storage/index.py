"""The lineage query index: a local DuckDB file derived from the store's immutable lineage events.

The store's event objects are the source of truth; this index is a cache that :meth:`LineageIndex.rebuild`
recreates from them at any time. A rebuild writes a *new* database file beside the target and swaps it in with
``os.replace``, so readers (which open the file read-only and reopen it when it changes) never see a half-built
index, and DuckDB's one-writer-per-file rule never bites: each rebuild writes its own file.

While building, every artifact an event names is checked for existence and size against a fresh listing (one
per ``objects/<kind>/`` folder, not one request per artifact) and, by default, re-hashed (``verify_sha256=False``
skips the hashing of everything but selections: the index loads every selection's sample ids, so a damaged one
would put wrong ids in the audit answers; each is read once, hashed and loaded from the same local bytes).
Events naming a missing, truncated, corrupt or unreadable artifact go to the ``dangling`` table and are left out
of every audit table; a query about a model they name fails naming the damaged artifact. Malformed event objects
raise MalformedRecordError naming the object, or land in the ``malformed`` table with ``skip_malformed=True``.

Tables: ``meta``, ``events``, ``io`` (inputs/outputs of valid events), ``artifacts``, ``dangling``, ``malformed``,
``stages`` (latest state of each run's stage), ``runs``, ``selection_files``, ``samples`` (sample id dictionary),
``selections`` (sel_id, sample_key, rank, weight; ordered by sel_id so one selection is a contiguous range),
``run_selections``, ``models``, ``metrics``; ``dangling`` also names the model of each left-out event. All query
SQL is parameterised.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa

from storage.artifacts import ArtifactRef, ArtifactStore, sha256_file
from storage.artifacts import _translate as _translate_storage_error
from storage.errors import (
    ArtifactCorruptedError,
    ArtifactNotFoundError,
    MalformedRecordError,
    StorageError,
    redact,
)
from storage.lineage import EVENTS_PREFIX, event_refs, parse_event

__all__ = ["INDEX_VERSION", "IndexNotFoundError", "LineageIndex", "UnknownIdError"]

INDEX_VERSION = "2"  # 2: dangling names the left-out events' models and the bad artifacts' kinds
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_RUN_DIR = re.compile(r"^lineage/events/([^/]+)/[^/]+\.json$")


class IndexNotFoundError(StorageError):
    """There is no (usable) lineage index at the given path: run a rebuild."""


class UnknownIdError(LookupError):
    """A model, sample, run or selection id the index does not know (the message names it)."""


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """The first row or None, fetching everything so the connection is free for the next statement."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


_S = pa.string()
EVENTS_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("seq", pa.int32()), ("stage", _S), ("event_type", _S),
                          ("event_time", _S), ("flow_run_id", _S), ("git_commit", _S), ("config_hash", _S),
                          ("error", _S)])
IO_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("event_type", _S), ("event_time", _S),
                      ("role", _S), ("uri", _S), ("sha256", _S), ("size", pa.int64()), ("kind", _S)])
METRICS_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("event_time", _S), ("name", _S),
                           ("value", pa.float64()), ("text", _S)])
MODELS_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("trained_at", _S), ("model_uri", _S),
                          ("model_sha256", _S), ("model_size", pa.int64()), ("model_kind", _S),
                          ("selection_sha256", _S)])
ARTIFACTS_SCHEMA = pa.schema([("uri", _S), ("sha256", _S), ("size", pa.int64()), ("kind", _S),
                             ("present", pa.bool_()), ("reason", _S)])
DANGLING_SCHEMA = pa.schema([("object", _S), ("run_id", _S), ("stage", _S), ("event_type", _S), ("uri", _S),
                            ("kind", _S), ("reason", _S), ("model_uri", _S), ("model_sha256", _S)])
MALFORMED_SCHEMA = pa.schema([("object", _S), ("error", _S)])
SELFILES_SCHEMA = pa.schema([("sel_id", pa.int32()), ("uri", _S), ("sha256", _S), ("size", pa.int64()),
                            ("path", _S)])


_CACHE_LOCK = threading.RLock()
_CACHE: dict[str, tuple[tuple[int, int, int, int], duckdb.DuckDBPyConnection]] = {}


def _drop_cached(path: str) -> None:
    """Close this process's cached connection to ``path`` (before a swap, or when the file changed)."""
    with _CACHE_LOCK:
        hit = _CACHE.pop(path, None)
        if hit is not None:
            hit[1].close()


def _open_index(path: str) -> duckdb.DuckDBPyConnection:
    try:
        con = duckdb.connect(path, read_only=True)
    except duckdb.Error as exc:
        raise IndexNotFoundError(f"{path} is not a readable lineage index ({type(exc).__name__})") from None
    try:
        version = _one(con, "SELECT value FROM meta WHERE key = 'version'")
    except duckdb.Error:
        version = None
    if version is None or version[0] != INDEX_VERSION:
        con.close()
        raise IndexNotFoundError(f"{path} is not a lineage index of version {INDEX_VERSION}; rebuild it with "
                                 "`skmm lineage rebuild`")
    return con


def _verified_local_copy(store: ArtifactStore, ref: ArtifactRef, rel: str, folder: str) -> str:
    """A local file holding ``ref``'s verified bytes: the object itself in a local store, else one download into
    ``folder``. Raises ArtifactCorruptedError / ArtifactNotFoundError / StoreUnavailableError."""
    if store.is_local:
        local = f"{store.root}/{rel}"
    else:
        local = os.path.join(folder, f"{ref.sha256}-{os.path.basename(rel)}")
        try:
            store.fs.get_file(f"{store.root}/{rel}", local)
        except Exception as exc:
            raise _translate_storage_error(exc, ref.uri) from None
    try:
        sha, size = sha256_file(local)
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"not found: artifact {ref.uri}") from None
    if (sha, size) != (ref.sha256, ref.size):
        raise ArtifactCorruptedError(f"artifact {ref.uri} is corrupted")
    return local


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


class LineageIndex:
    """A DuckDB lineage index at ``db_path`` (created by :meth:`rebuild`; queries open it read-only)."""

    def __init__(self, db_path: str | os.PathLike) -> None:
        self.db_path = pathlib.Path(db_path).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LineageIndex({str(self.db_path)!r})"

    # ================================================================== building
    def rebuild(self, store: ArtifactStore, *, skip_malformed: bool = False, verify_sha256: bool = True,
                ) -> dict[str, Any]:
        """Recreate the index from every lineage event in ``store``; returns counts and timings.

        ``verify_sha256=False`` hashes only the selections (the rest is checked for existence and size).
        Raises MalformedRecordError naming the first bad event object unless ``skip_malformed``;
        StoreUnavailableError if the store cannot be listed or read.
        """
        t0 = time.perf_counter()
        if not store.is_local:
            store.check()  # an unreachable endpoint or a missing bucket is an error, not an empty index
        events, malformed = self._read_events(store, skip_malformed)
        t_read = time.perf_counter()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.db_path.with_name(f".{self.db_path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tempfile.TemporaryDirectory(prefix=".skmm-selections-", dir=self.db_path.parent) as fetched:
                artifacts = self._check_artifacts(store, events, verify_sha256, fetched)
                t_check = time.perf_counter()
                con = duckdb.connect(str(tmp))
                try:
                    stats = self._build(con, store, events, malformed, artifacts)
                    con.execute("INSERT INTO meta VALUES ('version', ?), ('store', ?), ('built_at', ?)",
                                [INDEX_VERSION, redact(store.url), time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                 time.gmtime())])
                    con.execute("CHECKPOINT")
                finally:
                    con.close()
            _drop_cached(str(self.db_path))  # this process's readers reopen the new file on their next query
            os.replace(tmp, self.db_path)  # atomic: readers see the old index or the new one, never a partial one
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            shutil.rmtree(tmp.with_name(tmp.name + ".tmp"), ignore_errors=True)  # DuckDB's spill folder
        t_end = time.perf_counter()
        stats.update({"db_path": str(self.db_path), "read_events_s": round(t_read - t0, 3),
                      "check_artifacts_s": round(t_check - t_read, 3), "build_s": round(t_end - t_check, 3),
                      "seconds": round(t_end - t0, 3)})
        return stats

    @staticmethod
    def _read_events(store: ArtifactStore, skip_malformed: bool) -> tuple[list[dict], list[dict]]:
        rels = [r for r in store.list_paths(EVENTS_PREFIX) if r.endswith(".json")]
        blobs: dict[str, bytes | Exception] = {}
        if store.is_local:
            for rel in rels:
                try:
                    with open(f"{store.root}/{rel}", "rb") as fh:
                        blobs[rel] = fh.read()
                except OSError as exc:
                    blobs[rel] = exc
        elif rels:
            try:
                got = store.fs.cat([f"{store.root}/{r}" for r in rels], on_error="return")
            except Exception as exc:
                raise _translate_storage_error(exc, store.uri(EVENTS_PREFIX)) from None
            start = len(store.root) + 1
            blobs = {k.split("://", 1)[-1][start:]: v for k, v in got.items()}
            missing = [r for r in rels if r not in blobs]
            for rel in missing:  # key normalisation differs between fsspec versions: fall back to single reads
                try:
                    blobs[rel] = store.read_rel(rel)
                except StorageError as exc:
                    blobs[rel] = exc
        events, malformed = [], []
        for rel in rels:
            uri = store.uri(rel)
            data = blobs.get(rel)
            try:
                if isinstance(data, Exception) or data is None:
                    err = _translate_storage_error(data or FileNotFoundError(uri), f"lineage record {uri}")
                    if isinstance(err, ArtifactNotFoundError):
                        raise MalformedRecordError(f"lineage record {uri} vanished while being read")
                    raise err
                event = parse_event(data, uri)
                m = _RUN_DIR.match(rel)
                if not m or m.group(1) != event["run"]["runId"]:
                    raise MalformedRecordError(f"malformed lineage record {uri}: filed under run "
                                               f"{m.group(1) if m else '?'} but names run {event['run']['runId']}")
            except MalformedRecordError as exc:
                if not skip_malformed:
                    raise
                malformed.append({"object": uri, "error": str(exc)})
                continue
            event["_object"] = uri
            event["_refs"] = event_refs(event)
            events.append(event)
        return events, malformed

    @staticmethod
    def _check_artifacts(store: ArtifactStore, events: list[dict], verify_sha256: bool, fetched: str,
                         ) -> dict[str, dict]:
        """uri → {ref, present, reason} for every artifact any event names, from one listing of the store; each
        usable selection also gets ``local``, a verified local file of its bytes (remote ones fetched once into
        the folder ``fetched``)."""
        refs: dict[str, ArtifactRef] = {}
        for ev in events:
            r = ev["_refs"]
            for ref in [*r["inputs"], *r["outputs"], r["selection"], r["model"]]:
                if ref is not None:
                    refs.setdefault(ref.uri, ref)
        prefix = store.uri("")
        # one listing per folder that holds referenced objects (objects/<kind>/), not one request per artifact
        folders = sorted({u[len(prefix):].rsplit("/", 1)[0] for u in refs if u.startswith(prefix) and "/" in
                          u[len(prefix):]})
        listing: dict[str, dict] = {}
        try:
            store.fs.invalidate_cache()
            for folder in folders:
                with contextlib.suppress(FileNotFoundError):
                    listing.update(store.fs.find(f"{store.root}/{folder}", maxdepth=1, detail=True))
        except Exception as exc:
            raise _translate_storage_error(exc, store.uri("objects")) from None
        sizes = {}
        start = len(store.root) + 1
        for path, info in listing.items():
            path = path.split("://", 1)[-1]
            if path.startswith(store.root + "/") and not os.path.basename(path).startswith("."):
                sizes[path[start:]] = info.get("size")
        out: dict[str, dict] = {}
        for uri, ref in refs.items():
            rel = uri[len(prefix):] if uri.startswith(prefix) else None
            if rel is None:
                out[uri] = {"ref": ref, "present": False, "reason": "not in this store"}
            elif rel not in sizes:
                out[uri] = {"ref": ref, "present": False, "reason": "missing"}
            elif sizes[rel] is not None and sizes[rel] != ref.size:
                out[uri] = {"ref": ref, "present": False,
                            "reason": f"size {sizes[rel]} but the record says {ref.size}"}
            else:
                out[uri] = {"ref": ref, "present": True, "reason": None, "path": rel}
        def check(item: dict) -> None:
            try:
                if item["ref"].kind == "selection":
                    item["local"] = _verified_local_copy(store, item["ref"], item["path"], fetched)
                elif verify_sha256:
                    store.verify(item["ref"])
            except ArtifactCorruptedError:
                item.update(present=False, reason="sha256 mismatch")
            except ArtifactNotFoundError:
                item.update(present=False, reason="missing")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(check, [v for v in out.values() if v["present"]]))
        return out

    def _build(self, con: duckdb.DuckDBPyConnection, store: ArtifactStore, events: list[dict],
               malformed: list[dict], artifacts: dict[str, dict]) -> dict[str, Any]:
        # ---- selections first: an unreadable selection makes the events naming it dangling
        sel_uris = sorted({u for u, a in artifacts.items() if a["present"] and a["ref"].kind == "selection"},
                          key=lambda u: artifacts[u]["ref"].sha256)
        sel_rows, seen_sha = [], set()
        for uri in sel_uris:
            ref = artifacts[uri]["ref"]
            if ref.sha256 in seen_sha:  # the same bytes under another suffix: load once
                continue
            seen_sha.add(ref.sha256)
            sel_rows.append({"sel_id": len(sel_rows), "uri": uri, "sha256": ref.sha256, "size": ref.size,
                             "path": artifacts[uri]["local"]})
        sel_rows = self._load_selections(con, sel_rows, artifacts)

        # ---- events, dangling, io, models, metrics
        ev_rows, io_rows, dangling, metric_rows, model_rows = [], [], [], [], []
        start_sel: dict[tuple[str, str], str] = {}
        run_sel_out: dict[str, list[tuple[str, str]]] = {}
        run_sel_in: dict[str, list[tuple[str, str]]] = {}
        events.sort(key=lambda e: (e["run"]["runId"], e["eventTime"], e["skmm"]["seq"]))
        valid_events = []
        for ev in events:
            run_id, stage, etype, obj = ev["run"]["runId"], ev["job"]["name"], ev["eventType"], ev["_object"]
            refs = ev["_refs"]
            bad = [ref for ref in
                   {r.uri: r for r in [*refs["inputs"], *refs["outputs"], refs["selection"], refs["model"]] if r}
                   .values() if not artifacts[ref.uri]["present"]]
            facets = ev["run"].get("facets", {})
            ev_rows.append({"object": obj, "run_id": run_id, "seq": ev["skmm"]["seq"], "stage": stage,
                            "event_type": etype, "event_time": ev["eventTime"],
                            "flow_run_id": facets.get("flow_run_id"), "git_commit": facets.get("git_commit"),
                            "config_hash": facets.get("config_hash"), "error": ev["skmm"].get("error")})
            if bad:
                model = refs["model"]
                dangling.extend({"object": obj, "run_id": run_id, "stage": stage, "event_type": etype,
                                 "uri": ref.uri, "kind": ref.kind, "reason": artifacts[ref.uri]["reason"],
                                 "model_uri": model.uri if model else None,
                                 "model_sha256": model.sha256 if model else None} for ref in bad)
                continue
            valid_events.append(obj)
            for role, items in (("input", refs["inputs"]), ("output", refs["outputs"])):
                for ref in items:
                    io_rows.append({"object": obj, "run_id": run_id, "stage": stage, "event_type": etype,
                                    "event_time": ev["eventTime"], "role": role, "uri": ref.uri,
                                    "sha256": ref.sha256, "size": ref.size, "kind": ref.kind})
                    if ref.kind == "selection":
                        if role == "input":
                            start_sel[(run_id, stage)] = ref.sha256
                            run_sel_in.setdefault(run_id, []).append((stage, ref.sha256))
                        elif refs["selection"] is None or refs["selection"].uri != ref.uri:
                            run_sel_out.setdefault(run_id, []).append((stage, ref.sha256))
            if refs["selection"] is not None:
                run_sel_out.setdefault(run_id, []).append((stage, refs["selection"].sha256))
            for name, value in (ev["skmm"].get("metrics") or {}).items():
                number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
                metric_rows.append({"object": obj, "run_id": run_id, "stage": stage, "event_time": ev["eventTime"],
                                    "name": name, "value": number,
                                    "text": None if value is None else json.dumps(value) if number is None
                                    else repr(value)})
            model = refs["model"]
            if model is not None:
                sel_sha = (refs["selection"].sha256 if refs["selection"] else start_sel.get((run_id, stage))
                           or (run_sel_out.get(run_id) or [(None, None)])[-1][1]
                           or (run_sel_in.get(run_id) or [(None, None)])[-1][1])
                model_rows.append({"object": obj, "run_id": run_id, "stage": stage, "trained_at": ev["eventTime"],
                                   "model_uri": model.uri, "model_sha256": model.sha256, "model_size": model.size,
                                   "model_kind": model.kind, "selection_sha256": sel_sha})

        art_rows = [{"uri": u, "sha256": a["ref"].sha256, "size": a["ref"].size, "kind": a["ref"].kind,
                     "present": a["present"], "reason": a["reason"]} for u, a in sorted(artifacts.items())]
        con.register("ev_in", _table(ev_rows, EVENTS_SCHEMA))
        con.register("io_in", _table(io_rows, IO_SCHEMA))
        con.register("metrics_in", _table(metric_rows, METRICS_SCHEMA))
        con.register("models_in", _table(model_rows, MODELS_SCHEMA))
        con.register("art_in", _table(art_rows, ARTIFACTS_SCHEMA))
        con.register("dangling_in", _table(dangling, DANGLING_SCHEMA))
        con.register("malformed_in", _table(malformed, MALFORMED_SCHEMA))
        con.register("valid_in", pa.table({"object": pa.array(valid_events, _S)}))
        con.execute("""
            CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
            CREATE TABLE events AS
                SELECT e.object, e.run_id, e.seq, e.stage, e.event_type, e.event_time::TIMESTAMPTZ AS event_time,
                       e.flow_run_id, e.git_commit, e.config_hash, e.error,
                       (v.object IS NULL) AS dangling
                FROM ev_in e LEFT JOIN valid_in v USING (object) ORDER BY e.run_id, e.event_time, e.seq;
            CREATE TABLE io AS SELECT * REPLACE (event_time::TIMESTAMPTZ AS event_time) FROM io_in
                ORDER BY run_id, event_time;
            CREATE TABLE artifacts AS SELECT * FROM art_in ORDER BY uri;
            CREATE TABLE dangling AS SELECT * FROM dangling_in ORDER BY run_id, object, uri;
            CREATE TABLE malformed AS SELECT * FROM malformed_in ORDER BY object;
            CREATE TABLE metrics AS SELECT * REPLACE (event_time::TIMESTAMPTZ AS event_time) FROM metrics_in
                ORDER BY run_id, event_time, name;
            CREATE TABLE stages AS
                WITH ranked AS (
                    SELECT *, row_number() OVER (PARTITION BY run_id, stage ORDER BY event_time DESC, seq DESC) AS rn,
                           min(event_time) OVER (PARTITION BY run_id, stage) AS first_time
                    FROM events WHERE NOT dangling)
                SELECT run_id, stage,
                       CASE event_type WHEN 'START' THEN 'started' WHEN 'COMPLETE' THEN 'completed' ELSE 'failed' END
                           AS status,
                       first_time AS started_at,
                       CASE WHEN event_type = 'START' THEN NULL ELSE event_time END AS ended_at,
                       error, seq
                FROM ranked WHERE rn = 1 ORDER BY run_id, started_at, seq;
            CREATE TABLE runs AS
                WITH agg AS (
                    SELECT run_id, min(event_time) AS started_at, max(event_time) AS last_event_at,
                           count(*) AS n_events, bool_or(dangling) AS has_dangling,
                           arg_max(flow_run_id, event_time) AS flow_run_id,
                           arg_max(git_commit, event_time) AS git_commit,
                           arg_max(config_hash, event_time) AS config_hash
                    FROM events GROUP BY run_id),
                st AS (
                    SELECT run_id, bool_or(status = 'failed') AS any_failed, bool_or(status = 'started') AS any_open,
                           arg_min(stage, started_at) FILTER (WHERE status = 'failed') AS failed_stage,
                           arg_min(error, started_at) FILTER (WHERE status = 'failed') AS error
                    FROM stages GROUP BY run_id)
                SELECT a.run_id, a.flow_run_id, a.git_commit, a.config_hash,
                       CASE WHEN st.run_id IS NULL THEN 'dangling' WHEN st.any_failed THEN 'failed'
                            WHEN st.any_open THEN 'started' ELSE 'completed' END AS status,
                       a.started_at, a.last_event_at, a.n_events, a.has_dangling, st.failed_stage, st.error
                FROM agg a LEFT JOIN st USING (run_id) ORDER BY a.started_at, a.run_id;
            CREATE TABLE run_selections AS
                SELECT i.run_id, i.stage, i.role, f.sel_id, i.sha256 AS selection_sha256, i.event_time
                FROM io i JOIN selection_files f ON f.sha256 = i.sha256
                WHERE i.kind = 'selection' ORDER BY i.run_id, i.event_time;
            CREATE TABLE models AS
                SELECT m.run_id, m.stage, m.trained_at::TIMESTAMPTZ AS trained_at, m.model_uri, m.model_sha256,
                       m.model_size, m.model_kind, m.selection_sha256, f.sel_id, m.object
                FROM models_in m LEFT JOIN selection_files f ON f.sha256 = m.selection_sha256
                ORDER BY m.model_sha256, m.trained_at;
        """)
        for name in ("ev_in", "io_in", "metrics_in", "models_in", "art_in", "dangling_in", "malformed_in",
                     "valid_in"):
            con.unregister(name)
        counts = {t: _one(con, f"SELECT count(*) FROM {t}")[0]  # fixed table names, no user input
                  for t in ("runs", "events", "artifacts", "dangling", "malformed", "selection_files", "samples",
                            "selections", "models", "metrics")}
        counts["selection_files"] = len(sel_rows)
        return counts

    @staticmethod
    def _load_selections(con: duckdb.DuckDBPyConnection, rows: list[dict], artifacts: dict[str, dict],
                         ) -> list[dict]:
        """Load every selection Parquet into samples/selections; unreadable ones are marked absent and dropped."""
        query = ("SELECT f.sel_id, r.sample_id::VARCHAR AS sample_id, r.rank::INTEGER AS rank, "
                 "r.weight::DOUBLE AS weight FROM read_parquet(?, filename = true) r JOIN sel_files_in f "
                 "ON r.filename = f.path")

        def usable(batch: list[dict]) -> list[dict]:
            good = []
            for row in batch:
                try:
                    con.execute("SELECT sample_id::VARCHAR, rank::INTEGER, weight::DOUBLE "
                                "FROM read_parquet(?) LIMIT 1", [[row["path"]]]).fetchall()
                    good.append(row)
                except duckdb.Error as exc:
                    artifacts[row["uri"]].update(present=False, reason=f"unreadable selection "
                                                                       f"({type(exc).__name__})")
            return good

        con.execute("CREATE TABLE selection_files (sel_id INTEGER, uri VARCHAR, sha256 VARCHAR, size BIGINT, "
                    "n_samples BIGINT, method VARCHAR, params VARCHAR)")
        con.execute("CREATE TEMP TABLE raw (sel_id INTEGER, sample_id VARCHAR, rank INTEGER, weight DOUBLE)")
        if rows:
            con.register("sel_files_in", _table(rows, SELFILES_SCHEMA))
            paths = [r["path"] for r in rows]
            try:
                con.execute(f"INSERT INTO raw {query}", [paths])
            except duckdb.Error:
                con.execute("DELETE FROM raw")
                rows = usable(rows)
                con.unregister("sel_files_in")
                con.register("sel_files_in", _table(rows, SELFILES_SCHEMA))
                if rows:
                    con.execute(f"INSERT INTO raw {query}", [[r["path"] for r in rows]])
            if rows:
                con.execute("""
                    INSERT INTO selection_files
                    SELECT f.sel_id, f.uri, f.sha256, f.size, c.n,
                           decode(m.value) AS method, decode(p.value) AS params
                    FROM sel_files_in f
                    LEFT JOIN (SELECT sel_id, count(*) AS n FROM raw GROUP BY sel_id) c USING (sel_id)
                    LEFT JOIN (SELECT * FROM parquet_kv_metadata(?) WHERE decode(key) = 'skmm.method') m
                        ON m.file_name = f.path
                    LEFT JOIN (SELECT * FROM parquet_kv_metadata(?) WHERE decode(key) = 'skmm.params') p
                        ON p.file_name = f.path
                    ORDER BY f.sel_id""", [[r["path"] for r in rows], [r["path"] for r in rows]])
            con.unregister("sel_files_in")
        con.execute("""
            CREATE TABLE samples AS
                SELECT (row_number() OVER (ORDER BY sample_id) - 1)::INTEGER AS sample_key, sample_id
                FROM (SELECT DISTINCT sample_id FROM raw) ORDER BY sample_id;
            CREATE TABLE selections AS
                SELECT r.sel_id, s.sample_key, r.rank, r.weight
                FROM raw r JOIN samples s USING (sample_id) ORDER BY r.sel_id, s.sample_key;
            DROP TABLE raw;
        """)
        return rows

    # ================================================================== querying
    @contextlib.contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only cursor on the index, from a per-process connection kept while the file is unchanged.

        Opening the file costs ~15 ms, so the connection is cached and keyed by the file's identity (device,
        inode, mtime, size): a rebuild — here or in another process — swaps in a new file, and the next query
        closes the old connection before opening the new one. DuckDB caches open databases by path within a
        process, so no cursor may outlive a swap: queries in one process are serialised by a lock.
        """
        path = str(self.db_path)
        with _CACHE_LOCK:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                _drop_cached(path)
                raise IndexNotFoundError(f"no lineage index at {path}; build it with `skmm lineage rebuild`") from None
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            hit = _CACHE.get(path)
            if hit is not None and hit[0] == key:
                con = hit[1]
            else:
                _drop_cached(path)
                con = _open_index(path)
                _CACHE[path] = (key, con)
            cursor = con.cursor()
            try:
                yield cursor
            finally:
                cursor.close()

    @staticmethod
    def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pa.Table:
        return con.sql(sql, params=params or None).to_arrow_table()

    def unusable_artifacts(self) -> pa.Table:
        """The artifacts the events name that are missing, corrupt or unreadable: uri, kind, reason, and how many
        events (left out of the audit tables) name each."""
        with self._connect() as con:
            return self._arrow(con, """
                SELECT a.uri, a.kind, a.reason, count(DISTINCT d.object) AS events
                FROM artifacts a LEFT JOIN dangling d ON d.uri = a.uri
                WHERE NOT a.present GROUP BY a.uri, a.kind, a.reason ORDER BY a.uri""")

    def stats(self) -> dict[str, Any]:
        """Row counts of the index's tables and its metadata."""
        with self._connect() as con:
            out = dict(con.execute("SELECT key, value FROM meta").fetchall())
            for t in ("runs", "events", "artifacts", "dangling", "malformed", "selection_files", "samples",
                      "selections", "models", "metrics"):
                out[t] = _one(con, f"SELECT count(*) FROM {t}")[0]  # fixed names, no user input
        return out

    def table(self, name: str) -> pa.Table:
        """A whole index table (runs, events, dangling, malformed, …) as Arrow."""
        allowed = ("runs", "events", "io", "artifacts", "dangling", "malformed", "stages", "selection_files",
                   "samples", "selections", "run_selections", "models", "metrics", "meta")
        if name not in allowed:
            raise ValueError(f"unknown index table {name!r}; expected one of {', '.join(allowed)}")
        with self._connect() as con:
            return self._arrow(con, f"SELECT * FROM {name}")  # name checked against a fixed list above

    # ---- resolution helpers
    @staticmethod
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

    @staticmethod
    def _run(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple:
        row = _one(con, "SELECT run_id, status FROM runs WHERE run_id = ?", [str(run_id).strip()])
        if row is None:
            raise UnknownIdError(f"no run {run_id!r:.100} in the lineage index")
        return row

    @classmethod
    def _selection_of(cls, con: duckdb.DuckDBPyConnection, key: str) -> tuple[int, str]:
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
            cls._run(con, key)  # raises "no run" for unknown ids
            raise UnknownIdError(f"run {key} has no recorded selection")
        return row

    # ---- audit queries
    def samples_for_model(self, model: str) -> pa.Table:
        """The samples that trained ``model`` (sha256, unique sha prefix or uri): sample_id, rank, weight,
        selection_sha256 — ordered by rank. Exactly the selection's ids."""
        with self._connect() as con:
            rows = self._models(con, model)
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
            parts = [self._arrow(con, """
                SELECT s.sample_id, x.rank, x.weight, ?::VARCHAR AS selection_sha256
                FROM selections x JOIN samples s ON s.sample_key = x.sample_key
                WHERE x.sel_id = ? ORDER BY x.rank""", [sha, sel_id]) for sel_id, sha in sels]
        return pa.concat_tables(parts)

    def models_for_sample(self, sample_id: str) -> pa.Table:
        """The models whose training selection contained ``sample_id``, oldest first."""
        with self._connect() as con:
            key = _one(con, "SELECT sample_key FROM samples WHERE sample_id = ?", [str(sample_id)])
            if key is None:
                raise UnknownIdError(f"sample {sample_id!r:.100} is in no recorded selection")
            return self._arrow(con, """
                SELECT m.model_sha256, m.model_uri, m.run_id, m.stage, m.trained_at, x.rank, x.weight,
                       m.selection_sha256
                FROM selections x JOIN models m ON m.sel_id = x.sel_id
                WHERE x.sample_key = ? ORDER BY m.trained_at, m.model_sha256""", [key[0]])

    def provenance(self, run_id: str) -> pa.Table:
        """A run's full chain, oldest stage first: every stage (with the upstream stages of other runs that
        produced its inputs) and its inputs, outputs, selection, model, metrics and error.

        Columns: depth (0 = this run, 1+ = upstream producers), run_id, stage, status, started_at, ended_at,
        role (input/output/selection/model/metric/error), kind, name (uri, metric name or error), sha256, value.
        """
        with self._connect() as con:
            run_id, _ = self._run(con, run_id)
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

    def selection_diff(self, a: str, b: str) -> pa.Table:
        """Samples added (only in b), removed (only in a) and kept between two runs' selections (run ids or
        selection sha256s): sample_id, change, rank_a, rank_b, weight_a, weight_b."""
        with self._connect() as con:
            sel_a, _ = self._selection_of(con, a)
            sel_b, _ = self._selection_of(con, b)
            return self._arrow(con, """
                WITH a AS (SELECT sample_key, rank, weight FROM selections WHERE sel_id = ?),
                     b AS (SELECT sample_key, rank, weight FROM selections WHERE sel_id = ?)
                SELECT s.sample_id,
                       CASE WHEN a.sample_key IS NULL THEN 'added' WHEN b.sample_key IS NULL THEN 'removed'
                            ELSE 'kept' END AS change,
                       a.rank AS rank_a, b.rank AS rank_b, a.weight AS weight_a, b.weight AS weight_b
                FROM a FULL OUTER JOIN b ON a.sample_key = b.sample_key
                JOIN samples s ON s.sample_key = coalesce(a.sample_key, b.sample_key)
                ORDER BY change, s.sample_id""", [sel_a, sel_b])

    def failed_runs(self, include_incomplete: bool = False) -> pa.Table:
        """Every FAIL event: run_id, stage, error, failed_at, run_status (now), flow_run_id, git_commit.

        ``include_incomplete`` adds stages that started and never ended (a crashed or still-running writer),
        with error NULL."""
        with self._connect() as con:
            return self._arrow(con, """
                SELECT e.run_id, e.stage, e.error, e.event_time AS failed_at, r.status AS run_status,
                       r.flow_run_id, r.git_commit
                FROM events e JOIN runs r USING (run_id)
                WHERE e.event_type = 'FAIL' AND NOT e.dangling
                UNION ALL
                SELECT s.run_id, s.stage, NULL, s.started_at, r.status, r.flow_run_id, r.git_commit
                FROM stages s JOIN runs r USING (run_id)
                WHERE ? AND s.status = 'started'
                ORDER BY failed_at, run_id, stage""", [bool(include_incomplete)])
