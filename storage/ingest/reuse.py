"""Reuse yesterday's ingest for files that did not change: a grown pool reads only its new files.

Why: a nightly run on a pool grown by 1 % used to read (and hash) every file again, because the new samples land
in every shard (shards are cut from the rows sorted by sample id) and the shards carry the image bytes. At 10^7
images of ~56 KB that is 560 GB read from the source — hours, and for a remote pool 10^7 GET requests — to find
10^5 new images. The bytes are already in the store, in the previous dataset's shards, in sample-id order.

- :class:`SourceHashes` is DVC's hash cache: for every file an ingest accepted, a 16-byte key over its location and
  what the filesystem says about it (size, ``mtime_ns``, ``ctime_ns``, inode, device, mode) → its sample id.
  ``ctime`` cannot be set by a tool (``touch -d``, ``rsync -a`` set ``mtime`` only), so a file rewritten in place
  with its size and modification time restored still gets a new key — the fingerprint's DVC caveat does not
  apply here. A listed file whose key is recorded is not opened: its sample id comes from the record.
- :class:`BaseSamples` gives the writer the bytes of those samples in its second pass, which walks the rows in
  sample-id order: it reads the previous dataset's shards that are not kept once, in order (the runs of a grown
  dataset merged), a batch ahead on a background thread,
  and checks each image against its id (sha256 of the bytes). A row whose bytes do not hash to its id, or a
  shard that fails while read, is read from its source file instead (and checked the same way; a file that
  changed meanwhile is a SourceError asking for a rerun). Shards that are gone or have the wrong size are found
  before the listing (:func:`lost_ranges`: one size check a shard, the footers of their neighbours), and the files
  whose samples they held are read in the first pass like new ones: a WebDataset member can only be read again
  by scanning its tar, so one fallback read per sample would scan a tar per sample.

So the dataset written has the rows and version of a from-scratch ingest of the same files (tested), and an ingest
reads its new files once; the previous shards that are kept as they are (:mod:`storage.ingest.writer`: all their
rows unchanged) are read for their metadata only, the others once, and only the new run's shards are written. It
also leaves each new shard's
rows that were read now — the new samples, ~1 % of a shard at a 1 % growth — in a small side file
(:func:`write_new_rows`), so that the embed stage reads a changed shard's id column and those rows instead of the
shard's images; the next growth's ingest removes them.

What is not keyed (always read): a file changed less than :data:`SETTLE_NS` before its stat (a rewrite within the
filesystem's timestamp granularity would keep its stat: git's "racily clean" rule), a file this process cannot
open (a from-scratch ingest would quarantine it), and objects outside S3, GCS and Azure (an HTTP ETag is often
made of size and mtime).

Layout: ``catalog/source-hashes/<scope>/<time_ns>-<sha256>.hashes``, one immutable file per ingest (written only
after its dataset was published; the older ones of the scope are then removed): a JSON header line (format, the
decode-check policy, the dataset the samples are in) and the sorted records, 48 bytes each (key, raw sample id).
The scope is the source (kind and location); the newest file that hashes to its name is used, and only if its
decode-check policy is the current one (the reused samples passed that check; another policy reads everything).

Memory: 48 bytes per file for the loaded record (held as the file's bytes, not copied) and 48 per file for the one
being built (sorted in place; writing it copies it once): ~1 GB at 10^7 files at the peak, on top of the writer's
~45 bytes a sample.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_to_bytes, urlparse

import numpy as np
import pyarrow as pa

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactStore, _translate
from storage.datasets import DatasetRef, ShardRef, load_manifest, sample_id_array
from storage.errors import StorageError, redact
from storage.ingest.common import CONTENT_TAGS, SourceError, is_url, read_record
from storage.ingest.reading import SourceFiles, ordered_map
from storage.sample_reader import _open_shard  # the checked shard opening (size against the ref, schema, rows)
from storage.sorted_merge import merge_sorted_tables

__all__ = ["HASHES_PREFIX", "NEW_ROWS_PREFIX", "SETTLE_NS", "BaseSamples", "SourceHashes", "file_key",
           "new_rows_path", "object_key", "read_new_rows", "read_tar_members", "readable", "source_key", "uri_path",
           "write_new_rows", "write_tar_members"]

log = logging.getLogger(__name__)

HASHES_PREFIX = "catalog/source-hashes"
_FORMAT = "skmm.source-hashes/1"
_RECORD = np.dtype([("key", "S16"), ("sid", "V32")])  # every key is exactly 16 bytes: NUL padding never merges two
_NAME = re.compile(r"^(\d{20})-([0-9a-f]{64})\.hashes$")
METADATA_READERS = 4  # shards whose metadata a growth reads at once, per run of the previous dataset
BASE_BATCH_ROWS = 256  # base rows checked and held at a time (~14 MB of ~56 KB images), one batch read ahead
_KEY_HEADER = b"skmm-source-file/1\0"
_OBJECT_HEADER = b"skmm-source-object/1\0"
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
SETTLE_NS = 2_000_000_000  # a file changed less than this before its stat gets no key (coarse timestamps)


def file_key(path: str, st: os.stat_result, now_ns: int | None = None) -> bytes | None:
    """The 16-byte key of a local file as listed: its path and its stat (size, mtime, ctime, inode, device,
    mode). Any write to the file changes its ctime, so any change of the bytes changes the key — unless it
    lands within the filesystem's timestamp granularity of the stat: a file changed less than
    :data:`SETTLE_NS` before ``now_ns`` (default: now) gets no key (it is read, and recorded once it has settled;
    git's "racily clean" rule)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLE_NS:
        return None
    meta = f"{st.st_size},{st.st_mtime_ns},{st.st_ctime_ns},{st.st_ino},{st.st_dev},{st.st_mode}"
    return hashlib.sha256(b"".join((_KEY_HEADER, os.fsencode(path), b"\0", meta.encode()))).digest()[:16]


def uri_path(uri: str) -> str:
    """The local path of a ``file://`` URI as :meth:`pathlib.Path.as_uri` wrote it (bytes that are not UTF-8
    included: percent-escapes are undone as bytes, then decoded the filesystem's way)."""
    return os.fsdecode(unquote_to_bytes(urlparse(uri).path))


def readable(target: str) -> bool:
    """Whether this process can open a local file now (a reused file is not read, but one it could not read would
    be quarantined by a from-scratch ingest, so it is read — and quarantined — instead of reused). A URL: True —
    its metadata request, which needs read access on an object store, just succeeded."""
    if is_url(target):
        return True
    try:
        os.close(os.open(target, os.O_RDONLY))
    except OSError:
        return False
    return True


def source_key(target: str, files: SourceFiles | None = None) -> tuple[bytes | None, int | None]:
    """(key, byte count) of a source file or object as the sources list it — a local path (links followed: its
    stat, :func:`file_key`) or a URL (``files.info``, :func:`object_key`) —, or (None, None) when it is to be read
    anyway: not a regular file, too recently changed, no content tag, a URL carrying credentials (the fallback
    read could not use its redacted URI), or any error (the read reports it, and retries what may pass). Taken
    before the read: a write after it changes the key seen next time."""
    try:
        if not is_url(target):
            st = os.stat(target)
            key = file_key(target, st) if stat.S_ISREG(st.st_mode) else None
            return (key, st.st_size) if key is not None else (None, None)
        if files is None or redact(target) != target:
            return None, None
        info = files.info(target)
        key = object_key(target, info)
        return (key, int(info["size"])) if key is not None else (None, None)
    except Exception:
        return None, None


def object_key(url: str, info: Mapping[str, Any]) -> bytes | None:
    """The 16-byte key of a remote object on an object store (S3, GCS, Azure): its URL, size and content tags
    (fsspec ``info``: S3's ETag is a digest of the content, GCS's generation and Azure's etag change with every
    write); None elsewhere — an HTTP server's ETag is often made of the file's size and mtime, and a weak ETag
    (``W/…``) promises nothing — and when the store gives no content tag: the object is then read."""
    if url.split("://", 1)[0].lower() not in _OBJECT_STORES:
        return None
    tags = [[k, str(info[k])] for k in CONTENT_TAGS if info.get(k) not in (None, "")]
    if not tags or not isinstance(info.get("size"), int) or any(v.startswith("W/") for _, v in tags):
        return None
    meta = json.dumps([info["size"], tags], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"".join((_OBJECT_HEADER, url.encode("utf-8"), b"\0", meta.encode()))).digest()[:16]


_ABOVE_ALL_IDS = "g"  # sorts after every lowercase hex id


def shards_present(store: ArtifactStore, shards: tuple[ShardRef, ...]) -> list[bool]:
    """Whether each shard is in ``store`` with its ref's size (one size request a shard, 16 in flight)."""
    def present(shard: ShardRef) -> bool:
        try:
            return store.fs.size(store._path(store._rel_from_uri(shard.artifact.uri))) == shard.artifact.size
        except Exception as exc:  # gone, or refused (S3 answers a HEAD on a missing key with 403 without
            error = _translate(exc, shard.artifact.uri)  # ListBucket): lost; a store that may come back: retry
            if error.transient:
                raise error from None
            return False

    return list(ordered_map(present, shards, workers=16))


def lost_ranges(store: ArtifactStore, shards: tuple[ShardRef, ...],
                present: list[bool] | None = None) -> list[tuple[str, str]]:
    """The sample-id intervals ``(lo, hi)``, both bounds excluded, that the dataset's shards gone from ``store``
    (or of another size than their refs; ``present``: :func:`shards_present`, computed if not given) held,
    sorted: each run of such shards spans from the largest id of the readable shard before it to the smallest of
    the one after (their footers' statistics); an empty list when all are there. A neighbour whose footer cannot
    tell joins the run."""
    ok = present if present is not None else shards_present(store, shards)
    if all(ok):
        return []

    def bound(i: int, which: str) -> str | None:  # the smallest / largest id of shard i, from its footer
        try:
            with _open_shard(store, shards[i], []) as parquet:
                meta = parquet.metadata
                col = parquet.schema_arrow.get_field_index("sample_id")
                stats = [meta.row_group(g).column(col).statistics for g in range(meta.num_row_groups)]
        except StorageError as exc:
            if exc.transient:
                raise
            return None
        if not stats or any(st is None or not st.has_min_max for st in stats):
            return None
        return str(stats[0].min) if which == "min" else str(stats[-1].max)

    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(shards):
        if ok[i]:
            i += 1
            continue
        lo_i, hi_i = i - 1, i + 1
        while hi_i < len(shards) and not ok[hi_i]:
            hi_i += 1
        lo = None
        while lo is None and lo_i >= 0:
            lo = bound(lo_i, "max") if ok[lo_i] else None
            lo_i -= lo is None
        hi = None
        while hi is None and hi_i < len(shards):
            hi = bound(hi_i, "min") if ok[hi_i] else None
            hi_i += hi is None
        lo, hi = lo or "", hi or _ABOVE_ALL_IDS
        if ranges and lo < ranges[-1][1]:  # reaches into the previous run (neighbours without footers): join them
            lo = ranges.pop()[0]
        ranges.append((lo, hi))
        i = hi_i if hi_i > i else i + 1
    return ranges


def runs_lost_ranges(store: ArtifactStore, runs: tuple[tuple[ShardRef, ...], ...],
                     present: list[bool]) -> list[tuple[str, str]]:
    """:func:`lost_ranges` of a dataset of several runs (``present`` for all shards, in run order): each run's
    ranges, their union sorted — a run's lost interval also spans the other runs' samples in it, which are then
    read again too (more reading, never a wrong dataset)."""
    ranges: list[tuple[str, str]] = []
    lo = 0
    for run in runs:
        ranges += lost_ranges(store, run, present[lo:lo + len(run)])
        lo += len(run)
    merged: list[tuple[str, str]] = []
    for a, b in sorted(ranges):
        if merged and a < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class SourceHashes:
    """The record of one source's files (see the module docstring): :meth:`load` the last one, :meth:`lookup`
    a listed file's key, :meth:`record` every accepted file of this ingest, :meth:`commit` once it is published.

    ``scope``: what identifies the source (kind and location); ``policy``: the decode check's policy dict."""

    def __init__(self, store: ArtifactStore, scope: Mapping[str, Any], policy: Mapping[str, Any]) -> None:
        self.store = store
        self.prefix = f"{HASHES_PREFIX}/{hashlib.sha256(canonical_json(dict(scope)).encode()).hexdigest()}"
        self.policy = hashlib.sha256(canonical_json(dict(policy)).encode()).hexdigest()
        self._old_new_rows: list[str] = []  # the last record's new-rows files (removed once superseded)
        self._lost: list[tuple[str, str]] = []  # id ranges of the loaded record's dataset in shards that are gone
        self._lost_lows: list[str] = []
        self.lost_shards: set[str] = set()  # the URIs of those shards (BaseSamples does not try them)
        self._records = np.empty(0, _RECORD)  # the loaded record (views on its bytes), sorted by key
        self._fresh = bytearray()  # this ingest's records, 48 bytes each

    def __repr__(self) -> str:
        return f"SourceHashes({self.store!r}, {self.prefix!r})"

    def _files(self) -> list[str]:
        """The scope's record files, newest first."""
        rels = [r for r in self.store.list_paths(self.prefix, "*.hashes") if _NAME.match(r.rsplit("/", 1)[-1])]
        return sorted(rels, key=lambda r: r.rsplit("/", 1)[-1], reverse=True)

    def load(self) -> DatasetRef | None:
        """Read the newest valid record of this scope; the dataset its samples are in, or None (nothing to reuse:
        no record, a corrupted one, another decode-check policy, or a dataset that is gone)."""
        for rel in self._files()[:1]:
            where = self.store.uri(rel)
            data = read_record(self.store, rel, "source-hash record", "every file is read", log)
            if data is None:
                return None
            name = _NAME.match(rel.rsplit("/", 1)[-1])
            end = data.find(b"\n")
            try:
                if name is None or hashlib.sha256(data).hexdigest() != name[2] or end < 0:
                    raise ValueError("its bytes do not hash to its name")
                head = json.loads(data[:end])
                body = memoryview(data)[end + 1:]  # a view: the record is held once
                if head.get("format") != _FORMAT or len(body) != int(head["n"]) * _RECORD.itemsize:
                    raise ValueError("not a source-hash record")
                base = DatasetRef.from_dict(head["dataset"])
            except (ValueError, KeyError, TypeError, StorageError) as exc:
                log.warning("source-hash record %s is corrupted (%s): ignored, every file is read", where, exc)
                return None
            if head.get("policy") != self.policy:
                log.info("source-hash record %s was made under another decode-check policy: every file is read",
                         where)
                return None
            try:
                manifest = load_manifest(self.store, base)
                shards = manifest.shards
                present = shards_present(self.store, shards)
                self._lost = runs_lost_ranges(self.store, manifest.shard_runs(), present)
                self._lost_lows = [lo for lo, _ in self._lost]
                self.lost_shards = {sh.artifact.uri for sh, ok in zip(shards, present, strict=True) if not ok}
            except StorageError as exc:
                if exc.transient:
                    raise
                log.warning("the dataset of source-hash record %s is unreadable (%s): every file is read", where, exc)
                return None
            if self._lost:
                log.warning("%d range(s) of sample ids of the previous dataset %s are in shards that are gone or "
                            "damaged: the files holding them are read again", len(self._lost), base.manifest.uri)
            self._old_new_rows = [r for r in head.get("new_rows", []) if isinstance(r, str)
                                  and _NEW_ROWS_NAME.match(r)]
            self._records = np.frombuffer(body, _RECORD)  # read-only views on the file's bytes: no copy
            return base
        return None

    def lookup(self, key: bytes) -> str | None:
        """The sample id recorded for a file with this key, or None."""
        keys = self._records["key"]  # a strided view: searchsorted does not copy it
        if not len(keys):
            return None
        probe = np.array(key, "S16")
        pos = int(np.searchsorted(keys, probe))
        if pos < len(keys) and bool(keys[pos] == probe):  # as arrays: an item loses trailing NULs
            return self._records["sid"][pos].tobytes().hex()
        return None

    def reusable(self, key: bytes | None, target: str) -> str | None:
        """The recorded sample id of a listed file (a local path or URL) with this ``key`` when its bytes can be
        taken from the previous dataset: recorded, not in a lost shard, and openable now; else None (it is read)."""
        sid = self.lookup(key) if key is not None else None
        return sid if sid is not None and not self.lost(sid) and readable(target) else None

    def lost(self, sid: str) -> bool:
        """Whether sample ``sid`` was in a shard of the loaded record's dataset that is gone (:func:`lost_ranges`):
        its file is then read, not reused."""
        k = bisect.bisect_right(self._lost_lows, sid) - 1  # the ranges are sorted and disjoint
        return k >= 0 and self._lost[k][0] < sid < self._lost[k][1]

    def record(self, key: bytes, sid: str) -> None:
        """One file this ingest accepted (read now, or found unchanged)."""
        self._fresh += key
        self._fresh += bytes.fromhex(sid)

    def values(self) -> set[str]:
        """The distinct values of the loaded record (hex): for WebDataset scopes, the member lists it names."""
        return {value.tobytes().hex() for value in self._records["sid"]}

    def release(self) -> None:
        """Drop the loaded record (the listing is done; only :meth:`commit` needs this ingest's records)."""
        self._records = np.empty(0, _RECORD)

    def commit(self, dataset: DatasetRef, new_rows: list[str] | None = None) -> str | None:
        """Write this ingest's records (the files of ``dataset``; ``new_rows``: the new-rows files its writer left
        for the embed stage), then remove the scope's older record files and the new-rows files they named; the
        new file's URI (None when no file was accepted)."""
        fresh, self._fresh = self._fresh, bytearray()
        if not fresh:
            return None
        records = np.frombuffer(fresh, _RECORD)  # a writable view: sorted in place, no copy of a pool's records
        records.sort(order="key", kind="stable")
        head = canonical_json({"format": _FORMAT, "policy": self.policy, "dataset": dataset.to_dict(),
                               "n": len(records), "new_rows": sorted(new_rows or [])}).encode("ascii")
        data = b"".join((head, b"\n", memoryview(records).cast("B")))  # one copy: the record's bytes
        del records, fresh
        rel = f"{self.prefix}/{time.time_ns():020d}-{hashlib.sha256(data).hexdigest()}.hashes"
        try:
            uri = self.store.put_immutable(rel, data)
        except StorageError as exc:  # the dataset is published: a missing record only costs the next run reads
            if exc.transient:
                raise
            log.warning("source-hash record %s not written (%s): the next ingest reads every file", self.prefix,
                        exc)
            return None
        try:
            for old in self._files():
                if old.rsplit("/", 1)[-1] < rel.rsplit("/", 1)[-1]:
                    self.store.remove_rel(old)
            for old in set(self._old_new_rows) - set(new_rows or []):  # the last growth's: its embed is done
                self.store.remove_rel(old)
        except StorageError as exc:
            log.warning("older source-hash records of %s not removed (%s)", self.prefix, exc)
        return uri


class BaseSamples:
    """The bytes of reused samples, from ``dataset``'s shards in sample-id order (see the module docstring).

    :meth:`fill` is called with ascending ids, each call's ids above the previous call's (the writer's second
    pass); ``fetch(uri)`` reads a sample's source when the store cannot give its bytes. The next batch of rows is
    read and its images checked on a background thread while the writer works on the current one (the reads and
    sha256 release the GIL), so the second pass does not wait for the store; :meth:`close` stops it.

    The writer first streams the shards' metadata (:meth:`metadata`) to find the shards whose rows all stay as
    they are, and keeps them in the grown dataset (:meth:`keep`): their images are then never read. A dataset of
    several runs (a grown one) is read run by run, the runs merged in id order."""

    def __init__(self, store: ArtifactStore, dataset: DatasetRef, fetch: Callable[[str], bytes],
                 skip: Collection[str] = ()) -> None:
        self.store, self.dataset, self.fetch = store, dataset, fetch
        self.manifest = load_manifest(store, dataset)
        # ``skip``: shards known gone (SourceHashes.lost_shards): their samples were read in the first pass
        self.skip = set(skip)
        self.kept: set[str] = set()  # shards the grown dataset keeps (keep): never read for images
        self._rows: Iterator[tuple[np.ndarray, pa.Array, np.ndarray]] | None = None  # started by the first fill
        self._ids = np.empty(0, "S64")
        self._data: pa.Array | None = None
        self._good = np.zeros(0, bool)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="skmm-ingest-base")
        self._ahead: Future | None = None
        self.n_fetched = 0  # samples the previous dataset could not give, read from their sources

    def close(self) -> None:
        """Stop reading ahead and close the shard being read (idempotent)."""
        if self._ahead is not None:
            self._ahead.cancel()
        self._reader.shutdown(wait=True, cancel_futures=True)
        if self._rows is not None:
            self._rows.close()
        if self.n_fetched:
            log.warning("reuse: %d sample(s) read from their sources again (the previous dataset %s could not give "
                        "them: see the warnings above, or bytes that did not hash to their ids)", self.n_fetched,
                        self.dataset.manifest.uri)
            self.n_fetched = 0

    def keep(self, uris: Collection[str]) -> None:
        """Shards the grown dataset keeps as they are: :meth:`fill` is never asked for their samples, so they are
        not read. Only before the first :meth:`fill`."""
        if self._rows is not None:
            raise RuntimeError("BaseSamples.keep after the first fill")
        self.kept |= set(uris)

    def metadata(self, columns: tuple[str, ...] = ("sample_id", "source_uri", "label", "split")
                 ) -> list[Iterator[pa.Table]]:
        """One stream per run of the previous dataset: ``columns`` of its readable shards' rows in id order (never
        the images), plus ``shard``, the shard's index in the manifest. A shard that is gone or cannot be read
        yields no rows (so it is never kept) and is not read again: its samples come from their sources."""
        return [self._run_metadata(run, columns) for run in self._indexed_runs()]

    def _indexed_runs(self) -> list[list[tuple[int, ShardRef]]]:
        runs, k = [], 0
        for run in self.manifest.shard_runs():
            runs.append([(k + i, sh) for i, sh in enumerate(run)])
            k += len(run)
        return runs

    def _run_metadata(self, run: list[tuple[int, ShardRef]], columns: tuple[str, ...]) -> Iterator[pa.Table]:
        """One run's shards' ``columns``, in order, :data:`METADATA_READERS` shards in flight (on an object store
        each shard costs a size check, a footer and a column read: ~5 000 shards at 10^7 samples, one after the
        other, would wait on ~20 000 round trips)."""
        wanted = [(index, shard) for index, shard in run if shard.artifact.uri not in self.skip]

        def read(entry: tuple[int, ShardRef]) -> tuple[int, ShardRef, pa.Table | StorageError]:
            index, shard = entry
            try:
                with _open_shard(self.store, shard, list(columns)) as parquet:
                    return index, shard, parquet.read(columns=list(columns), use_threads=False)
            except StorageError as exc:
                if exc.transient:
                    raise
                return index, shard, exc

        for index, shard, table in ordered_map(read, wanted, workers=METADATA_READERS):
            if isinstance(table, StorageError):
                log.warning("reusing %s: %s; its samples are read from their sources", shard.artifact.uri, table)
                self.skip.add(shard.artifact.uri)
                continue
            yield table.append_column("shard", pa.array(np.full(table.num_rows, index, np.int64)))

    def _batches(self) -> Iterator[tuple[np.ndarray, pa.Array, np.ndarray]]:
        """The base dataset's rows in id order (the runs merged), about :data:`BASE_BATCH_ROWS` at a time: ids,
        images (Arrow: no copy of the bytes as Python objects) and which images hash to their ids. A shard that
        cannot be read (or the rest of it, once it fails) is skipped: its samples are then read from their
        sources."""
        gone = self.skip | self.kept
        runs = [[sh for _, sh in run if sh.artifact.uri not in gone] for run in self._indexed_runs()]
        runs = [run for run in runs if run]
        if len(runs) == 1:
            for table in self._run_images(runs[0]):
                yield from (self._checked(batch) for batch in table.to_batches())
            return
        for table in merge_sorted_tables([self._run_images(run) for run in runs]):
            for lo in range(0, table.num_rows, BASE_BATCH_ROWS):
                yield self._checked(table.slice(lo, BASE_BATCH_ROWS).combine_chunks().to_batches()[0])

    def _run_images(self, shards: list[ShardRef]) -> Iterator[pa.Table]:
        for k, shard in enumerate(shards):
            for ahead in shards[k:k + 2]:
                self._prefetch(ahead)
            try:
                with _open_shard(self.store, shard, ["data"]) as parquet:
                    for batch in parquet.iter_batches(BASE_BATCH_ROWS, columns=["sample_id", "data"],
                                                      use_threads=False):
                        yield pa.Table.from_batches([batch])
            except StorageError as exc:
                if exc.transient:
                    raise
                log.warning("reusing %s: %s; its samples are read from their sources", shard.artifact.uri, exc)

    def _prefetch(self, shard: ShardRef) -> None:
        """Ask the kernel to read a local store's shard ahead (the batches are read in 1 MB ranges, one thread):
        a cold shard then arrives at the disk's sequential speed. Nothing for a remote store."""
        if not self.store.is_local or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.store._path(self.store._rel_from_uri(shard.artifact.uri)), os.O_RDONLY)
        except (OSError, StorageError):
            return  # missing: the read reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    @staticmethod
    def _checked(batch: pa.RecordBatch) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        ids = sample_id_array(batch.column("sample_id"))
        data = batch.column("data")
        good = np.zeros(len(ids), bool)
        if len(ids):
            valid = data.is_valid().to_numpy(zero_copy_only=False)
            offsets = np.frombuffer(data.buffers()[1], np.int32, count=len(data) + 1, offset=data.offset * 4)
            body = memoryview(data.buffers()[2]) if data.buffers()[2] is not None else memoryview(b"")
            for i, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
                good[i] = valid[i] and hashlib.sha256(body[lo:hi]).hexdigest().encode() == ids[i]
        return ids, data, good

    def _load_next(self, need: np.bytes_) -> bool:
        """Move to the next batch whose last id is at least ``need``; False when the base dataset is exhausted."""
        if self._rows is None:
            self._rows = self._batches()  # advanced only on the reader thread
        while True:
            ahead = self._ahead if self._ahead is not None else self._reader.submit(next, self._rows, None)
            loaded = ahead.result()
            self._ahead = self._reader.submit(next, self._rows, None) if loaded is not None else None
            if loaded is None:
                self._ids, self._data, self._good = np.empty(0, "S64"), None, np.zeros(0, bool)
                return False
            if len(loaded[0]) and loaded[0][-1] >= need:
                self._ids, self._data, self._good = loaded
                return True

    def fill(self, sids: list[str], uris: list[str]) -> pa.BinaryArray:
        """The bytes of each sample (ascending ids), each checked to hash to its id, as one Arrow array: taken
        from the base batches without a Python object per image."""
        want = np.array(sids, "S64")
        chunks: list[pa.Array] = []  # base batches' images, then single fetched images
        where = np.full(len(sids), -1, np.int64)  # each sample's row in the chunks, laid end to end
        offset, j = 0, 0
        while j < len(want):
            if not len(self._ids) or want[j] > self._ids[-1]:
                if not self._load_next(want[j]):
                    break
                continue
            k = int(np.searchsorted(want, self._ids[-1], side="right"))
            pos = np.minimum(np.searchsorted(self._ids, want[j:k]), len(self._ids) - 1)
            hit = (self._ids[pos] == want[j:k]) & self._good[pos]
            n_hit = int(np.count_nonzero(hit))
            if n_hit:  # only the hits: a sparse reuse must not keep whole batches until the call ends
                chunks.append(self._data.take(pa.array(pos[hit])))
                where[j:k][hit] = offset + np.arange(n_hit)
                offset += n_hit
            j = k
        missing = np.flatnonzero(where < 0).tolist()
        for i in missing:
            chunks.append(pa.array([self._fetch(sids[i], uris[i])], pa.binary()))
            where[i] = offset
            offset += 1
        if not chunks:
            return pa.array([], pa.binary())
        if not missing:  # the hits are already in the asked order
            return pa.concat_arrays(chunks)
        return pa.chunked_array(chunks, pa.binary()).take(pa.array(where)).combine_chunks()

    def _fetch(self, sid: str, uri: str) -> bytes:
        self.n_fetched += 1
        try:
            data = self.fetch(uri)
        except OSError as exc:
            raise SourceError(f"{redact(uri)} could not be read again ({exc.__class__.__name__}: {exc}); it changed "
                              "while the pool was being ingested — run the ingest again") from None
        if hashlib.sha256(data).hexdigest() != sid:
            raise SourceError(f"{redact(uri)} changed while the pool was being ingested (its bytes no longer hash "
                              f"to {sid[:12]}…); run the ingest again")
        return data


# ------------------------------------------------------------------------------------------ WebDataset tars
TAR_MEMBERS_PREFIX = "catalog/tar-members"
_TAR_FORMAT = "skmm.tar-members/1"
_SHA = re.compile(r"^[0-9a-f]{64}$")

#: one accepted sample of a tar: (source uri ``<tar uri>#<member>``, sample id, label, byte count)
TarMember = tuple[str, str, str, int]


def write_tar_members(store: ArtifactStore, members: list[TarMember]) -> str:
    """Store the accepted samples of one tar that was read whole without a quarantined member (so that an
    unchanged tar need not be read again); the sha256 that names the file (its source-hash record value)."""
    data = canonical_json({"format": _TAR_FORMAT, "members": [list(m) for m in members]}).encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    try:
        store.put_immutable(f"{TAR_MEMBERS_PREFIX}/{sha}.json", data)
    except StorageError as exc:
        if exc.transient or "refusing to overwrite" not in str(exc):
            raise
    return sha  # the same tar read again (same members) names the same file


def read_tar_members(store: ArtifactStore, sha: str) -> list[TarMember] | None:
    """The samples of an unchanged tar, or None (with a warning) when the file is gone or does not hash to its
    name — the tar is then read."""
    rel = f"{TAR_MEMBERS_PREFIX}/{sha}.json"
    data = read_record(store, rel, "tar member list", "the tar is read", log)
    if data is None:
        return None
    try:
        if not _SHA.match(sha) or hashlib.sha256(data).hexdigest() != sha:
            raise ValueError("its bytes do not hash to its name")
        body = json.loads(data)
        if body.get("format") != _TAR_FORMAT:
            raise ValueError("not a tar member list")
        members = [(str(u), str(s), str(lab), int(n)) for u, s, lab, n in body["members"]]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("tar member list %s is corrupted (%s): the tar is read", store.uri(rel), exc)
        return None
    return members


# ------------------------------------------------------------------------------- new rows, for the embed stage
NEW_ROWS_PREFIX = "catalog/new-rows"
_NEW_ROWS_NAME = re.compile(r"^catalog/new-rows/[0-9a-f]{64}\.parquet$")


def new_rows_path(shard_sha256: str) -> str:
    """Where a growth ingest leaves the rows it read now (the new samples) of the shard with this sha256."""
    return f"{NEW_ROWS_PREFIX}/{shard_sha256}.parquet"


def write_new_rows(store: ArtifactStore, shard_sha256: str, rows: pa.Table) -> str:
    """Write the (sample_id, data) of the rows of one shard that this growth ingest read from the source, so that
    the embed stage finds the bytes of a changed shard's new samples without reading the shard (a 1 % growth puts
    ~20 new samples in every 2 048-row shard: ~1 % of its bytes). Any subset is valid — the embed stage checks each
    image against its id and reads the shard for the rest —, so the first file written for a shard stays. Its
    path; the next growth's ingest removes it (:meth:`SourceHashes.commit`)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(rows.select(["sample_id", "data"]), sink, compression="none",  # image bytes: compressed already
                   write_batch_size=1)  # ~1 MiB pages, as in the shards (storage.datasets.SAMPLE_PARQUET_OPTIONS)
    rel = new_rows_path(shard_sha256)
    try:
        store.put_immutable(rel, sink.getvalue().to_pybytes())
    except StorageError as exc:
        if exc.transient or "refusing to overwrite" not in str(exc):
            raise
    return rel


def read_new_rows(store: ArtifactStore, shard_sha256: str, wanted: set[str]) -> dict[str, bytes]:
    """The bytes of the ``wanted`` samples that the last growth ingest left aside for this shard, each checked
    against its id; whatever is missing, unreadable or wrong is simply not returned (the caller reads the shard)."""
    import pyarrow.parquet as pq

    try:
        data = store.read_rel(new_rows_path(shard_sha256))
        table = pq.read_table(pa.BufferReader(data))
        ids, blobs = table.column("sample_id").to_pylist(), table.column("data").to_pylist()
    except StorageError as exc:
        if exc.transient:
            raise
        return {}
    except (pa.ArrowException, KeyError, OSError, ValueError):
        return {}
    return {sid: blob for sid, blob in zip(ids, blobs, strict=True)
            if sid in wanted and isinstance(blob, bytes) and hashlib.sha256(blob).hexdigest() == sid}


def remove_tar_members(store: ArtifactStore, shas: set[str]) -> None:
    """Delete member lists no record names any more (a tar gone or changed since the last ingest)."""
    for sha in shas:
        if _SHA.match(sha):
            try:
                store.remove_rel(f"{TAR_MEMBERS_PREFIX}/{sha}.json")
            except StorageError as exc:
                log.warning("tar member list %s not removed (%s)", sha, exc)
