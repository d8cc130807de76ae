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
Each dataset manifest the events name is read (a small JSON) for its version and size.

The pieces: :mod:`storage.index_rows` turns events into rows (pure), :mod:`storage.index_sql` holds every
statement that creates the tables (listed there), :mod:`storage.index_queries` the audit queries; this module
reads the store, builds and swaps the file, and keeps the read-only connections.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
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

from storage import index_queries as q
from storage import index_sql as sql
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.artifacts import _translate as _translate_storage_error
from storage.errors import (
    ArtifactCorruptedError,
    ArtifactNotFoundError,
    MalformedRecordError,
    StorageError,
    redact,
)
from storage.index_queries import UnknownIdError, _one
from storage.index_rows import (
    DANGLING_SCHEMA,
    DATASETS_SCHEMA,
    EVENTS_SCHEMA,
    IO_SCHEMA,
    METRICS_SCHEMA,
    MODELS_SCHEMA,
    SELECTION_DATASETS_SCHEMA,
    dataset_row,
    index_rows,
    named_refs,
)
from storage.lineage import EVENTS_PREFIX, event_record, parse_event

__all__ = ["INDEX_VERSION", "IndexNotFoundError", "LineageIndex", "UnknownIdError"]

# 3: runs.attempt / previous_attempt (Prefect retries linked), events.attempt / skmm_version, datasets and
#    selection_datasets (the dataset each selection was made from)
INDEX_VERSION = "3"
_COUNTED = ("runs", "events", "artifacts", "dangling", "malformed", "selection_files", "samples", "selections",
            "models", "metrics", "datasets")
_RUN_DIR = re.compile(r"^lineage/events/([^/]+)/[^/]+\.json$")
_S = pa.string()
ARTIFACTS_SCHEMA = pa.schema([("uri", _S), ("sha256", _S), ("size", pa.int64()), ("kind", _S),
                             ("present", pa.bool_()), ("reason", _S)])
MALFORMED_SCHEMA = pa.schema([("object", _S), ("error", _S)])
SELFILES_SCHEMA = pa.schema([("sel_id", pa.int32()), ("uri", _S), ("sha256", _S), ("size", pa.int64()),
                            ("path", _S)])


class IndexNotFoundError(StorageError):
    """There is no (usable) lineage index at the given path: run a rebuild."""


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


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
        store.check(create=False)  # an unreachable endpoint or a missing bucket is an error, not an empty index
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
    def _read_events(store: ArtifactStore, skip_malformed: bool) -> tuple[list[tuple[str, dict]], list[dict]]:
        """(event object uri, :func:`event_record`) of every event in the store, and the malformed objects."""
        rels = [r for r in store.list_paths(EVENTS_PREFIX) if r.endswith(".json")]
        blobs = store.read_many(rels)
        events, malformed = [], []
        for rel in rels:
            uri = store.uri(rel)
            data = blobs.get(rel)
            try:
                if isinstance(data, ArtifactNotFoundError):
                    raise MalformedRecordError(f"lineage record {uri} vanished while being read")
                if isinstance(data, Exception):
                    raise data
                record = event_record(parse_event(data, uri))
                m = _RUN_DIR.match(rel)
                if not m or m.group(1) != record["run_id"]:
                    raise MalformedRecordError(f"malformed lineage record {uri}: filed under run "
                                               f"{m.group(1) if m else '?'} but names run {record['run_id']}")
            except MalformedRecordError as exc:
                if not skip_malformed:
                    raise
                malformed.append({"object": uri, "error": str(exc)})
                continue
            events.append((uri, record))
        return events, malformed

    @staticmethod
    def _check_artifacts(store: ArtifactStore, events: list[tuple[str, dict]], verify_sha256: bool, fetched: str,
                         ) -> dict[str, dict]:
        """uri → {ref, present, reason} for every artifact any event names, from one listing of the store; each
        usable selection also gets ``local``, a verified local file of its bytes (remote ones fetched once into
        the folder ``fetched``)."""
        refs: dict[str, ArtifactRef] = {}
        for _, record in events:
            for ref in named_refs(record):
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
                out[uri] = {"ref": ref, "present": True, "reason": None}
        present = [v["ref"] for v in out.values() if v["present"]]

        def verify(ref: ArtifactRef) -> ArtifactRef | StorageError:
            try:
                store.verify(ref)
            except (ArtifactCorruptedError, ArtifactNotFoundError) as exc:
                return exc
            return ref

        # selections: one verified local copy each (loaded from those bytes); the rest hashed on request, one
        # temporary copy at a time per worker on a remote store
        checked: dict[str, Any] = dict(store.local_copies([r for r in present if r.kind == "selection"], fetched))
        if verify_sha256:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                others = [r for r in present if r.kind != "selection"]
                checked.update(zip((r.uri for r in others), pool.map(verify, others), strict=True))
        for uri, got in checked.items():
            if isinstance(got, ArtifactCorruptedError):
                out[uri].update(present=False, reason="sha256 mismatch")
            elif isinstance(got, ArtifactNotFoundError):
                out[uri].update(present=False, reason="missing")
            elif isinstance(got, Exception):
                raise got
            elif isinstance(got, pathlib.Path):
                out[uri]["local"] = str(got)
        return out

    def _build(self, con: duckdb.DuckDBPyConnection, store: ArtifactStore, events: list[tuple[str, dict]],
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

        # ---- every other table from the pure event → rows function
        rows = index_rows(events, {u: a["reason"] for u, a in artifacts.items() if not a["present"]})
        manifests = [a["ref"] for a in artifacts.values() if a["present"] and a["ref"].kind == "dataset"]
        blobs = store.read_many([store._rel_from_uri(r.uri) for r in manifests])
        dataset_rows = [dataset_row(r, blobs[store._rel_from_uri(r.uri)]) for r in manifests]
        art_rows = [{"uri": u, "sha256": a["ref"].sha256, "size": a["ref"].size, "kind": a["ref"].kind,
                     "present": a["present"], "reason": a["reason"]} for u, a in sorted(artifacts.items())]
        inputs = {"ev_in": _table(rows.events, EVENTS_SCHEMA), "io_in": _table(rows.io, IO_SCHEMA),
                  "metrics_in": _table(rows.metrics, METRICS_SCHEMA), "models_in": _table(rows.models, MODELS_SCHEMA),
                  "art_in": _table(art_rows, ARTIFACTS_SCHEMA), "dangling_in": _table(rows.dangling, DANGLING_SCHEMA),
                  "malformed_in": _table(malformed, MALFORMED_SCHEMA),
                  "valid_in": pa.table({"object": pa.array(rows.valid, _S)}),
                  "datasets_in": _table(dataset_rows, DATASETS_SCHEMA),
                  "seldata_in": _table(rows.selection_datasets, SELECTION_DATASETS_SCHEMA)}
        for name in sql.INPUTS:  # the names BUILD reads
            con.register(name, inputs[name])
        con.execute(sql.BUILD)
        for name in sql.INPUTS:
            con.unregister(name)
        counts = {t: _one(con, f"SELECT count(*) FROM {t}")[0]  # fixed table names, no user input
                  for t in _COUNTED}
        counts["selection_files"] = len(sel_rows)
        return counts

    @staticmethod
    def _load_selections(con: duckdb.DuckDBPyConnection, rows: list[dict], artifacts: dict[str, dict],
                         ) -> list[dict]:
        """Load every selection Parquet into samples/selections; unreadable ones are marked absent and dropped."""
        def usable(batch: list[dict]) -> list[dict]:
            good = []
            for row in batch:
                try:
                    con.execute(sql.PROBE_SELECTION, [[row["path"]]]).fetchall()
                    good.append(row)
                except duckdb.Error as exc:
                    artifacts[row["uri"]].update(present=False, reason=f"unreadable selection "
                                                                       f"({type(exc).__name__})")
            return good

        con.execute(sql.SELECTION_FILES)
        if rows:
            con.register("sel_files_in", _table(rows, SELFILES_SCHEMA))
            try:
                con.execute(sql.LOAD_SELECTIONS, [[r["path"] for r in rows]])
            except duckdb.Error:
                con.execute("DELETE FROM raw")
                rows = usable(rows)
                con.unregister("sel_files_in")
                con.register("sel_files_in", _table(rows, SELFILES_SCHEMA))
                if rows:
                    con.execute(sql.LOAD_SELECTIONS, [[r["path"] for r in rows]])
            if rows:
                paths = [r["path"] for r in rows]
                con.execute(sql.INSERT_SELECTION_FILES, [paths, paths])
            con.unregister("sel_files_in")
        con.execute(sql.CREATE_SELECTIONS)
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


    def unusable_artifacts(self) -> pa.Table:
        """The artifacts the events name that are missing, corrupt or unreadable: uri, kind, reason, and how many
        events (left out of the audit tables) name each."""
        with self._connect() as con:
            return q.unusable_artifacts(con)

    def stats(self) -> dict[str, Any]:
        """Row counts of the index's tables and its metadata."""
        with self._connect() as con:
            out = dict(con.execute("SELECT key, value FROM meta").fetchall())
            for t in _COUNTED:
                out[t] = _one(con, f"SELECT count(*) FROM {t}")[0]  # fixed names, no user input
        return out

    def table(self, name: str) -> pa.Table:
        """A whole index table (runs, events, dangling, malformed, …: :data:`storage.index_sql.TABLES`) as Arrow."""
        if name not in sql.TABLES:
            raise ValueError(f"unknown index table {name!r}; expected one of {', '.join(sql.TABLES)}")
        with self._connect() as con:
            return con.sql(f"SELECT * FROM {name}").to_arrow_table()  # name checked against a fixed list above

    # ---- audit queries (storage.index_queries)
    def samples_for_model(self, model: str) -> pa.Table:
        """The samples that trained ``model`` (sha256, unique sha prefix or uri): sample_id, rank, weight,
        selection_sha256 — ordered by rank. Exactly the selection's ids."""
        with self._connect() as con:
            return q.samples_for_model(con, model)

    def models_for_sample(self, sample_id: str) -> pa.Table:
        """The models whose training selection contained ``sample_id``, oldest first."""
        with self._connect() as con:
            return q.models_for_sample(con, sample_id)

    def provenance(self, run_id: str) -> pa.Table:
        """A run's full chain, oldest stage first (see :func:`storage.index_queries.provenance`)."""
        with self._connect() as con:
            return q.provenance(con, run_id)

    def selection_diff(self, a: str, b: str) -> pa.Table:
        """Samples added (only in b), removed (only in a) and kept between two runs' selections (run ids or
        selection sha256s): sample_id, change, rank_a, rank_b, weight_a, weight_b."""
        with self._connect() as con:
            return q.selection_diff(con, a, b)

    def failed_runs(self, include_incomplete: bool = False) -> pa.Table:
        """Every FAIL event: run_id, stage, error, failed_at, run_status (now), flow_run_id, git_commit
        (``include_incomplete``: also stages that started and never ended, with error NULL)."""
        with self._connect() as con:
            return q.failed_runs(con, include_incomplete)

    def selection_datasets(self, selection_sha256s: list[str]) -> pa.Table:
        """The dataset(s) each selection was made from, with the dataset version (see
        :func:`storage.index_queries.selection_datasets`)."""
        with self._connect() as con:
            return q.selection_datasets(con, selection_sha256s)

    def model_summary(self, model: str) -> dict[str, Any]:
        """One page about a model: selection, sketch, dataset, run, metrics (see
        :func:`storage.index_queries.model_summary`)."""
        with self._connect() as con:
            return q.model_summary(con, model)
