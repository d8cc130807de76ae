"""Partial, verified reads of a dataset's shards: the metadata without the image bytes, the images of a few ids.

A dataset shard (see :mod:`storage.datasets`) holds every sample's bytes beside its id, label and split; at 10^7
images the shards are terabytes. :func:`~storage.datasets.read_shard` fetches and hashes a whole shard — right for
the stages that need every image of it (embed, FT sketch), wasteful for those that need only ids and labels, or a
few images. This module reads only the columns and row groups it needs, and still verifies what it returns:

- :func:`iter_metadata` / :func:`read_metadata`: sample_id / label / split (never ``data``) of every row, shard by
  shard — for a grown dataset, whose runs of shards interleave in id order (see
  :class:`~storage.datasets.DatasetManifest`), merged into sample-id order holding one shard's metadata per run
  (:mod:`storage.sorted_merge`). A partial read cannot check a shard's sha256, so the **dataset version** is
  recomputed while the rows stream past in id order (the same encoding as :func:`~storage.datasets.dataset_version`,
  vectorised per table) and compared with the verified manifest's: a changed id, label or split, a row out of
  order or a dropped row raises ArtifactCorruptedError naming the dataset.
- :func:`read_images`: (sample_id, data) of the wanted ids only, from the row groups that hold one; each row is
  verified by its id (a sample id *is* the sha256 of the sample's bytes).
- :func:`iter_split`: (sample_id, label[, data]) of one split's rows — or of its ``limit`` smallest ids, a
  content-determined sample — in bounded batches, verified both ways (for several runs with images: a first pass
  over the merged metadata verifies the version and finds the last id wanted, a second reads each run's images up
  to it and merges them): evaluate and finetune stream through it;
  :func:`read_split_ids` gives that split's ids as one fixed-width array (select, the sketches, evaluate).

Every shard's object size is checked against the manifest's ref, and its row count and schema against the
footer, before anything is decoded; files are opened without a read-ahead cache (``cache_type="none"``) so that a
read of small columns never drags image bytes along. Works on any fsspec store (local, S3).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import ArtifactRef, ArtifactStore, _translate
from storage.datasets import (
    ID_DTYPE,
    SAMPLE_SCHEMA,
    DatasetManifest,
    DatasetRef,
    ShardRef,
    load_manifest,
    sample_id,
    sample_id_array,
)
from storage.errors import ArtifactCorruptedError, MalformedRecordError, StorageError
from storage.sorted_merge import merge_sorted_tables

__all__ = ["METADATA_COLUMNS", "check_limit", "fill_ids", "iter_metadata", "iter_shard", "iter_split", "read_images",
           "read_metadata", "read_split_ids", "shard_rows", "split_head"]

#: The columns a metadata read may return (everything but the sample bytes).
METADATA_COLUMNS = ("sample_id", "source_uri", "label", "split")
_VERSION_HEADER = b"skmm-dataset-version/1\n"  # storage.datasets.dataset_version's encoding (tested equal)
_HEX = np.zeros(256, dtype=bool)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = True
_IMAGE_BATCH_ROWS = 256  # rows decoded at a time from a row group's data column
_ID_BATCH_ROWS = 1 << 16  # ids (and labels) handed on at a time by read_split_ids
_STREAM_BUFFER = 2**20  # bytes per ranged read of a column chunk (no whole column chunk in memory)
_SPLIT_READ = ("sample_id", "label", "split")  # the metadata iter_split reads


def _object_path(store: ArtifactStore, ref: ArtifactRef) -> str:
    return store._path(store._rel_from_uri(ref.uri))


def _what(shard: ShardRef) -> str:
    return f"dataset shard {shard.artifact.uri}"


def _footer(fh: Any, size: int) -> pq.FileMetaData:
    """The Parquet footer, read as exactly its own bytes (pyarrow's default speculative 64 KiB tail read would
    fetch the end of the last row group's image bytes too)."""
    if size < 12:
        raise ValueError(f"{size} bytes are too few for a Parquet file")
    fh.seek(size - 8)
    tail = fh.read(8)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or length > size - 12:
        raise ValueError("no Parquet footer at the end of the file")
    fh.seek(size - 8 - length)
    footer = fh.read(length)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))


@contextmanager
def _open_shard(store: ArtifactStore, shard: ShardRef, columns: Sequence[str]) -> Iterator[pq.ParquetFile]:
    """The shard as a ParquetFile after checking its size (against the manifest) and its footer (row count,
    columns and their types); no read-ahead cache, ranged reads of at most ``_STREAM_BUFFER`` bytes."""
    what = _what(shard)
    path = _object_path(store, shard.artifact)
    try:
        size = store.fs.size(path)
    except Exception as exc:
        raise _translate(exc, what) from None
    if size != shard.artifact.size:
        raise ArtifactCorruptedError(f"{what} is corrupted: {size} bytes, the manifest says {shard.artifact.size}")
    try:
        # no read-ahead cache: each read is one exact range (a 50 MB default block would fetch image bytes too)
        with store.fs.open(path, "rb", cache_type="none") as fh:
            parquet = pq.ParquetFile(fh, metadata=_footer(fh, size), buffer_size=_STREAM_BUFFER, pre_buffer=False)
            schema = parquet.schema_arrow
            bad = [c for c in {"sample_id", *columns}
                   if c not in schema.names or c not in SAMPLE_SCHEMA.names
                   or schema.field(c).type != SAMPLE_SCHEMA.field(c).type]
            if bad or parquet.metadata.num_rows != shard.num_rows:
                raise MalformedRecordError(f"{what} does not hold {shard.num_rows} sample rows with columns "
                                           f"{', '.join(sorted({'sample_id', *columns}))}")
            yield parquet
    except StorageError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise MalformedRecordError(f"{what} cannot be read: {type(exc).__name__}: {exc}") from None


def _row_groups(parquet: pq.ParquetFile, wanted: pa.Array | None) -> list[int]:
    """Row groups whose sample-id range (footer statistics) may hold a wanted id; all of them without ``wanted``."""
    groups = list(range(parquet.num_row_groups))
    if wanted is None:
        return groups
    id_col = parquet.schema_arrow.get_field_index("sample_id")
    keep = []
    for i in groups:
        stats = parquet.metadata.row_group(i).column(id_col).statistics
        if stats is not None and stats.has_min_max:
            lo = pc.sum(pc.less(wanted, str(stats.min))).as_py() or 0
            hi = pc.sum(pc.less_equal(wanted, str(stats.max))).as_py() or 0
            if hi <= lo:
                continue
        keep.append(i)
    return keep


def iter_shard(store: ArtifactStore, shard: ShardRef, columns: Sequence[str], wanted: pa.Array | None = None,
               batch_rows: int | None = None) -> Iterator[pa.Table]:
    """sample_id and ``columns`` of one shard, row group by row group (or ``batch_rows`` at a time), in order.

    ``wanted`` (a sorted, unique string array): only its rows, and only the row groups whose id range holds one
    are read — with ``data`` among the columns, a row group's ids are read first and its bytes only when one of
    them is wanted. Nothing is verified but the shard's size, row count and schema (see the module docstring)."""
    columns = [c for c in columns if c != "sample_id"]
    names = ["sample_id", *columns]
    with _open_shard(store, shard, columns) as parquet:
        for i in _row_groups(parquet, wanted):
            if wanted is not None and "data" in columns:
                ids = parquet.read_row_group(i, columns=["sample_id"], use_threads=False).column("sample_id")
                if not pc.any(pc.is_in(ids, value_set=wanted)).as_py():
                    continue
            if batch_rows is None:
                parts = [parquet.read_row_group(i, columns=names, use_threads=False)]
            else:
                parts = (pa.Table.from_batches([b]) for b in
                         parquet.iter_batches(batch_rows, row_groups=[i], columns=names, use_threads=False))
            for part in parts:
                if wanted is not None:
                    part = part.filter(pc.is_in(part.column("sample_id"), value_set=wanted))
                if part.num_rows or wanted is None:
                    yield part


def shard_rows(store: ArtifactStore, shard: ShardRef, wanted: pa.Array, columns: Sequence[str]) -> pa.Table:
    """The rows of one shard whose sample_id is in ``wanted`` (a sorted, unique string array), only sample_id and
    ``columns``, as strings (the auditor's read: never the sample bytes)."""
    schema = pa.schema([pa.field("sample_id", pa.string()), *(pa.field(c, pa.string()) for c in columns)])
    parts = [p.cast(schema) for p in iter_shard(store, shard, columns, wanted)]
    return pa.concat_tables(parts) if parts else schema.empty_table()


# ---------------------------------------------------------------------------------------------- metadata
def _json_values(values: pa.Array) -> pa.Array:
    """Each value's ``json.dumps(..., ensure_ascii=True)`` (``null`` for null); every distinct value encoded once."""
    encoded = pc.dictionary_encode(values)
    texts = pa.array([json.dumps(v, ensure_ascii=True) for v in encoded.dictionary.to_pylist()], pa.string())
    return pc.fill_null(texts.take(encoded.indices), "null")


class _VersionCheck:
    """Recomputes :func:`~storage.datasets.dataset_version` over rows streamed in sample-id order."""

    def __init__(self, dataset: DatasetRef) -> None:
        self.dataset = dataset
        self.hash = hashlib.sha256(_VERSION_HEADER)
        self.last = b""
        self.rows = 0

    def fail(self, problem: str) -> ArtifactCorruptedError:
        return ArtifactCorruptedError(f"dataset {self.dataset.manifest.uri} (version {self.dataset.version[:12]}…) "
                                      f"is corrupted: {problem}")

    def update(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        ids = table.column("sample_id").combine_chunks()
        try:
            fixed = sample_id_array(ids)
        except ValueError:
            raise self.fail("a shard holds a sample id that is not 64 hex digits") from None
        if not _HEX[fixed.view(np.uint8)].all():
            raise self.fail("a shard holds a sample id that is not 64 lowercase hex digits")
        if fixed[0] <= self.last or not np.all(fixed[1:] > fixed[:-1]):
            raise self.fail("its rows are not in strictly ascending sample-id order")
        self.last = bytes(fixed[-1])
        # one line per row, exactly dataset_version's: ["<id>",<label json>,<split json>]\n (ids are plain hex)
        labels = _json_values(table.column("label").combine_chunks())
        splits = _json_values(table.column("split").combine_chunks())
        lines = pc.binary_join_element_wise('["', ids, '",', labels, ",", splits, "]\n", "")
        offsets = np.frombuffer(lines.buffers()[1], np.int32, count=len(lines) + 1, offset=lines.offset * 4)
        self.hash.update(memoryview(lines.buffers()[2])[int(offsets[0]):int(offsets[-1])])
        self.rows += table.num_rows

    def finish(self) -> None:
        if self.rows != self.dataset.num_rows:
            raise self.fail(f"its shards hold {self.rows} rows, the manifest says {self.dataset.num_rows}")
        if self.hash.hexdigest() != self.dataset.version:
            raise self.fail(f"its rows' ids, labels and splits hash to version {self.hash.hexdigest()[:12]}…, "
                            "not the manifest's")


def _metadata_columns(columns: Sequence[str]) -> list[str]:
    columns = list(columns)
    if "data" in columns:
        raise ValueError("a metadata read never returns the sample bytes: use read_images for 'data'")
    unknown = set(columns) - set(METADATA_COLUMNS)
    if unknown:
        raise ValueError(f"unknown sample column(s) {sorted(unknown)}; expected some of {list(METADATA_COLUMNS)}")
    return columns


def _shard_metadata(store: ArtifactStore, shard: ShardRef, read: list[str], check: _VersionCheck) -> pa.Table:
    """The ``read`` metadata columns of one shard, checked to hold the manifest's row count for it."""
    parts = list(iter_shard(store, shard, read[1:]))
    table = pa.concat_tables(parts) if parts else SAMPLE_SCHEMA.empty_table().select(read)
    if table.num_rows != shard.num_rows:
        raise check.fail(f"{_what(shard)} yields {table.num_rows} rows, the manifest says {shard.num_rows}")
    return table


def _verified_shards(store: ArtifactStore, dataset: DatasetRef, shards: Sequence[ShardRef], read: Sequence[str]
                     ) -> Iterator[tuple[ShardRef, pa.Table]]:
    """(shard, its ``read`` metadata columns) for every shard of a one-run dataset, in order, each checked into
    the dataset version; the version is compared with the manifest's after the last shard (ArtifactCorruptedError
    then)."""
    read = list(read)
    check = _VersionCheck(dataset)
    for shard in shards:
        table = _shard_metadata(store, shard, read, check)
        check.update(table)
        yield shard, table
    check.finish()


def _merged(streams: Sequence[Iterator[pa.Table]], check: _VersionCheck) -> Iterator[pa.Table]:
    """The runs' metadata streams merged in sample-id order; a run out of order (or holding an id that is not 64
    characters) fails the version check, as it would in one run."""
    try:
        yield from merge_sorted_tables(streams)
    except ValueError as exc:
        raise check.fail(f"a run of its shards cannot be merged in sample-id order ({exc})") from None


def _verified_merge(store: ArtifactStore, dataset: DatasetRef, runs: Sequence[Sequence[ShardRef]],
                    read: Sequence[str]) -> Iterator[pa.Table]:
    """The ``read`` metadata columns of a dataset of several runs, merged into sample-id order — one shard's
    metadata per run in memory — and checked like :func:`_verified_shards`: row counts per shard, the version
    over the merged rows (it hashes them in global id order) after the last."""
    read = list(read)
    check = _VersionCheck(dataset)
    streams = [(_shard_metadata(store, shard, read, check) for shard in run) for run in runs]
    for table in _merged(streams, check):
        check.update(table)
        yield table
    check.finish()


def _verified_metadata(store: ArtifactStore, dataset: DatasetRef, manifest: DatasetManifest, read: Sequence[str]
                       ) -> Iterator[pa.Table]:
    """The ``read`` metadata columns of every row in sample-id order, verified: one table per shard for one run,
    per merge step for several."""
    if not manifest.runs:
        return (table for _, table in _verified_shards(store, dataset, manifest.shards, read))
    return _verified_merge(store, dataset, manifest.shard_runs(), read)


def iter_metadata(store: ArtifactStore, dataset: DatasetRef, columns: Sequence[str] = ("sample_id", "label", "split"),
                  split: str | None = None) -> Iterator[pa.Table]:
    """``columns`` of every row (of ``split`` only, if given), one table per shard (for several runs: per step of
    their merge, at most a shard of each), in sample-id order; never the sample bytes.

    Verified as it streams: once the last shard is read, ArtifactCorruptedError is raised unless the rows' dataset
    version equals the manifest's (act on the yielded rows only after the iteration ended)."""
    columns = _metadata_columns(columns)
    read = sorted({"sample_id", "label", "split", *columns}, key=list(METADATA_COLUMNS).index)
    for table in _verified_metadata(store, dataset, load_manifest(store, dataset), read):
        if split is not None:
            table = table.filter(pc.equal(table.column("split"), split))
        yield table.select(columns)


def read_metadata(store: ArtifactStore, dataset: DatasetRef, columns: Sequence[str] = ("sample_id", "label", "split"),
                  split: str | None = None) -> pa.Table:
    """``columns`` of every row (of ``split`` only, if given) as one table in sample-id order, after verifying the
    whole dataset's version (see :func:`iter_metadata`); memory: the returned rows plus one shard's metadata (one
    per run, for several)."""
    columns = _metadata_columns(columns)
    parts = list(iter_metadata(store, dataset, columns, split))
    return pa.concat_tables(parts) if parts else SAMPLE_SCHEMA.empty_table().select(columns)


# ---------------------------------------------------------------------------------------------- images
def _verified_images(store: ArtifactStore, shard: ShardRef, wanted: pa.Array, batch_rows: int) -> Iterator[pa.Table]:
    """(sample_id, data) of the ``wanted`` rows (a sorted, unique string array) of one shard, at most
    ``batch_rows`` rows at a time, in sample-id order, each row verified by its id."""
    schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("data", pa.binary())])
    for part in iter_shard(store, shard, ["data"], wanted, batch_rows=batch_rows):
        for sid, data in zip(part.column("sample_id").to_pylist(), part.column("data").to_pylist(), strict=True):
            if data is None:
                raise ValueError(f"sample {sid} has no stored bytes (only its source_uri) in {_what(shard)}")
            if sample_id(data) != sid:
                raise ArtifactCorruptedError(f"{_what(shard)} is corrupted: the bytes of sample {sid} hash "
                                             f"to {sample_id(data)}")
        yield part.cast(schema)


def read_images(store: ArtifactStore, dataset: DatasetRef, sample_ids: Sequence[str] | pa.Array) -> pa.Table:
    """(sample_id, data) of the wanted samples, in sample-id order (duplicates collapse), each verified.

    Reads only the sample_id and data columns of the row groups that hold a wanted id, ``_IMAGE_BATCH_ROWS`` rows
    at a time: memory O(wanted bytes + one batch + one column-chunk read buffer). A row whose bytes do not hash to
    its id raises ArtifactCorruptedError naming it; wanted ids the dataset lacks raise ValueError naming the first;
    a wanted sample stored without bytes (only its source_uri) raises ValueError naming it. The rows found in
    several runs are sorted together (they are held anyway)."""
    wanted = pc.unique(sample_ids.cast(pa.string()) if isinstance(sample_ids, pa.Array | pa.ChunkedArray)
                       else pa.array(list(sample_ids), pa.string()))
    wanted = wanted.filter(pc.is_valid(wanted))
    wanted = wanted.take(pc.sort_indices(wanted))
    schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("data", pa.binary())])
    parts: list[pa.Table] = []
    several_runs = False
    if len(wanted):
        manifest = load_manifest(store, dataset)
        several_runs = bool(manifest.runs)
        for shard in manifest.shards:
            parts.extend(_verified_images(store, shard, wanted, _IMAGE_BATCH_ROWS))
    found = pa.concat_tables(parts) if parts else schema.empty_table()
    if found.num_rows != len(wanted):
        missing = wanted.filter(pc.invert(pc.is_in(wanted, value_set=found.column("sample_id"))))
        raise ValueError(f"{len(missing)} wanted samples are not in dataset {dataset.manifest.uri} "
                         f"(first {missing[0].as_py()})")
    return found.sort_by("sample_id") if several_runs else found  # each run's rows are in order, the runs interleave


# ---------------------------------------------------------------------------------------------- one split, streamed
def check_limit(limit: Any, name: str = "limit") -> int | None:
    """``limit`` as an int >= 1, or None (no limit); ValueError for anything else (0, negatives, bools, floats)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"{name} must be a positive integer, or None for the whole split; got {limit!r}")
    return int(limit)


def split_head(table: pa.Table, split: str, left: int | None) -> tuple[pa.Table, int | None]:
    """(sample_id and label of ``table``'s ``split`` rows — only the first ``left`` when ``left`` is not None —,
    how many may still follow). Applied shard after shard in sample-id order, it keeps a split's ``limit``
    smallest ids: the sample :func:`iter_split` and the finetune stage choose on."""
    rows = table.filter(pc.equal(table.column("split"), split)).select(["sample_id", "label"])
    if left is None:
        return rows, None
    rows = rows.slice(0, left)
    return rows, left - rows.num_rows


def iter_split(store: ArtifactStore, dataset: DatasetRef, split: str, limit: int | None = None,
               images: bool = False, batch_rows: int = _IMAGE_BATCH_ROWS) -> Iterator[pa.Table]:
    """sample_id and label (with ``images``, also the sample bytes ``data``) of the rows of ``split``, in
    sample-id order, in tables of at most ``batch_rows`` rows.

    ``limit``: only the split's first ``limit`` rows, i.e. its ``limit`` smallest sample ids — ids are content
    hashes, so this is a sample fixed by the samples' content, independent of ingest order and shard layout
    (None: the whole split). Memory: one shard's metadata plus one batch of ``batch_rows`` images, whatever the
    pool's size — per run, for a dataset of several runs, whose metadata is then read twice with ``images``
    (:func:`_runs_split_images`). Verified like :func:`iter_metadata` (the dataset version, after the last shard:
    every shard's metadata is read even once ``limit`` rows were yielded; act on the rows only after the
    iteration ended) and :func:`read_images` (each image by its id)."""
    limit = check_limit(limit)
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, numbers.Integral) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer; got {batch_rows!r}")
    manifest = load_manifest(store, dataset)
    if manifest.runs:
        runs = manifest.shard_runs()
        yield from (_runs_split_images(store, dataset, runs, split, limit, batch_rows) if images else
                    _runs_split_rows(store, dataset, runs, split, limit, batch_rows))
        return
    left = limit
    for shard, table in _verified_shards(store, dataset, manifest.shards, _SPLIT_READ):
        if left == 0:
            continue  # read all the same: the version covers every row
        rows, left = split_head(table, split, left)
        if not images:
            for lo in range(0, rows.num_rows, batch_rows):
                yield rows.slice(lo, batch_rows)
            continue
        yield from _shard_split_images(store, shard, rows, split, batch_rows)


def _shard_split_images(store: ArtifactStore, shard: ShardRef, rows: pa.Table, split: str, batch_rows: int
                        ) -> Iterator[pa.Table]:
    """``rows`` (sample_id and label of some of one shard's ``split`` rows, in id order) with their verified bytes
    as ``data``, at most ``batch_rows`` rows at a time."""
    if not rows.num_rows:
        return
    rows = rows.combine_chunks()
    ids, got = rows.column("sample_id").chunk(0), 0
    for part in _verified_images(store, shard, ids, batch_rows):
        yield rows.take(pc.index_in(part.column("sample_id"), value_set=ids)).append_column(
            "data", part.column("data"))
        got += part.num_rows
    if got != rows.num_rows:
        raise ArtifactCorruptedError(f"{_what(shard)} is corrupted: its metadata lists {rows.num_rows} {split} "
                                     f"rows, its sample bytes {got}")


def _runs_split_rows(store: ArtifactStore, dataset: DatasetRef, runs: Sequence[Sequence[ShardRef]], split: str,
                     limit: int | None, batch_rows: int) -> Iterator[pa.Table]:
    """:func:`iter_split` without images for several runs: the one-run loop over the merged metadata."""
    left = limit
    for table in _verified_merge(store, dataset, runs, _SPLIT_READ):
        if left == 0:
            continue  # read all the same: the version covers every row
        rows, left = split_head(table, split, left)
        for lo in range(0, rows.num_rows, batch_rows):
            yield rows.slice(lo, batch_rows)


def _split_extent(store: ArtifactStore, dataset: DatasetRef, runs: Sequence[Sequence[ShardRef]], split: str,
                  limit: int | None) -> tuple[int, str | None]:
    """(how many rows of ``split`` iter_split yields, the largest id among them; None if none) — from the whole
    merged metadata, so the dataset version is verified here, before any image is read."""
    count, last, left = 0, None, limit
    for table in _verified_merge(store, dataset, runs, _SPLIT_READ):
        if left == 0:
            continue
        rows, left = split_head(table, split, left)
        if rows.num_rows:
            count += rows.num_rows
            last = rows.column("sample_id")[-1].as_py()
    return count, last


def _run_split_images(store: ArtifactStore, run: Sequence[ShardRef], split: str, last: str, batch_rows: int,
                      check: _VersionCheck) -> Iterator[pa.Table]:
    """sample_id, label and verified ``data`` of one run's ``split`` rows with ids up to ``last``, in id order, at
    most ``batch_rows`` rows at a time; the run's shards after the one that reaches ``last`` are not read."""
    read = list(_SPLIT_READ)
    for shard in run:
        table = _shard_metadata(store, shard, read, check)
        ids = table.column("sample_id")
        keep = pc.and_(pc.equal(table.column("split"), split), pc.less_equal(ids, last))
        yield from _shard_split_images(store, shard, table.filter(keep).select(["sample_id", "label"]), split,
                                       batch_rows)
        if table.num_rows and ids[-1].as_py() >= last:
            return  # the run is in id order: its later shards hold only larger ids


def _runs_split_images(store: ArtifactStore, dataset: DatasetRef, runs: Sequence[Sequence[ShardRef]], split: str,
                       limit: int | None, batch_rows: int) -> Iterator[pa.Table]:
    """:func:`iter_split` with images for several runs, in two passes, so that neither holds the split's ids: the
    merged metadata (the version check) gives the number of rows wanted and the last id; then each run's images
    up to that id are read shard by shard (its metadata again) and the runs' batches merged in id order.

    Memory: one shard's metadata and one batch per run. The second pass must give as many rows as the first."""
    expected, last = _split_extent(store, dataset, runs, split, limit)
    if last is None:
        return
    check = _VersionCheck(dataset)  # for its error messages: the version was compared in the first pass
    streams = [_run_split_images(store, run, split, last, batch_rows, check) for run in runs]
    got = 0
    for table in merge_sorted_tables(streams):  # a merge step holds up to a batch of each run: cut it again
        for lo in range(0, table.num_rows, batch_rows):
            yield table.slice(lo, batch_rows)
        got += table.num_rows
    if got != expected:
        raise check.fail(f"a second read of its shards gives {got} {split} rows, the first {expected}")


def read_split_ids(store: ArtifactStore, dataset: DatasetRef, split: str, limit: int | None = None,
                   labels: bool = False) -> tuple[np.ndarray, pa.ChunkedArray | None]:
    """The sample ids of ``split`` (its ``limit`` smallest, with a limit) as one sorted ``ID_DTYPE`` array — 64 B a
    sample, no Python object each — and, with ``labels``, their labels (Arrow strings; else None). Read and
    verified as :func:`iter_split` (no image bytes); the ids are filled into one array sized by the manifest and
    shrunk in place: never the parts and their concatenation."""
    rows = sum(sh.num_rows for sh in load_manifest(store, dataset).shards)
    out = np.empty(rows if limit is None else min(check_limit(limit), rows), ID_DTYPE)
    chunks: list[pa.Array] = []
    n = 0
    for part in iter_split(store, dataset, split, limit, batch_rows=_ID_BATCH_ROWS):
        n = fill_ids(out, n, part.column("sample_id"))
        if labels:
            chunks.extend(part.column("label").chunks)
    out.resize(n, refcheck=False)
    return out, pa.chunked_array(chunks, pa.string()) if labels else None


def fill_ids(out: np.ndarray, n: int, ids: pa.ChunkedArray) -> int:
    """Copy ``ids`` (an Arrow string column) into ``out[n:]`` (an ``ID_DTYPE`` array sized ahead) chunk by chunk;
    returns the new fill. Why: collecting a split's ids into one array sized once, never a list of parts and their
    concatenation (2 × 64 B a sample at once)."""
    for chunk in ids.chunks:
        out[n:n + len(chunk)] = sample_id_array(chunk)
        n += len(chunk)
    return n
