"""A per-producer catalog of stored per-sample vectors, so a grown pool computes only its new samples' vectors.

Why: shards are cut from the rows sorted by sample id, and sample ids are sha256 of the bytes (uniform), so the
new samples of a grown pool land in every shard and shift every boundary after the first of them. Content-defined
shard boundaries cannot keep shards stable under uniform growth; reusing vectors *per sample id* can. A vector is
reused only from a table of the same kind, producer digest (model, weights, init seed, image size, precision) and
code ``version``, and the producer's vectors are bitwise a function of the sample's bytes (see
``skmm.models.clip``), so a table assembled from reused and fresh rows is the very artifact a from-scratch run
writes.

Layout: one immutable, canonical JSON entry per catalogued table,
``catalog/<kind>/<producer_digest>/<version>/<min_id>-<max_id>-<table sha256>.json`` holding the table's
:class:`~storage.datasets.VectorTableRef` and its id range (written with ``put_immutable``; writing the same entry
again is a no-op). What is catalogued is a **delta**: the rows that were computed afresh, each sample once — the
whole shard table when nothing was reused (no extra bytes), else a small table of only the new rows. So the
deltas overlapping an id range hold every known sample of that range once, and nothing needs ordering or
superseding (the entries of old, re-cut shards would otherwise pile up and be read again and again).

Costs, for a pool of 10^7 samples in 2 048-row shards (~5 000 entries after the first run, plus one small delta per
changed shard per growth run): the id ranges are in the entry *names*, so one listing (~1 000 names per S3 LIST
request) is the whole index; a :class:`FeatureCatalog` lists once, lazily, on its first lookup, and is meant to
live for one run. A lookup for a shard's ids then considers only the tables whose range overlaps the shard's
(about two full tables plus one tiny delta per earlier growth run), and reads the vectors only of those whose id
column — probed first, ~64 bytes a row — holds one of its ids: a grown dataset's new run spans the whole id range,
and its new samples are in no table (bench/README.md §13, "A lookup reads vectors only where it finds ids"). Tables
read are verified (sha256, producer digest) and kept in a bounded per-catalog cache, since neighbouring shards
overlap the same tables.

Not done here: compaction (after many growth runs, merging a range's deltas into one table), and entries for
tables written before the catalog existed (their samples are computed once more, then catalogued).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import VectorTableRef, read_vectors, sample_id_array, vector_table_ids
from storage.errors import ArtifactNotFoundError, MalformedRecordError, StorageError

__all__ = ["CATALOG_PREFIX", "CatalogEntry", "FeatureCatalog", "Lookup"]

CATALOG_PREFIX = "catalog"
ENTRY_FORMAT = "skmm.feature-catalog-entry"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^([0-9a-f]{64})-([0-9a-f]{64})-([0-9a-f]{64})\.json$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TABLE_CACHE_BYTES = 256 * 2**20
_ID_CACHE_BYTES = 64 * 2**20  # probed id columns kept per catalog (64 bytes an id: ~10^6 ids)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    """One catalogued vector table: its ref and the smallest and largest sample id it holds."""

    vectors: VectorTableRef
    min_id: str
    max_id: str

    @property
    def name(self) -> str:
        """The entry's file name: the id range first, so a listing alone says which tables cover which ids."""
        return f"{self.min_id}-{self.max_id}-{self.vectors.artifact.sha256}.json"

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no whitespace): the same table gives the same entry."""
        body = {"format": ENTRY_FORMAT, "vectors": self.vectors.to_dict(), "min_id": self.min_id,
                "max_id": self.max_id, "num_rows": self.vectors.num_rows}
        return canonical_json(body, allow_nan=False).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CatalogEntry:
        """Parse and validate; MalformedRecordError naming ``where`` if the bytes are not a catalog entry."""
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise MalformedRecordError(f"catalog entry {where} is not valid JSON") from None
        keys = {"format", "vectors", "min_id", "max_id", "num_rows"}
        if not isinstance(body, dict) or set(body) != keys or body["format"] != ENTRY_FORMAT:
            raise MalformedRecordError(f"catalog entry {where} needs exactly {sorted(keys)} and format {ENTRY_FORMAT}")
        vectors = VectorTableRef.from_dict(body["vectors"])
        lo, hi = body["min_id"], body["max_id"]
        if not (isinstance(lo, str) and isinstance(hi, str) and _SHA.match(lo) and _SHA.match(hi) and lo <= hi
                and body["num_rows"] == vectors.num_rows):
            raise MalformedRecordError(f"catalog entry {where} has a bad id range or row count")
        return cls(vectors, lo, hi)


class Lookup(NamedTuple):
    """What a lookup found: sample id → vector (float32, a copy); how many catalogued tables it read (their
    vectors, verified), and how many it probed by their ids alone."""

    vectors: dict[str, np.ndarray]
    tables: int
    probed: int = 0


@dataclass(frozen=True)
class _Span:
    min_id: str
    max_id: str
    sha256: str
    rel: str


class _SpanIndex:
    """Spans bucketed by the first three hex digits of the ids they cover (4 096 buckets), so finding the spans
    that meet a shard's range looks at a few buckets, not at every entry of a large catalog."""

    _DIGITS = 3

    def __init__(self) -> None:
        self._by_sha: dict[str, _Span] = {}
        self._buckets: dict[int, list[_Span]] = {}

    def add(self, span: _Span) -> None:
        if span.sha256 in self._by_sha:
            return
        self._by_sha[span.sha256] = span
        for b in range(self._bucket(span.min_id), self._bucket(span.max_id) + 1):
            self._buckets.setdefault(b, []).append(span)

    def all(self) -> list[_Span]:
        return sorted(self._by_sha.values(), key=lambda s: s.sha256)

    def meeting(self, lo: str, hi: str) -> list[_Span]:
        """The spans that meet [lo, hi], sorted by table sha256."""
        found = {s.sha256: s for b in range(self._bucket(lo), self._bucket(hi) + 1) for s in self._buckets.get(b, ())
                 if s.min_id <= hi and s.max_id >= lo}
        return [found[k] for k in sorted(found)]

    @classmethod
    def _bucket(cls, sample_id: str) -> int:
        return int(sample_id[:cls._DIGITS], 16)


class FeatureCatalog:
    """The catalogued tables of one (kind, producer digest, code version) in ``store``.

    Thread-safe; one instance per run (it lists the store once, on first use, and caches up to 256 MiB of read
    tables), so that concurrent shard tasks of the run share the listing and the tables they overlap.
    """

    def __init__(self, store: ArtifactStore, kind: str, producer_digest: str, version: str,
                 table_cache_bytes: int = _TABLE_CACHE_BYTES) -> None:
        if not _SHA.match(producer_digest):
            raise ValueError(f"producer_digest must be 64 lowercase hex digits; got {producer_digest!r:.80}")
        if not _VERSION.match(version) or not _VERSION.match(kind):
            raise ValueError(f"catalog kind and version must be short names ([A-Za-z0-9_.-]); got {kind!r}, "
                             f"{version!r}")
        self.store, self.kind, self.producer_digest, self.version = store, kind, producer_digest, version
        self.prefix = f"{CATALOG_PREFIX}/{kind}/{producer_digest}/{version}"
        self._lock = threading.Lock()
        self._spans: _SpanIndex | None = None  # once listed
        self._tables: OrderedDict[str, tuple[dict[str, int], np.ndarray]] = OrderedDict()
        self._table_cache_bytes = table_cache_bytes
        self._ids: OrderedDict[str, np.ndarray | None] = OrderedDict()  # probed id columns (None: unreadable)
        self._entries: dict[str, CatalogEntry] = {}  # entries read, by table sha256

    def __repr__(self) -> str:
        return f"FeatureCatalog({self.store!r}, {self.prefix!r})"

    # ------------------------------------------------------------------ writing
    def register(self, vectors: VectorTableRef, sample_ids: Sequence[str]) -> CatalogEntry:
        """Catalogue ``vectors`` (whose ids are ``sample_ids``); idempotent. ValueError for another producer."""
        if (vectors.kind, vectors.producer_digest) != (self.kind, self.producer_digest):
            raise ValueError(f"refusing to catalogue a {vectors.kind} table of producer {vectors.producer_digest} "
                             f"in {self.prefix}")
        if not sample_ids or len(sample_ids) != vectors.num_rows:
            raise ValueError(f"{len(sample_ids)} sample ids for vector table {vectors.artifact.uri} of "
                             f"{vectors.num_rows} rows")
        entry = CatalogEntry(vectors, min(sample_ids), max(sample_ids))
        rel, data = f"{self.prefix}/{entry.name}", entry.to_json()
        try:
            self.store.put_immutable(rel, data)
        except StorageError as exc:  # "refusing to overwrite": fine when it already says the same
            if exc.transient or not self._holds(rel, entry):
                raise
        self.include(entry)
        return entry

    def include(self, entry: CatalogEntry) -> None:
        """Make an entry that another process registered visible to this instance's lookups, if it listed the
        store before the entry was written (a lookup still reads and verifies the entry itself)."""
        with self._lock:
            if self._spans is not None:
                self._spans.add(_Span(entry.min_id, entry.max_id, entry.vectors.artifact.sha256,
                                      f"{self.prefix}/{entry.name}"))

    def _holds(self, rel: str, entry: CatalogEntry) -> bool:
        try:
            found = CatalogEntry.from_json(self.store.read_rel(rel), self.store.uri(rel))
        except (ArtifactNotFoundError, MalformedRecordError):
            return False
        return found.name == entry.name

    # ------------------------------------------------------------------ reading
    def _index(self) -> _SpanIndex:
        """Every catalogued table's id range, from one listing (taken on first use, then memoised)."""
        with self._lock:
            if self._spans is None:
                spans = _SpanIndex()
                for rel in self.store.list_paths(self.prefix, "*.json"):
                    match = _NAME.match(rel.rsplit("/", 1)[-1])
                    if match:
                        spans.add(_Span(match[1], match[2], match[3], rel))
                self._spans = spans
            return self._spans

    def spans(self) -> list[tuple[str, str, str]]:
        """(min_id, max_id, table sha256) of every catalogued table, sorted by sha256."""
        index = self._index()
        with self._lock:
            return [(s.min_id, s.max_id, s.sha256) for s in index.all()]

    def overlapping(self, lo: str, hi: str) -> list[_Span]:
        """The catalogued tables whose id range meets [lo, hi], in a fixed (table sha256) order."""
        index = self._index()
        with self._lock:
            return index.meeting(lo, hi)

    def lookup(self, sample_ids: Sequence[str]) -> Lookup:
        """The catalogued vectors of ``sample_ids``: read only the tables whose id range overlaps theirs and whose
        id column holds some of them.

        Each overlapping table is first *probed* — its footer and id column only (~64 bytes a row; cached) — and
        its vectors are read, verified, only if it holds a wanted id (not probed: a table already cached, and one
        whose first or last id is wanted — an unchanged shard's own table). Why: a growth's new samples fall in the id
        range of every table yet are in none, and reading those tables whole read the pool's vectors once per
        growth (~20 GB at 10^7 samples × 512 floats, against ~640 MB of ids). A probe is not verified: a damaged id
        column can only cost a sample its reuse (it is computed again, bitwise the same) or send the lookup to the
        verified read, which finds what the table really holds.

        A sample held by several tables (two runs computed it at once) takes the vector of the table with the
        smallest sha256, so the answer does not depend on listing order. A table or entry that is missing,
        corrupted or malformed is skipped with a warning (its samples are then simply not found); a transient
        store error is raised, for the caller to retry."""
        wanted = set(sample_ids)
        if not wanted:
            return Lookup({}, 0)
        found: dict[str, np.ndarray] = {}
        consulted = probed = 0
        left = sample_id_array(sorted(wanted))  # the ids not found yet, sorted (sorted again only as some are found)
        for span in self.overlapping(min(wanted), max(wanted)):
            if len(found) == len(wanted):
                break
            with self._lock:
                cached = span.sha256 in self._tables
            if not cached and span.min_id not in wanted and span.max_id not in wanted:  # else it holds one of ours
                ids = self._probe(span)
                probed += 1
                if ids is not None:
                    pos = np.minimum(np.searchsorted(ids, left), len(ids) - 1)
                    if not np.any(ids[pos] == left):
                        continue  # none of ours: its vectors are not read
            table = self._table(span)
            consulted += 1
            if table is None:
                continue
            index, mat = table
            hits = wanted.difference(found).intersection(index)
            for sid in hits:
                found[sid] = mat[index[sid]].copy()
            if hits:
                left = sample_id_array(sorted(wanted.difference(found)))
        return Lookup(found, consulted, probed)

    def _entry(self, span: _Span) -> CatalogEntry:
        """A span's entry, read once and checked against its name and this catalog (MalformedRecordError if
        not)."""
        with self._lock:
            entry = self._entries.get(span.sha256)
        if entry is not None:
            return entry
        where = self.store.uri(span.rel)
        entry = CatalogEntry.from_json(self.store.read_rel(span.rel), where)
        if (entry.name != span.rel.rsplit("/", 1)[-1] or entry.vectors.kind != self.kind
                or entry.vectors.producer_digest != self.producer_digest):
            raise MalformedRecordError(f"catalog entry {where} does not match its name or catalog")
        with self._lock:
            self._entries[span.sha256] = entry  # ~500 bytes each: one per catalogued table at most
        return entry

    def _probe(self, span: _Span) -> np.ndarray | None:
        """The sorted ids of a span's table from its id column (cached), or None when they cannot be read that way
        (the verified read then says why); a transient store error is raised."""
        with self._lock:
            if span.sha256 in self._ids:
                self._ids.move_to_end(span.sha256)
                return self._ids[span.sha256]
        try:
            ids: np.ndarray | None = vector_table_ids(self.store, self._here(self._entry(span).vectors))
        except StorageError as exc:
            if exc.transient:
                raise
            ids = None
        with self._lock:
            self._ids[span.sha256] = ids
            while len(self._ids) > 1 and sum(0 if a is None else a.nbytes for a in self._ids.values()) > \
                    _ID_CACHE_BYTES:
                self._ids.popitem(last=False)
        return ids

    def _table(self, span: _Span) -> tuple[dict[str, int], np.ndarray] | None:
        with self._lock:
            cached = self._tables.get(span.sha256)
            if cached is not None:
                self._tables.move_to_end(span.sha256)
                return cached
        where = self.store.uri(span.rel)
        try:
            entry = self._entry(span)
            ids, mat = read_vectors(self.store, self._here(entry.vectors))
            if (ids[0], ids[-1]) != (entry.min_id, entry.max_id):
                raise MalformedRecordError(f"catalog entry {where} misstates its table's id range")
        except StorageError as exc:
            if exc.transient:
                raise
            log.warning("skipping catalogued features %s: %s", where, exc)
            return None
        table = ({sid: i for i, sid in enumerate(ids)}, mat)
        with self._lock:
            self._tables[span.sha256] = table
            while len(self._tables) > 1 and sum(m.nbytes for _, m in self._tables.values()) > self._table_cache_bytes:
                self._tables.popitem(last=False)
        return table

    def _here(self, vectors: VectorTableRef) -> VectorTableRef:
        """The ref with its URI in *this* store (objects are content-addressed: a moved store keeps its entries)."""
        art = vectors.artifact
        name = art.uri.rsplit("/", 1)[-1]
        if not name.startswith(art.sha256) or "/" in name:
            raise MalformedRecordError(f"catalogued table {art.uri} is not named by its sha256")
        here = ArtifactRef(self.store.uri(f"objects/{art.kind}/{name}"), art.sha256, art.size, art.kind)
        return replace(vectors, artifact=here)
