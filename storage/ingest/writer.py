"""The streaming dataset writer: a pool of any size becomes sample shards in memory bounded by O(shard).

Every source kind feeds one :class:`DatasetWriter` — ``add()`` per usable sample, ``quarantine()`` per rejected
input, in the source's own order — then calls ``finish()``.

**Pass 1** (``add``): each sample's bytes are spilled to a temporary folder, bucketed by the first two hex digits
of the sample id (256 Arrow IPC stream files; rows buffered up to :data:`SPILL_BUFFER_BYTES` in all, then
appended), and only per-sample *bookkeeping* stays in memory: sample id (32 bytes) → (label index, split), ~45
bytes a sample in sorted numpy buckets (:mod:`storage.ingest.id_codes`; a dict took ~130). That is
enough to collapse duplicates across the whole pool as they arrive (the first occurrence in source order is kept;
later copies are counted, never spilled), to stop on the same content under two labels or two explicit splits
(naming both places: the first one's URI is looked up in the spill), and to run the pool-level checks (classes,
splits, train classes) before anything is published. Spills are Arrow IPC rather than Parquet: they are appended
in many small batches and read back once, whole, and the image bytes in them are already compressed.

**Pass 2** (``finish``, only after validation passed): buckets are read back in id order, one at a time, sorted by
sample id, and cut into shards of exactly ``shard_rows`` rows across bucket boundaries; a bucket larger than
:data:`BUCKET_BYTES` is first split again by the next two hex digits (and so on; a spill batch at a time, one Arrow
``take`` per sub-bucket, no Python object per row; what a split costs is then mostly creating its 256 sub-spill
files, ~1 ms each here), so a bucket in memory stays bounded whatever N is. On a growth a bucket's size leaves out
the reused bytes of its rows in kept shards (they are dropped, never fetched), so the buckets of a nightly growth,
~2.2 GB of reused bytes each at 10^7 samples but nearly all of them kept, are not split again. Shards are written
with :func:`storage.datasets.write_samples`' Parquet settings, streamed into the store's staging file, so the shard
and manifest artifacts are **byte-identical** to ``write_samples`` of the same rows (a test holds them to it), and
so is the dataset version (computed while the sorted rows stream past, with ``dataset_version``'s encoding).

**Reused samples** (``add(..., reused=size)``, :mod:`storage.ingest.reuse`): a file unchanged since the store's
last ingest of the source is not read; pass 1 spills only its id and URI (and its byte count, so that pass 2's
buckets stay bounded).

**A growth keeps the previous dataset's unchanged shards** (the append layout): between the passes, the previous
shards' metadata (never their images) is merged with the sorted spill, and a shard whose every row is a sample of
the pool with the same source_uri, label and split is *kept* (whether its file was read now or not: an id is its
bytes' sha256): the grown dataset's manifest lists it as it is, in its run
(:class:`~storage.datasets.DatasetManifest`), and pass 2 writes only the other rows — the new samples and those of
the previous shards that changed — as one new run, asking the writer's ``base`` (the changed shards, read once in id
order, each image checked against its id) for the reused ones' bytes. The join's matches are saved beside the spill
(two int32 a matched row), so pass 2 drops the kept rows without reading the kept shards' ids again. The dataset
version is hashed over every row, kept or written, so rows and version are those of a from-scratch ingest (tested
against one over random growths); only the shard layout differs. Why: ids are content hashes, so a 1 % growth puts
new samples in every shard of a sorted layout, and rewriting the pool every night (560 GB at 10^7 images) was a
growth's main cost. At :data:`MAX_RUNS` runs the smallest runs are written again with the new samples (a tiered
merge). A kept shard is checked by its size and metadata, not read whole: its images are checked against their ids
wherever they are read.

**Nothing half-written becomes visible**: the quarantine table and the shards are content-addressed objects
nobody references until the manifest — written last — names them; if anything fails before, the shards already
written are unreferenced and harmless (a retry reuses them). The spill folder is removed in every case (the
writer is a context manager). It lives beside a local store's staging files (``<store>/tmp/.<hex>-ingest-*``, on
the store's disk, named like them so that a killed run's spill is swept by the store's staging cleanup) or, for a
remote store, in this user's staging folder in the system temporary folder (``TMPDIR``), swept the same way; it
needs room for the pool's bytes.

Memory: O(``SPILL_BUFFER_BYTES`` + ``BUCKET_BYTES`` + one shard) for the bytes, plus the bookkeeping per unique
sample (~45 bytes, plus 32 per image the decode check decoded, until it is recorded) and the quarantine list (one
short line per rejected input).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import (
    SAMPLE_PARQUET_OPTIONS,
    SAMPLE_SCHEMA,
    SPLITS,
    DatasetManifest,
    DatasetRef,
    ShardRef,
    VectorTableRef,
    sample_id_array,
)
from storage.errors import redact
from storage.ingest.common import QUARANTINE_SCHEMA, IngestResult, SourceError, split_codes
from storage.ingest.id_codes import IdCodes, digests_of_hex
from storage.ingest.reuse import BaseSamples, write_new_rows
from storage.sorted_merge import merge_sorted_tables

__all__ = ["BUCKET_BYTES", "MAX_RUNS", "SPILL_BUFFER_BYTES", "DatasetWriter"]

log = logging.getLogger(__name__)

MAX_RUNS = 8  # runs a grown dataset may have: at the limit a growth writes the smallest runs again (compaction)
SPILL_BUFFER_BYTES = 16 * 2**20  # pass 1: rows buffered (all buckets together) before they are appended
BUCKET_BYTES = 64 * 2**20  # pass 2: a larger bucket is split again before it is read into memory

_PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3}  # the quarantine table's
_VERSION_HEADER = b"skmm-dataset-version/1\n"  # storage.datasets.dataset_version's encoding (tested equal)
# ``reused``: the expected byte count of a sample whose bytes the previous dataset holds (data is then null and
# pass 2 asks :class:`~storage.ingest.reuse.BaseSamples` for them); null for a sample read now
_SPILL_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), pa.field("source_uri", pa.string()),
                           pa.field("data", pa.binary()), pa.field("reused", pa.int64())])
_FANOUT = 256
_FRESH = "__read_now"  # pass 2's marker column of rows read from the source in this ingest (never written)
_TOUCH_EVERY_S = 600.0
_ROW_OVERHEAD = 128  # bytes a spilled row costs beyond its URI and data (id, offsets, buffer slack)
_SPLIT_CODES = {None: 0, "train": 1, "val": 2, "test": 3}
_SPLIT_NAMES = (None, "train", "val", "test")


def _lengths(values: pa.Array) -> np.ndarray:
    """Byte length of each value of a string or binary array (0 for null) as int64."""
    return pc.fill_null(pc.binary_length(values), 0).to_numpy().astype(np.int64)


_HEX_VALUES = np.zeros(256, np.int64)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_VALUES[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _buckets_of(ids: pa.Array, level: int) -> np.ndarray:
    """The bucket of each id at ``level``: its hex digits ``[2·level, 2·level + 2)`` as a number (as
    :meth:`_Spill.add` reads them), from the ids' bytes, with no Python str per id."""
    digits = sample_id_array(ids).view(np.uint8).reshape(-1, 64)[:, 2 * level:2 * level + 2]
    return _HEX_VALUES[digits[:, 0]] * 16 + _HEX_VALUES[digits[:, 1]]


class _Spill:
    """256 append-only Arrow IPC files, one per value of the id's hex digits ``[2·level, 2·level + 2)``."""

    def __init__(self, directory: str, level: int, buffer_bytes: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory, self.level, self.buffer_bytes = directory, level, buffer_bytes
        self.sizes = [0] * _FANOUT
        self.rows = [0] * _FANOUT
        self._buffers: dict[int, tuple[list[str], list[str], list[bytes | None], list[int | None]]] = {}
        self._buffered = 0
        self._writers: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = {}

    def _path(self, bucket: int) -> str:
        return os.path.join(self.directory, f"{bucket:02x}.arrows")

    def add(self, sid: str, uri: str, data: bytes | None, reused: int | None = None) -> None:
        bucket = int(sid[2 * self.level: 2 * self.level + 2], 16)
        ids, uris, blobs, sizes = self._buffers.setdefault(bucket, ([], [], [], []))
        ids.append(sid)
        uris.append(uri)
        blobs.append(data)
        sizes.append(reused)
        size = _ROW_OVERHEAD + len(uri) + (len(data) if data is not None else 0)
        self.sizes[bucket] += size + (reused or 0)  # pass 2 holds a reused sample's bytes too
        self.rows[bucket] += 1
        self._buffered += size
        if self._buffered >= self.buffer_bytes:
            self.flush()

    def _writer(self, bucket: int) -> pa.ipc.RecordBatchStreamWriter:
        """The bucket's file's stream writer, opened on first use."""
        if bucket not in self._writers:
            sink = pa.OSFile(self._path(bucket), "wb")
            self._writers[bucket] = (sink, pa.ipc.new_stream(sink, _SPILL_SCHEMA))
        return self._writers[bucket][1]

    def add_reused(self, sids: list[str], uris: list[str], sizes: np.ndarray, buckets: np.ndarray) -> None:
        """Many reused rows (no bytes) at once, ``buckets`` their bucket numbers (see :meth:`add_batch`)."""
        if not len(sids):
            return
        self.add_batch(pa.record_batch([pa.array(sids, pa.string()), pa.array(uris, pa.string()),
                                        pa.nulls(len(sids), pa.binary()), pa.array(sizes, pa.int64())],
                                       schema=_SPILL_SCHEMA), buckets)

    def add_batch(self, batch: pa.RecordBatch, buckets: np.ndarray) -> None:
        """Spill rows (``_SPILL_SCHEMA``) at once, ``buckets`` their bucket numbers: one Arrow batch per bucket
        appended straight to its file (a bucket's file is sorted when read, so its row order does not matter),
        each row weighed as :meth:`add` weighs it but for its URI's UTF-8 bytes (``add`` counts its characters: the
        same for an ASCII URI). No Python object per row: a replayed tar is 10^5 rows, a bucket split again in pass 2
        ~39 000 at 10^7 samples."""
        if not batch.num_rows:
            return
        weight = (_ROW_OVERHEAD + _lengths(batch.column(1)) + _lengths(batch.column(2))
                  + pc.fill_null(batch.column(3), 0).to_numpy())
        order = np.argsort(buckets, kind="stable")
        edges = np.searchsorted(buckets[order], np.arange(_FANOUT + 1))
        for bucket in np.flatnonzero(np.diff(edges)).tolist():
            rows = order[edges[bucket]:edges[bucket + 1]]
            self._writer(bucket).write_batch(batch.take(pa.array(rows)))
            self.rows[bucket] += len(rows)
            self.sizes[bucket] += int(weight[rows].sum())

    def flush(self) -> None:
        for bucket, (ids, uris, blobs, sizes) in self._buffers.items():
            batch = pa.record_batch([pa.array(ids, pa.string()), pa.array(uris, pa.string()),
                                     pa.array(blobs, pa.binary()), pa.array(sizes, pa.int64())],
                                    schema=_SPILL_SCHEMA)
            self._writer(bucket).write_batch(batch)
        self._buffers.clear()
        self._buffered = 0

    def close(self) -> None:
        """Flush and close every file (idempotent); the files can then be read."""
        self.flush()
        for sink, writer in self._writers.values():
            writer.close()
            sink.close()
        self._writers.clear()

    def batches(self, bucket: int) -> Iterator[pa.RecordBatch]:
        with pa.OSFile(self._path(bucket), "rb") as source:
            yield from pa.ipc.open_stream(source)

    def read(self, bucket: int) -> pa.Table:
        with pa.OSFile(self._path(bucket), "rb") as source:
            return pa.ipc.open_stream(source).read_all()

    def remove(self, bucket: int) -> None:
        os.unlink(self._path(bucket))

    def find_uri(self, sid: str) -> str:
        """The spilled URI of ``sid`` (error path only: closes the spill)."""
        self.close()
        bucket = int(sid[2 * self.level: 2 * self.level + 2], 16)
        if not self.rows[bucket]:
            return "?"
        table = self.read(bucket)
        mask = pc.equal(table["sample_id"], sid)
        found = table.filter(mask)["source_uri"].to_pylist()
        return found[0] if found else "?"


@functools.lru_cache(maxsize=4096)
def _json(value: str | None) -> str:
    """One label or split as dataset_version writes it (ASCII JSON; null for None)."""
    return json.dumps(value, ensure_ascii=True)


class _ShardCutter:
    """Takes sorted row tables; writes shards of exactly ``shard_rows`` rows; hashes the dataset version.

    ``kept``: the previous dataset's shards a growth keeps, by run (:meth:`DatasetWriter._kept_shards`); the new
    shards then form one more run, and the version is hashed over every row (``add``'s ``every``)."""

    def __init__(self, store: ArtifactStore, shard_rows: int,
                 kept: tuple[tuple[ShardRef, ...], ...] = ()) -> None:
        self.store, self.shard_rows = store, shard_rows
        self.kept = tuple(run for run in kept if run)
        self.shards: list[ShardRef] = []
        self.new_rows: list[str] = []  # the new-rows files written (storage.ingest.reuse.write_new_rows)
        self.num_rows = 0
        self._pending: deque[pa.Table] = deque()
        self._n_pending = 0
        self._version = hashlib.sha256(_VERSION_HEADER)

    def add(self, table: pa.Table, every: pa.Table | None = None) -> None:
        """Rows to write (sorted, after the previous ``add``'s); ``every``: all the dataset's rows in this id range
        (sample_id, label, split) when some of them are in kept shards — the version covers them too."""
        self._hash(table if every is None else every)
        if not table.num_rows:
            return
        self._pending.append(table)
        self._n_pending += table.num_rows
        while self._n_pending >= self.shard_rows:
            self._cut(self.shard_rows)

    def _hash(self, table: pa.Table) -> None:
        # dataset_version's lines, json.dumps([sid, label, split]) each, built from the JSON of each label and split
        # (few distinct values: memoised) around the id (64 hex digits: nothing to escape): 0.65 µs a row, not 2.7
        # (a bucket of tiny images holds ~10^5 rows: taken 8 192 at a time, not one Python str per row of it)
        for lo in range(0, table.num_rows, 8192):
            part = table.slice(lo, 8192)
            lines = [f'["{sid}",{_json(label)},{_json(split)}]\n' for sid, label, split in
                     zip(*(part[c].to_pylist() for c in ("sample_id", "label", "split")), strict=True)]
            self._version.update("".join(lines).encode("ascii"))

    def _cut(self, n: int) -> None:
        parts, need = [], n
        while need:
            head = self._pending[0]
            if head.num_rows <= need:
                parts.append(self._pending.popleft())
                need -= head.num_rows
            else:
                parts.append(head.slice(0, need))
                self._pending[0] = head.slice(need)
                need = 0
        # not combined into one chunk (a second copy of the shard): with one value a write batch
        # (SAMPLE_PARQUET_OPTIONS) Parquet checks the page size after every value, so chunk boundaries do not move
        # page boundaries and the bytes do not depend on the buckets (tested against write_samples)
        shard = pa.concat_tables(parts)
        fresh = None
        if _FRESH in shard.column_names:  # a growth with reuse: which rows were read now (the new samples)
            fresh = shard.column(_FRESH)
            shard = shard.drop_columns([_FRESH])
        with self.store.writer("samples", ".parquet") as out:  # streamed to staging: no second copy in memory
            pq.write_table(shard, out, row_group_size=self.shard_rows, **SAMPLE_PARQUET_OPTIONS)  # write_samples'
            # own options: the shards are byte-identical (tested)
        if fresh is not None and 0 < pc.sum(fresh).as_py() < shard.num_rows:
            self.new_rows.append(write_new_rows(self.store, out.ref.sha256, shard.filter(fresh)))
        self.shards.append(ShardRef(out.ref, shard.num_rows))
        self.num_rows += shard.num_rows
        self._n_pending -= n

    def finish(self) -> DatasetRef:
        if self._n_pending:
            self._cut(self._n_pending)
        version = self._version.hexdigest()
        runs = [*self.kept, tuple(self.shards)] if self.shards else list(self.kept)
        shards = tuple(sh for run in runs for sh in run)
        num_rows = sum(sh.num_rows for sh in shards)
        manifest = DatasetManifest(version, num_rows, shards,
                                   runs=tuple(len(run) for run in runs) if len(runs) > 1 else ())
        return DatasetRef(self.store.put_bytes(manifest.to_json(), "dataset", ".json"), version, num_rows)


def _equal(a: pa.ChunkedArray | pa.Array, b: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row-wise equality of two string columns as a numpy bool array (null equals null)."""
    eq = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(eq, both_null).to_numpy(zero_copy_only=False)


class _Cursor:
    """A stream of id-sorted tables read by id bound: :meth:`upto` gives the rows up to an id, once each."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self._tables = tables
        self._head: pa.Table | None = None
        self._ids = np.empty(0, "S64")

    def upto(self, last: str) -> pa.Table:
        """The rows not yet given whose sample id is at most ``last``."""
        bound = np.bytes_(last.encode())
        parts = []
        while True:
            if self._head is None:
                self._head = next(self._tables, None)
                if self._head is None:
                    break
                self._ids = sample_id_array(self._head["sample_id"])
            cut = int(np.searchsorted(self._ids, bound, side="right"))
            parts.append(self._head.slice(0, cut))
            if cut < len(self._ids):
                self._head, self._ids = self._head.slice(cut), self._ids[cut:]
                break
            self._head = None
        return pa.concat_tables(parts) if parts else pa.table({"sample_id": pa.array([], pa.string())})

    def close(self) -> None:
        close = getattr(self._tables, "close", None)
        if close is not None:
            close()


class _KeptRows:
    """Which of pass 2's sorted rows are in kept shards, from what :meth:`DatasetWriter._kept_shards` recorded of
    each level-0 bucket on disk (the positions of its matched rows in the bucket's sorted order, and their previous
    shard): no second read of the kept shards' ids, and one bucket's flags in memory (a bool a row).

    Pass 2 reads a level-0 bucket's rows in the same order, its sub-buckets (split again by the next hex digits)
    being consecutive slices of it: :meth:`start` a level-0 bucket, then :meth:`take` each sorted table's flags in
    turn. ``not_fetched``: per level-0 bucket, the reused bytes of its rows in kept shards (dropped, never fetched:
    not counted in its size for splitting it again)."""

    def __init__(self, directory: str, kept: np.ndarray, not_fetched: list[int]) -> None:
        self.directory, self.kept, self.not_fetched = directory, kept, not_fetched
        self._flags, self._at, self._bucket = np.zeros(0, bool), 0, -1

    @staticmethod
    def path(directory: str, bucket: int) -> str:
        return os.path.join(directory, f"{bucket:02x}.npy")

    def start(self, bucket: int, rows: int) -> None:
        """The level-0 ``bucket`` (``rows`` rows) is read next."""
        self._check()
        self._flags, self._at, self._bucket = np.zeros(rows, bool), 0, bucket
        path = self.path(self.directory, bucket)
        if os.path.exists(path):
            positions, shards = np.load(path)
            self._flags[positions[np.isin(shards, self.kept)]] = True

    def take(self, n: int) -> np.ndarray:
        """Whether each of the bucket's next ``n`` sorted rows is in a kept shard."""
        if self._at + n > len(self._flags):
            raise RuntimeError(f"pass 2 read more rows of bucket {self._bucket:02x} than it holds")
        self._at += n
        return self._flags[self._at - n:self._at]

    def _check(self) -> None:
        if self._at != len(self._flags):
            raise RuntimeError(f"pass 2 read {self._at} of the {len(self._flags)} rows of bucket {self._bucket:02x}")


def _spill_root(store: ArtifactStore) -> str | None:
    """The store's staging folder (swept of old leftovers by ``clean_staging``), created if needed."""
    root = store.staging_dir()  # <store>/tmp, or this user's private staging folder for a remote store
    if root is not None:
        os.makedirs(root, exist_ok=True)
    return root


class DatasetWriter:
    """Streams one pool into a dataset (see the module docstring). Use as a context manager::

        with DatasetWriter(store, source_name="image folder /pool", ...) as writer:
            writer.add(sid, uri, label, None, data)      # or writer.quarantine(uri, reason)
            result = writer.finish(source="file:///pool")

    ``source_name`` starts every pool-level error message (e.g. ``image folder /pool has no usable samples``).
    """

    def __init__(self, store: ArtifactStore, *, source_name: str, shard_rows: int, seed: int, val_fraction: float,
                 test_fraction: float, buffer_bytes: int = SPILL_BUFFER_BYTES,
                 bucket_bytes: int = BUCKET_BYTES, base: BaseSamples | None = None) -> None:
        self.store = store
        self.base = base  # where reused samples' bytes come from (add(..., reused=size))
        self.n_reused = 0
        self.n_kept = 0  # with a base: rows of the previous dataset's shards kept as they are (set by finish)
        self.new_rows: list[str] = []  # with a base: the new-rows files of the shards written (set by finish)
        self.source_name = source_name
        self.shard_rows, self.seed = shard_rows, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.bucket_bytes = bucket_bytes
        self.quarantined: list[tuple[str, str]] = []
        self.n_duplicates = 0
        self._seen = IdCodes()  # sample id digest → label index · 4 + split code (~45 bytes a sample)
        self._label_index: dict[str, int] = {}
        self._labels: list[str] = []
        # named like the store's other staging debris (".<32 hex>-"), so a killed run's spill is swept with it
        self._dir = tempfile.mkdtemp(prefix=f".{uuid.uuid4().hex}-ingest-", dir=_spill_root(store))
        self._spill = _Spill(os.path.join(self._dir, "spill"), 0, buffer_bytes)
        self._touched = time.monotonic()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill folder and drop the per-sample bookkeeping (idempotent)."""
        self._seen = IdCodes()  # a pool's worth of ids: not needed once the dataset is written
        try:
            self._spill.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            if self.base is not None:
                self.base.close()

    # ------------------------------------------------------------------ pass 1
    def add(self, sid: str, uri: str, label: str, split: str | None, data: bytes | None,
            reused: int | None = None) -> None:
        """One usable sample, in source order. Duplicates collapse to the first; conflicts raise SourceError.

        ``reused``: the sample's byte count when its bytes are not read now but come from the writer's ``base``
        (the previous dataset; ``data`` is then None)."""
        if reused is not None:
            if self.base is None or data is not None:
                raise ValueError("a reused sample needs the writer's base dataset and no data")
            self.n_reused += 1
        index = self._label_index.get(label)
        if index is None:
            index = self._label_index[label] = len(self._labels)
            self._labels.append(label)
        key = bytes.fromhex(sid)
        split_code = _SPLIT_CODES[split]
        prev = self._seen.setdefault(key, index << 2 | split_code)
        if prev is None:
            self._spill.add(sid, uri, data, reused)
            self._keep_alive()
            return
        prev_label, prev_split = self._labels[prev >> 2], _SPLIT_NAMES[prev & 3]
        if prev_label != label:
            raise SourceError(f"the same sample ({sid[:12]}…) has conflicting labels {prev_label!r} at "
                              f"{self._spill.find_uri(sid)} and {label!r} at {uri}")
        if prev_split and split and prev_split != split:
            raise SourceError(f"the same sample ({sid[:12]}…) has conflicting splits {prev_split!r} at "
                              f"{self._spill.find_uri(sid)} and {split!r} at {uri}")
        if prev_split is None and split is not None:
            self._seen.set(key, prev | split_code)  # an explicit split wins over a hashed one, whichever came first
        self.n_duplicates += 1

    def add_reused(self, members: list[tuple[str, str, str, int]]) -> None:
        """Many reused samples at once, in source order — ``(source_uri, sample id, label, byte count)`` each,
        with no explicit split (a replayed WebDataset tar's member list): the same as :meth:`add` of each, in one
        vectorised step (a growth replays 10^5 members a tar; one ``add`` each was most of its time)."""
        if not members:
            return
        if self.base is None:
            raise ValueError("a reused sample needs the writer's base dataset")
        uris, sids, labels, sizes = (list(col) for col in zip(*members, strict=True))
        index = self._label_index
        for label in set(labels):
            if label not in index:
                index[label] = len(self._labels)
                self._labels.append(label)
        label_codes = np.fromiter((index[label] for label in labels), np.int64, len(labels))
        keys = digests_of_hex(sids)
        before = self._seen.setdefault_many(keys, label_codes << 2)  # split code 0: hashed later
        new = before < 0
        self.n_reused += len(members)
        fresh = np.flatnonzero(new)
        self._spill.add_reused([sids[i] for i in fresh], [uris[i] for i in fresh],
                               np.asarray(sizes, np.int64)[fresh], keys.view(np.uint8).reshape(-1, 32)[fresh, 0])
        self._keep_alive()
        seen = np.flatnonzero(~new)
        clash = seen[(before[seen] >> 2) != label_codes[seen]]
        if len(clash):  # the first in source order, as add() would have stopped there
            i = int(clash[0])
            raise SourceError(f"the same sample ({sids[i][:12]}…) has conflicting labels "
                              f"{self._labels[int(before[i]) >> 2]!r} at {self._spill.find_uri(sids[i])} and "
                              f"{labels[i]!r} at {uris[i]}")
        self.n_duplicates += len(seen)

    def _keep_alive(self) -> None:
        """Refresh the spill folder's mtime now and then: a cleaner removes only staging debris older than a day,
        and an ingest of millions of files may run longer than that."""
        now = time.monotonic()
        if now - self._touched > _TOUCH_EVERY_S:
            self._touched = now
            os.utime(self._dir)

    def quarantine(self, uri: str, reason: str) -> None:
        """One rejected input (kept in source order; the table is sorted when written)."""
        self.quarantined.append((uri, reason))

    # ------------------------------------------------------------------ checks
    def _validate(self) -> tuple[tuple[str, ...], dict[str, int]]:
        """Assign hashed splits and check the pool; SourceError before anything is published."""
        quarantined = self.quarantined
        bad = (f"; {len(quarantined)} input(s) quarantined, e.g. {quarantined[0][0]}: {quarantined[0][1]}"
               if quarantined else "")
        if not self._seen:
            raise SourceError(f"{self.source_name} has no usable samples{bad}")
        used: set[int] = set()
        for _, codes in self._seen.buckets():
            used.update(np.unique(codes >> 2).tolist())
        classes = tuple(sorted(self._labels[i] for i in used))
        if len(classes) < 2:
            raise SourceError(f"{self.source_name} needs at least 2 classes with usable samples; found "
                              f"{len(classes)} ({', '.join(map(repr, classes))}){bad}")
        counts: Counter[str] = Counter()
        train_labels: set[int] = set()
        for keys, codes in self._seen.buckets():  # hashed splits for the samples the source gave none
            todo = np.flatnonzero((codes & 3) == 0)
            if len(todo):  # split_codes' 1 / 2 / 3 are _SPLIT_CODES' train / val / test
                codes[todo] |= split_codes(keys[todo], self.seed, self.val_fraction, self.test_fraction)
            splits = codes & 3
            for code, name in enumerate(_SPLIT_NAMES[1:], start=1):
                counts[name] += int(np.count_nonzero(splits == code))
            train_labels.update(np.unique(codes[splits == _SPLIT_CODES["train"]] >> 2).tolist())
        if len(train_labels) < 2:
            names = sorted(self._labels[i] for i in train_labels)
            raise SourceError(f"{self.source_name}: the train split holds {len(names)} class(es) "
                              f"({', '.join(map(repr, names))}); it needs at least 2 — add samples, "
                              "lower val_fraction/test_fraction, or try another seed")
        split_counts = {s: counts.get(s, 0) for s in SPLITS}
        for s in ("val", "test"):
            if split_counts[s] == 0:
                log.warning("%s: the %s split is empty (%d samples)", redact(self.source_name), s,
                            len(self._seen))
        return classes, split_counts

    # ------------------------------------------------------------------ pass 2
    def _rows(self, table: pa.Table) -> pa.Table:
        """A sorted spill table (id, uri, data, reused) as sample rows (labels and splits from the bookkeeping;
        a reused sample's bytes from the base dataset), built in Arrow: no Python object per image."""
        codes = self._seen.codes_of(digests_of_hex(table["sample_id"]))
        labels = pa.array(self._labels, pa.string()).take(pa.array(codes >> 2))
        splits = pa.array(_SPLIT_NAMES, pa.string()).take(pa.array(codes & 3))
        data = table["data"]
        is_reused = table["reused"].is_valid()
        reused = np.flatnonzero(is_reused.to_numpy(zero_copy_only=False))
        if len(reused):
            ids, uris = table["sample_id"].take(reused).to_pylist(), table["source_uri"].take(reused).to_pylist()
            filled = self.base.fill(ids, uris)  # in the rows' order: each goes to the next reused (null) place
            data = pc.replace_with_mask(data.combine_chunks(), is_reused.combine_chunks(), filled)
        rows = pa.table([table["sample_id"], table["source_uri"], labels, splits, data], schema=SAMPLE_SCHEMA)
        if self.base is not None:  # the cutter writes each shard's new rows aside for the embed stage
            rows = rows.append_column(_FRESH, pc.invert(is_reused))
        return rows

    def _drain(self, spill: _Spill, cutter: _ShardCutter, drop: _KeptRows | None = None) -> None:
        """Write the spill's rows, bucket by bucket in id order (``drop``: which rows are in kept shards, and how
        many bytes of a level-0 bucket are theirs); a bucket larger than ``bucket_bytes`` is split again first."""
        spill.close()
        for bucket in range(_FANOUT):
            if not spill.rows[bucket]:
                continue
            size = spill.sizes[bucket]
            if drop is not None and spill.level == 0:
                drop.start(bucket, spill.rows[bucket])
                size -= drop.not_fetched[bucket]
            if size > self.bucket_bytes and spill.rows[bucket] > 1 and spill.level < 31:
                sub = _Spill(os.path.join(spill.directory, f"{bucket:02x}"), spill.level + 1, spill.buffer_bytes)
                for batch in spill.batches(bucket):  # a batch at a time, one take per sub-bucket
                    sub.add_batch(batch, _buckets_of(batch.column(0), sub.level))
                spill.remove(bucket)
                self._drain(sub, cutter, drop)  # its sizes count kept rows' bytes: rarely matters one level down
                shutil.rmtree(sub.directory, ignore_errors=True)
                continue
            table = spill.read(bucket)
            spill.remove(bucket)
            table = table.take(pc.sort_indices(table["sample_id"]))
            if drop is None:
                cutter.add(self._rows(table))
                continue
            kept = pa.array(drop.take(table.num_rows))
            cutter.add(self._rows(table.filter(pc.invert(kept))), every=self._labelled(table))
        if drop is not None and spill.level == 0:
            drop.start(_FANOUT, 0)  # checks that the last bucket was read whole

    def finish(self, source: str, vectors: Callable[[], VectorTableRef] | None = None) -> IngestResult:
        """Validate, then write quarantine, shards, manifest (and ``vectors()``, if given); the result."""
        classes, split_counts = self._validate()
        qref = self._write_quarantine()
        kept, drop = self._kept_shards()
        cutter = _ShardCutter(self.store, self.shard_rows, kept)
        if any(kept):
            self.n_kept = sum(sh.num_rows for run in kept for sh in run)
            self.base.keep({sh.artifact.uri for run in kept for sh in run})
            self._drain(self._spill, cutter, drop)
        else:
            self._drain(self._spill, cutter)
        dataset = cutter.finish()
        self.new_rows = cutter.new_rows
        result = IngestResult(dataset=dataset, quarantine=qref, n_samples=dataset.num_rows,
                              n_duplicates_collapsed=self.n_duplicates, n_quarantined=len(self.quarantined),
                              classes=classes, split_counts=split_counts,
                              vectors=vectors() if vectors is not None else None, source=redact(source),
                              n_reused=self.n_reused, n_kept=self.n_kept)
        log.info("ingested %s: %d samples, %d classes, splits %s, %d duplicates collapsed, %d quarantined, %d "
                 "files unchanged (not read), %d samples in kept shards (not written again)", result.source,
                 result.n_samples, len(result.classes), result.split_counts, result.n_duplicates_collapsed,
                 result.n_quarantined, result.n_reused, result.n_kept)
        return result

    def _labelled(self, table: pa.Table) -> pa.Table:
        """sample_id, label and split of sorted spill rows (labels and splits from the bookkeeping)."""
        codes = self._seen.codes_of(digests_of_hex(table["sample_id"]))
        return pa.table({"sample_id": table["sample_id"],
                         "label": pa.array(self._labels, pa.string()).take(pa.array(codes >> 2)),
                         "split": pa.array(_SPLIT_NAMES, pa.string()).take(pa.array(codes & 3))})

    def _spilled_metadata(self) -> Iterator[tuple[int, pa.Table]]:
        """Every spilled row's sample_id, source_uri and reused (byte count), sorted, a level-0 bucket at a time, with
        the bucket's number (no image bytes held: a bucket's rows without them are ~200 bytes each)."""
        self._spill.close()
        names = ("sample_id", "source_uri", "reused")
        for bucket in range(_FANOUT):
            if not self._spill.rows[bucket]:
                continue
            # copied out of each batch: an IPC batch's columns are slices of one buffer, its data column's bytes
            # included, so a selection of them would hold the whole bucket's read-now images
            parts = [pa.table({c: pa.concat_arrays([b.column(c)]) for c in names})
                     for b in self._spill.batches(bucket)]
            table = pa.concat_tables(parts)
            del parts
            yield bucket, table.take(pc.sort_indices(table["sample_id"]))

    def _kept_shards(self) -> tuple[tuple[tuple[ShardRef, ...], ...], _KeptRows | None]:
        """The previous dataset's shards a growth keeps as they are, by run: those whose every row is a sample of
        this pool with the same source_uri, label and split, whether its file was read now or not (the same id is
        the same bytes: a file read again for another reason — its tar has a quarantined member, it changed less
        than SETTLE_NS ago, its store gives no content tag — must not cost the shards its samples are in). Their
        rows are then not written again, and their images not read; the new rows form a new run. None without a
        previous dataset.

        Also which spilled rows are in them (:class:`_KeptRows`; None without a previous dataset): the join finds
        them, each level-0 bucket's matches are saved beside the spill (two int32 a matched row), so pass 2 drops
        them without reading the kept shards' ids again. And, per level-0 bucket, the reused bytes of its rows in
        kept shards: pass 2 never fetches them, so a bucket's size for splitting it again leaves them out (at 10^7
        samples they are ~2.2 GB a bucket, nearly all of its count).

        Compaction: the grown dataset has at most :data:`MAX_RUNS` runs. When the previous one already has that many,
        the shards of its smallest runs are not kept (their rows join the new run) — a tiered merge: a nightly
        growth rewrites its new samples plus the smallest run, never the whole pool."""
        if self.base is None:
            return (), None
        manifest = self.base.manifest
        runs = manifest.shard_runs()
        fold = set(sorted(range(len(runs)), key=lambda r: (sum(sh.num_rows for sh in runs[r]), -r))
                   [:max(0, len(runs) - max(MAX_RUNS - 1, 0))])  # the smallest (newest first among equals)
        if fold:
            log.info("the previous dataset has %d runs: the rows of %d of them are written again with the new "
                     "samples", len(runs), len(fold))
        if len(fold) == len(runs):
            return (), None
        matched = np.zeros(len(manifest.shards), np.int64)
        # per bucket: the previous shards its matched rows are in, and those rows' reused bytes by shard (a bucket
        # meets the few shards of each run that cover its id range: ~ shards + 256 · runs pairs in all)
        reused_by_shard: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        matches = os.path.join(self._dir, "kept")
        os.makedirs(matches, exist_ok=True)
        previous = _Cursor(merge_sorted_tables(self.base.metadata()))
        try:
            for bucket, table in self._spilled_metadata():
                before = previous.upto(table["sample_id"][-1].as_py())
                if not before.num_rows:
                    continue
                ids = sample_id_array(table["sample_id"])
                want = sample_id_array(before["sample_id"])
                pos = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
                found = ids[pos] == want
                labelled = self._labelled(table)
                at = pa.array(pos)
                same = (found
                        & _equal(before["source_uri"], table["source_uri"].take(at))
                        & _equal(before["label"], labelled["label"].take(at))
                        & _equal(before["split"], labelled["split"].take(at)))
                shard = before["shard"].to_numpy()
                matched += np.bincount(shard[same], minlength=len(matched))
                reused = pc.fill_null(table["reused"], 0).to_numpy()[pos[same]]
                shards, at_shard = np.unique(shard[same], return_inverse=True)
                reused_by_shard[bucket] = shards, np.bincount(at_shard, weights=reused, minlength=len(shards))
                np.save(_KeptRows.path(matches, bucket), np.stack([pos[same], shard[same]]).astype(np.int32))
        finally:
            previous.close()
        keep = {i for i, sh in enumerate(manifest.shards) if matched[i] == sh.num_rows}
        out, kept, k = [], [], 0
        for r, run in enumerate(runs):
            chosen = () if r in fold else tuple(i for i in range(k, k + len(run)) if i in keep)
            out.append(tuple(run[i - k] for i in chosen))
            kept.extend(chosen)
            k += len(run)
        not_fetched = [0] * _FANOUT
        for bucket, (shards, reused_bytes) in reused_by_shard.items():
            not_fetched[bucket] = int(reused_bytes[np.isin(shards, kept)].sum())
        return tuple(out), _KeptRows(matches, np.array(kept, np.int64), not_fetched)

    def _write_quarantine(self) -> ArtifactRef | None:
        if not self.quarantined:
            return None
        rows = sorted(self.quarantined)
        table = pa.table({"source_uri": [r[0] for r in rows], "reason": [r[1] for r in rows]},
                         schema=QUARANTINE_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **_PARQUET_OPTIONS)
        return self.store.put_bytes(sink.getvalue().to_pybytes(), "quarantine", ".parquet")
