"""Datasets as sorted Parquet shards keyed by content-hash sample ids, and vector tables keyed the same way.

Why content hashes: a positional index ("row 17") changes meaning when a pool is re-listed, re-shuffled or
re-sharded, and a digest over the first N rows misses edits further down. Here

- a **sample id** is the sha256 of the sample's canonical bytes (:func:`sample_id`), so the same image or
  embedding row has the same id wherever it came from;
- a **dataset version** is the sha256 over *every* row's (sample_id, label, split), sorted by sample id
  (:func:`dataset_version`), so it ignores input order and sharding and changes when any label or split does;
- a dataset on the store is a set of Parquet shards (kind ``"samples"``) plus a small JSON manifest (kind
  ``"dataset"``); tasks pass the tiny :class:`DatasetRef` (manifest ref + version + row count);
- embeddings and sketches are Parquet tables of (sample_id, vector) whose producer (model + weights tag, or a
  ``SketchSpec.to_dict()``) travels in the file's schema metadata and in the :class:`VectorTableRef`, so tables
  from different producers are never silently mixed (:func:`combine_vectors`).

Everything read back is verified against its sha256 by :class:`~storage.artifacts.ArtifactStore`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore, _translate
from storage.errors import MalformedRecordError, StorageError

__all__ = [
    "ID_DTYPE",
    "LINKED_SUFFIX",
    "SAMPLE_PARQUET_OPTIONS",
    "SAMPLE_SCHEMA",
    "SCHEMA_VERSION",
    "SPLITS",
    "DatasetManifest",
    "DatasetRef",
    "ShardRef",
    "VectorTableRef",
    "combine_vectors",
    "dataset_version",
    "is_linked",
    "load_manifest",
    "producer_digest",
    "read_samples",
    "read_shard",
    "read_vector_matrix",
    "read_vectors",
    "sample_id",
    "sample_id_array",
    "scan_vector_rows",
    "vector_sample_id",
    "vector_table_ids",
    "write_samples",
    "write_vector_chunks",
    "write_vectors",
]

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
VECTOR_KINDS = ("embeddings", "sketch")
DEFAULT_SHARD_ROWS = 65_536
_VERSION_HEADER = b"skmm-dataset-version/1\n"
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}  # pinned: same rows → same bytes
#: Sample shards (rows carry image bytes): Parquet checks a page's size only after each write batch, 1 024 values
#: by default, which made ~56 MB data pages of ~56 KB JPEGs — a reader streaming a few images at a time, and the
#: writer, then held a whole page compressed and decompressed. One value a batch: a page is ~1 MiB plus one image.
SAMPLE_PARQUET_OPTIONS: dict[str, Any] = {**_PARQUET_OPTIONS, "write_batch_size": 1}
_SHA = re.compile(r"^[0-9a-f]{64}$")

#: The sample table. ``label`` is a *string* (class names and integer classes alike; integers are stored in
#: decimal, so ``3`` and ``"3"`` are the same label) and is null for unlabelled pools; ``split`` is one of
#: :data:`SPLITS` or null; ``data`` holds the sample's canonical bytes, or null when the sample is only
#: referenced by ``source_uri``.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("data", pa.binary()),
    ],
    metadata={"skmm.table": "samples", "skmm.schema_version": str(SCHEMA_VERSION)},
)


# ---------------------------------------------------------------------------------------------- identities
def sample_id(data: bytes) -> str:
    """The sample's id: sha256 hex of its canonical bytes.

    For an image, the canonical bytes are the file's raw bytes as stored (not decoded pixels: re-encoding makes
    a new sample). For an embedding row, they are the float32 little-endian bytes of the vector — see
    :func:`vector_sample_id`.
    """
    return hashlib.sha256(bytes(data)).hexdigest()


def vector_sample_id(vector: Any) -> str:
    """The id of a sample that *is* a vector: sha256 of its float32 little-endian bytes (1-D, C order)."""
    arr = np.ascontiguousarray(np.asarray(vector, dtype="<f4").reshape(-1))
    return sample_id(arr.tobytes())


def dataset_version(rows: Iterable[tuple[str, str | None, str | None]]) -> str:
    """sha256 over every (sample_id, label, split), sorted by sample id.

    Canonical encoding: the header ``b"skmm-dataset-version/1\\n"``, then one line per row, in ascending
    sample-id order, ``json.dumps([sample_id, label, split], separators=(",", ":"), ensure_ascii=True)``
    followed by ``\\n`` (null for a missing label or split). JSON quoting makes the encoding unambiguous (a label
    containing a comma or newline cannot imitate another row). Source URIs and bytes are *not* part of the
    version: the same samples fetched from a mirror are the same dataset.
    """
    h = hashlib.sha256(_VERSION_HEADER)
    for row in sorted(rows, key=lambda r: r[0]):
        h.update(json.dumps(list(row), separators=(",", ":"), ensure_ascii=True).encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def producer_digest(producer: Mapping[str, Any]) -> str:
    """sha256 of the producer's canonical JSON (sorted keys, no whitespace, ASCII).

    The same encoding as ``SketchSpec.to_json``, so ``producer_digest(spec.to_dict()) == spec.digest``.
    """
    return hashlib.sha256(_canonical_json(producer).encode("ascii")).hexdigest()


def _canonical_json(obj: Any) -> str:
    try:
        return canonical_json(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"producer must be plain JSON (dicts, lists, str, finite numbers): {exc}") from None


# ---------------------------------------------------------------------------------------------- refs
def _want(cond: bool, message: str) -> None:
    if not cond:
        raise MalformedRecordError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA.match(value))


@dataclass(frozen=True)
class ShardRef:
    """One Parquet shard of a dataset: its artifact and row count."""

    artifact: ArtifactRef
    num_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact.to_dict(), "num_rows": self.num_rows}

    @classmethod
    def from_dict(cls, data: Any) -> ShardRef:
        _want(isinstance(data, dict) and set(data) == {"artifact", "num_rows"},
              f"a shard entry needs exactly artifact, num_rows; got {data!r:.200}")
        _want(_is_count(data["num_rows"]) and data["num_rows"] > 0, f"shard has a bad num_rows: {data!r:.200}")
        return cls(ArtifactRef.from_dict(data["artifact"]), data["num_rows"])


@dataclass(frozen=True)
class DatasetManifest:
    """The manifest artifact's content: shards, total rows, version, schema version, and how the shards form runs.

    A **run** is a sequence of shards in sample-id order whose id ranges do not overlap; the runs of a dataset hold
    disjoint sets of samples, but their id ranges interleave. A dataset written at once is one run (``runs`` empty:
    the manifest is then byte-identical to one written before runs existed). A grown dataset keeps its previous
    shards that did not change and adds the new samples as a new run (:mod:`storage.ingest.writer`): ``runs`` then
    gives the number of shards of each run, in ``shards`` order. Readers that promise sample-id order merge the
    runs (:func:`storage.sorted_merge.merge_sorted_tables`)."""

    version: str
    num_rows: int
    shards: tuple[ShardRef, ...]
    schema_version: int = SCHEMA_VERSION
    runs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.runs:
            _want(len(self.runs) >= 2 and all(_is_count(n) and n > 0 for n in self.runs)
                  and sum(self.runs) == len(self.shards),
                  f"dataset manifest runs {list(self.runs)!r:.200} do not split its {len(self.shards)} shards into "
                  "two or more non-empty runs")

    def shard_runs(self) -> tuple[tuple[ShardRef, ...], ...]:
        """The shards grouped by run (one group for a dataset written at once)."""
        if not self.runs:
            return (self.shards,)
        out, lo = [], 0
        for n in self.runs:
            out.append(self.shards[lo:lo + n])
            lo += n
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        out = {"format": "skmm.dataset", "schema_version": self.schema_version, "version": self.version,
               "num_rows": self.num_rows, "shards": [s.to_dict() for s in self.shards]}
        if self.runs:
            out["runs"] = list(self.runs)
        return out

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no whitespace): equal manifests are equal artifacts."""
        return canonical_json(self.to_dict()).encode("ascii")

    @classmethod
    def from_dict(cls, data: Any) -> DatasetManifest:
        """Parse and validate; raises MalformedRecordError (also when the shard rows do not add up)."""
        keys = {"format", "schema_version", "version", "num_rows", "shards"}
        _want(isinstance(data, dict) and keys <= set(data) <= keys | {"runs"},
              f"a dataset manifest needs exactly {sorted(keys)} (and runs, for a grown one); got {data!r:.200}")
        _want(data["format"] == "skmm.dataset", f"not a dataset manifest: format {data['format']!r:.80}")
        _want(data["schema_version"] == SCHEMA_VERSION and not isinstance(data["schema_version"], bool),
              f"unsupported dataset schema version {data['schema_version']!r:.40} (this code reads {SCHEMA_VERSION})")
        _want(_is_sha(data["version"]), f"dataset manifest has a bad version: {data['version']!r:.80}")
        _want(_is_count(data["num_rows"]) and data["num_rows"] > 0,
              f"dataset manifest has a bad num_rows: {data['num_rows']!r:.40}")
        _want(isinstance(data["shards"], list) and data["shards"], "dataset manifest lists no shards")
        shards = tuple(ShardRef.from_dict(s) for s in data["shards"])
        total = sum(s.num_rows for s in shards)
        _want(total == data["num_rows"], f"dataset manifest says {data['num_rows']} rows but its shards hold {total}")
        runs = data.get("runs", ())
        _want(isinstance(runs, list | tuple) and (runs or "runs" not in data),
              f"dataset manifest has bad runs: {runs!r:.80}")
        return cls(data["version"], data["num_rows"], shards, data["schema_version"], tuple(runs))

    @classmethod
    def from_json(cls, text: bytes | str) -> DatasetManifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedRecordError(f"dataset manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class DatasetRef:
    """What tasks pass around for a dataset: the manifest's artifact ref, the dataset version, the row count."""

    manifest: ArtifactRef
    version: str
    num_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_dict(), "version": self.version, "num_rows": self.num_rows}

    @classmethod
    def from_dict(cls, data: Any) -> DatasetRef:
        _want(isinstance(data, dict) and set(data) == {"manifest", "version", "num_rows"},
              f"a dataset ref needs exactly manifest, version, num_rows; got {data!r:.200}")
        _want(_is_sha(data["version"]), f"dataset ref has a bad version: {data['version']!r:.80}")
        _want(_is_count(data["num_rows"]) and data["num_rows"] > 0,
              f"dataset ref has a bad num_rows: {data['num_rows']!r:.40}")
        manifest = ArtifactRef.from_dict(data["manifest"])
        _want(manifest.kind == "dataset", f"dataset ref points at a {manifest.kind!r} artifact, not a manifest")
        return cls(manifest, data["version"], data["num_rows"])


@dataclass(frozen=True)
class VectorTableRef:
    """A stored (sample_id, vector) table: its artifact, kind, producer spec and digest, shape."""

    artifact: ArtifactRef
    kind: str
    producer: dict[str, Any] = field(hash=False)
    producer_digest: str
    num_rows: int
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact.to_dict(), "kind": self.kind, "producer": self.producer,
                "producer_digest": self.producer_digest, "num_rows": self.num_rows, "dim": self.dim}

    @classmethod
    def from_dict(cls, data: Any) -> VectorTableRef:
        """Parse and validate (the digest must match the producer); raises MalformedRecordError."""
        keys = {"artifact", "kind", "producer", "producer_digest", "num_rows", "dim"}
        _want(isinstance(data, dict) and set(data) == keys, f"a vector table ref needs exactly {sorted(keys)}; "
                                                             f"got {data!r:.200}")
        _want(data["kind"] in VECTOR_KINDS, f"vector table ref has a bad kind: {data['kind']!r:.40}")
        _want(isinstance(data["producer"], dict), f"vector table producer must be a dict: {data['producer']!r:.80}")
        try:
            digest = producer_digest(data["producer"])
        except ValueError as exc:
            raise MalformedRecordError(str(exc)) from None
        _want(data["producer_digest"] == digest, f"vector table producer digest {data['producer_digest']!r:.80} "
                                                 f"does not match its producer ({digest})")
        _want(_is_count(data["num_rows"]) and data["num_rows"] > 0, f"bad num_rows: {data['num_rows']!r:.40}")
        _want(_is_count(data["dim"]) and data["dim"] > 0, f"bad dim: {data['dim']!r:.40}")
        artifact = ArtifactRef.from_dict(data["artifact"])
        _want(artifact.kind == data["kind"], f"vector table ref kind {data['kind']} != artifact kind {artifact.kind}")
        return cls(artifact, data["kind"], data["producer"], digest, data["num_rows"], data["dim"])


# ---------------------------------------------------------------------------------------------- samples
_COLUMNS = tuple(SAMPLE_SCHEMA.names)


def _records_to_columns(table_or_records: pa.Table | Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Input as Python lists per column; ``sample_id`` may be omitted where ``data`` is given."""
    if isinstance(table_or_records, pa.Table):
        unknown = set(table_or_records.column_names) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown sample column(s) {sorted(unknown)}; expected {list(_COLUMNS)}")
        n = table_or_records.num_rows
        return {c: table_or_records.column(c).to_pylist() if c in table_or_records.column_names else [None] * n
                for c in _COLUMNS}
    cols: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
    for i, rec in enumerate(table_or_records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"sample record {i} is a {type(rec).__name__}, not a mapping")
        unknown = set(rec) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"sample record {i} has unknown field(s) {sorted(unknown)}; expected {list(_COLUMNS)}")
        for c in _COLUMNS:
            cols[c].append(rec.get(c))
    return cols


def _normalise(cols: dict[str, list[Any]]) -> None:
    """Fill and check ids, labels, splits and source URIs in place; raises ValueError naming the row."""
    for i in range(len(cols["sample_id"])):
        sid, data, label, split, uri = (cols[c][i] for c in ("sample_id", "data", "label", "split", "source_uri"))
        if data is not None:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"sample row {i}: data must be bytes, got {type(data).__name__}")
            data = cols["data"][i] = bytes(data)
            if sid is None:
                sid = cols["sample_id"][i] = sample_id(data)
            elif sid != sample_id(data):
                raise ValueError(f"sample row {i}: sample_id {sid} is not the sha256 of its data")
        if not _is_sha(sid):
            raise ValueError(f"sample row {i}: sample_id must be 64 lowercase hex digits (or give data); got {sid!r}")
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            cols["label"][i] = str(int(label))
        elif isinstance(label, numbers.Real) and not isinstance(label, bool) and math.isfinite(label):
            # as storage.ingest does: integral floats are integers (a pandas int column with gaps arrives as
            # float); other numbers are regression targets, in their shortest round-trip decimal text
            cols["label"][i] = str(int(label)) if float(label).is_integer() else repr(float(label))
        elif label is not None and not isinstance(label, str):
            raise ValueError(f"sample {sid}: label must be a string, a number or None; got {type(label).__name__}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"sample {sid}: split must be one of {SPLITS} or None; got {split!r}")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"sample {sid}: source_uri must be a non-empty string; got {uri!r}")


def _deduplicate(cols: dict[str, list[Any]]) -> list[int]:
    """Row indices to keep, sorted by sample id: exact duplicates collapse to their first occurrence.

    Two rows with one id but a different label (or split) are an error, not a choice: keeping either would make
    the dataset depend on input order, and a sample in two splits leaks between them.
    """
    first: dict[str, int] = {}
    for i, sid in enumerate(cols["sample_id"]):
        j = first.setdefault(sid, i)
        if j == i:
            continue
        for col in ("label", "split"):
            if cols[col][i] != cols[col][j]:
                raise ValueError(f"sample {sid} appears twice with conflicting {col}s {cols[col][j]!r} "
                                 f"({cols['source_uri'][j]}) and {cols[col][i]!r} ({cols['source_uri'][i]})")
    return [first[sid] for sid in sorted(first)]


def _parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, **SAMPLE_PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def write_samples(store: ArtifactStore, table_or_records: pa.Table | Iterable[Mapping[str, Any]],
                  shard_rows: int = DEFAULT_SHARD_ROWS) -> DatasetRef:
    """Validate, deduplicate and sort samples, store them as Parquet shards plus a manifest; return the ref.

    ``table_or_records``: a pyarrow Table or mappings with the columns of :data:`SAMPLE_SCHEMA`; ``sample_id``
    may be omitted where ``data`` is given (and, where both are given, must be the data's sha256). Rows with the
    same id collapse to the first one (its ``source_uri`` and ``data`` are kept); the same id with different
    labels or splits raises ValueError naming the id. Rows are sorted by sample id and cut into shards of
    ``shard_rows`` rows (one Parquet row group each; a shard is built in memory, so keep it small when rows
    carry image bytes). The same samples in any order give the same shards, manifest and ref.
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows <= 0:
        raise ValueError(f"shard_rows must be a positive integer; got {shard_rows!r}")
    cols = _records_to_columns(table_or_records)
    if not cols["sample_id"]:
        raise ValueError("cannot write an empty dataset: no samples given")
    _normalise(cols)
    keep = _deduplicate(cols)
    table = pa.table({c: [cols[c][i] for i in keep] for c in _COLUMNS}, schema=SAMPLE_SCHEMA)
    version = dataset_version(zip(table["sample_id"].to_pylist(), table["label"].to_pylist(),
                                  table["split"].to_pylist(), strict=True))
    shards = []
    for start in range(0, table.num_rows, shard_rows):
        shard = table.slice(start, shard_rows)
        ref = store.put_bytes(_parquet_bytes(shard, shard_rows), "samples", ".parquet")
        shards.append(ShardRef(ref, shard.num_rows))
    manifest = DatasetManifest(version, table.num_rows, tuple(shards))
    return DatasetRef(store.put_bytes(manifest.to_json(), "dataset", ".json"), version, table.num_rows)


def load_manifest(store: ArtifactStore, dataset_ref: DatasetRef) -> DatasetManifest:
    """The verified manifest of ``dataset_ref``; MalformedRecordError if it disagrees with the ref."""
    manifest = DatasetManifest.from_json(store.get_bytes(dataset_ref.manifest))
    _want(manifest.version == dataset_ref.version and manifest.num_rows == dataset_ref.num_rows,
          f"dataset manifest {dataset_ref.manifest.uri} (version {manifest.version[:12]}…, {manifest.num_rows} rows) "
          f"does not match its ref (version {dataset_ref.version[:12]}…, {dataset_ref.num_rows} rows)")
    return manifest


def read_samples(store: ArtifactStore, dataset_ref: DatasetRef, columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of the dataset, in sample-id order, as one Table (optionally only ``columns``).

    Every shard is verified against its sha256 first: a corrupted or missing shard raises
    ArtifactCorruptedError / ArtifactNotFoundError naming it. The rows of a grown dataset's runs (each in id order,
    their ids interleaved) are sorted together.
    """
    manifest = load_manifest(store, dataset_ref)
    if not manifest.runs:
        return pa.concat_tables([read_shard(store, shard, columns) for shard in manifest.shards])
    wanted = None if columns is None else list(columns)
    read = wanted if wanted is None or "sample_id" in wanted else ["sample_id", *wanted]  # the sort key
    rows = pa.concat_tables([read_shard(store, shard, read) for shard in manifest.shards]).sort_by("sample_id")
    return rows if read is wanted else rows.select(wanted)


_SHARD_CACHE: OrderedDict[tuple[str, str], pa.Table] = OrderedDict()
_SHARD_CACHE_BYTES = 256 * 2**20
_SHARD_LOCK = threading.Lock()


def read_shard(store: ArtifactStore, shard: ShardRef, columns: Sequence[str] | None = None) -> pa.Table:
    """One verified shard's rows (optionally only ``columns``): the unit that stages can process in parallel.

    Verified shards are memoised per process by (store, sha256) up to 256 MiB: a shard never changes, and the
    stages of one run read the same sample table several times.
    """
    if columns is not None:
        columns = list(columns)
        unknown = set(columns) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown sample column(s) {sorted(unknown)}; expected some of {list(_COLUMNS)}")
    key = (store.url, shard.artifact.sha256)
    with _SHARD_LOCK:
        table = _SHARD_CACHE.get(key)
        if table is not None:
            _SHARD_CACHE.move_to_end(key)
    if table is None:
        table = pq.read_table(pa.BufferReader(store.get_bytes(shard.artifact)))
        _want(table.num_rows == shard.num_rows and table.schema.equals(SAMPLE_SCHEMA),
              f"shard {shard.artifact.uri} does not hold {shard.num_rows} sample rows of the expected schema")
        with _SHARD_LOCK:
            if table.nbytes <= _SHARD_CACHE_BYTES:
                _SHARD_CACHE[key] = table
                while sum(t.nbytes for t in _SHARD_CACHE.values()) > _SHARD_CACHE_BYTES:
                    _SHARD_CACHE.popitem(last=False)
    return table.select(columns) if columns is not None else table


# ---------------------------------------------------------------------------------------------- vectors
# A stored vector table is one Parquet file of (sample_id, vector) rows sorted by sample id, in row groups of
# DEFAULT_SHARD_ROWS rows. Pools reach 10^7 rows (2.6 GB of float32 at dim 64), so tables are streamed: written
# row group by row group straight into the store, read row group by row group while the bytes are hashed (one
# pass), and matched to wanted ids by binary search on fixed-width id arrays — never a per-sample Python object.
_ID_LEN = 64
ID_DTYPE = np.dtype(f"S{_ID_LEN}")  #: sample ids as fixed-width ASCII bytes: sortable, searchable, 64 B each
_READ_CHUNK = 8 * 2**20
_SCAN_BATCH_ROWS = 8192  # rows decoded at a time when a vector table is scanned (a row group is 65 536)
_HEX = np.zeros(256, dtype=bool)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = True


def _check_ids(ids: Sequence[str], what: str) -> list[str]:
    ids = list(ids)
    bad = next((s for s in ids if not _is_sha(s)), None)
    if bad is not None:
        raise ValueError(f"{what}: sample ids must be 64 lowercase hex digits; got {bad!r:.80}")
    return ids


def _string_ids(values: pa.Array) -> np.ndarray:
    """Zero-copy ``ID_DTYPE`` view of an Arrow string array whose values are all 64 characters long."""
    if values.null_count:
        raise ValueError("sample ids must not be null")
    n = len(values)
    if n == 0:
        return np.empty(0, ID_DTYPE)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=n + 1, offset=values.offset * 4)
    if int(offsets[-1]) - int(offsets[0]) != n * _ID_LEN or np.any(np.diff(offsets) != _ID_LEN):
        raise ValueError("sample ids must be 64 lowercase hex digits; some have another length")
    return np.frombuffer(data_buf, ID_DTYPE, count=n, offset=int(offsets[0]))


def sample_id_array(ids: Any) -> np.ndarray:
    """Sample ids as a 1-D ``ID_DTYPE`` array (64 ASCII bytes each), the form vector tables are matched on.

    Accepts such an array (returned as is), an Arrow string array or chunked array (one copy of the id bytes, no
    Python objects), or a sequence of str (each checked to be 64 lowercase hex digits)."""
    if isinstance(ids, np.ndarray) and ids.dtype == ID_DTYPE:
        return ids
    if isinstance(ids, pa.ChunkedArray):
        chunks = [_string_ids(c) for c in ids.chunks]
        return np.concatenate(chunks) if chunks else np.empty(0, ID_DTYPE)
    if isinstance(ids, pa.Array):
        return _string_ids(ids).copy()
    return np.array(_check_ids(ids, "sample ids"), dtype=ID_DTYPE).reshape(-1)


def _check_id_block(ids: np.ndarray, what: str) -> None:
    """Raise unless every id is 64 lowercase hex digits (checked in blocks: bounded temporaries)."""
    for lo in range(0, len(ids), DEFAULT_SHARD_ROWS):
        block = ids[lo:lo + DEFAULT_SHARD_ROWS]
        ok = _HEX[block.view(np.uint8).reshape(-1, _ID_LEN)].all(axis=1)
        if not ok.all():
            bad = block[int(np.flatnonzero(~ok)[0])]
            raise ValueError(f"{what}: sample ids must be 64 lowercase hex digits; got {bad!r:.80}")


def _vector_schema(kind: str, dim: int, producer: dict[str, Any], digest: str) -> pa.Schema:
    return pa.schema([pa.field("sample_id", pa.string(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)],
                     metadata={"skmm.table": kind, "skmm.schema_version": str(SCHEMA_VERSION),
                               "skmm.producer": _canonical_json(producer), "skmm.producer_digest": digest})


def _vector_producer(producer: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], str]:
    """(plain-JSON copy of the producer, its digest), after checking kind and producer."""
    if kind not in VECTOR_KINDS:
        raise ValueError(f"vector table kind must be one of {VECTOR_KINDS}; got {kind!r}")
    if not isinstance(producer, Mapping) or not producer:
        raise ValueError("producer must be a non-empty dict describing what made the vectors")
    plain = json.loads(_canonical_json(dict(producer)))  # a plain-JSON copy, exactly what is stored
    return plain, producer_digest(plain)


class _TellingSink:
    """The store's staging file as a Parquet sink: adds ``tell`` and keeps pyarrow from closing it."""

    def __init__(self, fh: Any) -> None:
        self._fh, self._pos, self.closed = fh, 0, False

    def write(self, data: Any) -> int:
        self._pos += memoryview(data).nbytes
        return self._fh.write(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the store's writer closes (and publishes) the file
        pass


def _ids_to_arrow(ids: np.ndarray) -> pa.StringArray:
    offsets = np.arange(len(ids) + 1, dtype=np.int32) * _ID_LEN
    return pa.StringArray.from_buffers(len(ids), pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(ids)))


def _rows_table(schema: pa.Schema, ids: np.ndarray, rows: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.Table.from_arrays([_ids_to_arrow(ids), pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])],
                                schema=schema)


def write_vector_chunks(store: ArtifactStore, chunks: Iterable[tuple[Any, Any]], producer: Mapping[str, Any],
                        kind: Literal["embeddings", "sketch"] = "embeddings") -> VectorTableRef:
    """Store (ids, float matrix) chunks whose ids ascend strictly across all chunks as one vector table.

    The streaming form of :func:`write_vectors`, with byte-identical output for the same rows: only one row group
    (DEFAULT_SHARD_ROWS rows) is buffered, and the Parquet bytes go straight into the store's staging file, so a
    table of 10^7 rows is written without holding it. ids: anything :func:`sample_id_array` takes."""
    producer, digest = _vector_producer(producer, kind)
    schema: pa.Schema | None = None
    dim = num_rows = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_rows = 0
    last = None
    with store.writer(kind, ".parquet") as fh:
        writer: pq.ParquetWriter | None = None

        def flush(rows: int) -> None:
            nonlocal pending, pending_rows
            ids = np.concatenate([c[0] for c in pending]) if len(pending) > 1 else pending[0][0]
            mat = np.concatenate([c[1] for c in pending]) if len(pending) > 1 else pending[0][1]
            writer.write_table(_rows_table(schema, ids[:rows], mat[:rows]), row_group_size=DEFAULT_SHARD_ROWS)
            pending = [(ids[rows:], mat[rows:])] if rows < len(ids) else []
            pending_rows = len(ids) - rows

        try:
            for raw_ids, raw_mat in chunks:
                ids = sample_id_array(raw_ids)
                mat = np.asarray(raw_mat)
                if mat.ndim != 2 or not np.issubdtype(mat.dtype, np.floating) or 0 in mat.shape:
                    raise ValueError(f"each chunk needs a non-empty 2-D floating matrix; got shape {mat.shape} "
                                     f"dtype {mat.dtype}")
                if len(ids) != len(mat):
                    raise ValueError(f"{len(ids)} sample ids for a chunk of {len(mat)} rows")
                if schema is None:
                    dim = mat.shape[1]
                    schema = _vector_schema(kind, dim, producer, digest)
                    writer = pq.ParquetWriter(_TellingSink(fh), schema, **_PARQUET_OPTIONS)
                elif mat.shape[1] != dim:
                    raise ValueError(f"chunk of dim {mat.shape[1]} after chunks of dim {dim}")
                _check_id_block(ids, "write_vector_chunks")
                if np.any(ids[1:] <= ids[:-1]) or (last is not None and ids[0] <= last):
                    raise ValueError("write_vector_chunks needs sample ids in strictly ascending order across "
                                     "chunks (sort them, or use write_vectors)")
                mat = mat.astype(np.float32, copy=False)
                finite = np.isfinite(mat).all(axis=1)
                if not finite.all():
                    raise ValueError(f"vector for sample {ids[np.flatnonzero(~finite)[0]].decode()} has non-finite "
                                     "values")
                last = ids[-1]
                pending.append((ids, mat))
                pending_rows += len(ids)
                num_rows += len(ids)
                while pending_rows >= DEFAULT_SHARD_ROWS:
                    flush(DEFAULT_SHARD_ROWS)
            if writer is None:
                raise ValueError("cannot write an empty vector table: no rows given")
            if pending_rows:
                flush(pending_rows)
        finally:
            if writer is not None:
                writer.close()
    return VectorTableRef(fh.ref, kind, producer, digest, num_rows, dim)


def write_vectors(store: ArtifactStore, sample_ids: Sequence[str], matrix: Any, producer: Mapping[str, Any],
                  kind: Literal["embeddings", "sketch"] = "embeddings") -> VectorTableRef:
    """Store an N×k matrix of per-sample vectors as a Parquet table (sample_id, vector: fixed_size_list<float32>).

    ``producer`` says what made the vectors (e.g. ``{"model": "ViT-B-32", "pretrained": "openai"}`` or a
    ``SketchSpec.to_dict()``); it is written into the Parquet schema metadata and the ref, with its digest
    (:func:`producer_digest`). Rows are sorted by sample id, so the same vectors in any order give the same
    artifact. Floating input is stored as float32; ids must be unique and the values finite.
    """
    producer, digest = _vector_producer(producer, kind)
    ids = _check_ids(sample_ids, "write_vectors")
    mat = np.asarray(matrix)
    if mat.ndim != 2 or not np.issubdtype(mat.dtype, np.floating):
        raise ValueError(f"matrix must be a 2-D floating array; got shape {mat.shape} dtype {mat.dtype}")
    n, k = mat.shape
    if n == 0 or k == 0:
        raise ValueError(f"cannot write an empty vector table (shape {mat.shape})")
    if n != len(ids):
        raise ValueError(f"{len(ids)} sample ids for a matrix of {n} rows")
    id_bytes = np.array(ids, dtype=ID_DTYPE)
    order = np.argsort(id_bytes, kind="stable")
    sorted_ids = id_bytes[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        raise ValueError(f"sample id {sorted_ids[dup[0]].decode()} appears more than once in write_vectors")
    mat = mat.astype(np.float32, copy=False)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        raise ValueError(f"vector for sample {ids[int(np.flatnonzero(~finite)[0])]} has non-finite values")
    table = _rows_table(_vector_schema(kind, k, producer, digest), sorted_ids, mat[order])
    with store.writer(kind, ".parquet") as fh, pq.ParquetWriter(_TellingSink(fh), table.schema,
                                                                **_PARQUET_OPTIONS) as writer:
        writer.write_table(table, row_group_size=DEFAULT_SHARD_ROWS)
    return VectorTableRef(fh.ref, kind, producer, digest, n, k)


class _WindowFile:
    """A read-only file for pyarrow: reads inside the current window come from memory, others from ``fh``."""

    def __init__(self, fh: Any, size: int) -> None:
        self._fh, self._size, self._pos = fh, size, 0
        self.window_start, self.window = 0, b""
        self.closed = False

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, nbytes: int = -1) -> bytes:
        start = self._pos
        end = self._size if nbytes is None or nbytes < 0 else min(start + nbytes, self._size)
        self._pos = end
        lo = start - self.window_start
        if 0 <= lo and end - self.window_start <= len(self.window):
            return self.window[lo:end - self.window_start]
        self._fh.seek(start)
        return self._fh.read(end - start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _row_group_span(meta: pq.FileMetaData, i: int) -> tuple[int, int]:
    """[start, end) byte range of row group ``i``'s column chunks."""
    rg = meta.row_group(i)
    starts, ends = [], []
    for j in range(rg.num_columns):
        col = rg.column(j)
        start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        starts.append(start)
        ends.append(start + col.total_compressed_size)
    return min(starts), max(ends)


def _check_vector_schema(ref: VectorTableRef, schema: pa.Schema, num_rows: int) -> None:
    meta = schema.metadata or {}
    _want(meta.get(b"skmm.producer_digest", b"").decode() == ref.producer_digest and num_rows == ref.num_rows
          and schema.names == ["sample_id", "vector"] and pa.types.is_fixed_size_list(schema.field("vector").type)
          and schema.field("vector").type.list_size == ref.dim,
          f"vector table {ref.artifact.uri} does not match its ref (producer, rows or dim)")


def _scan_vectors(store: ArtifactStore, ref: VectorTableRef) -> Iterable[tuple[pa.Array, np.ndarray, np.ndarray]]:
    """Yield (ids as Arrow strings, ids as ``ID_DTYPE`` view, float32 rows) per ``_SCAN_BATCH_ROWS`` rows of a row
    group, in stored order (a row group's bytes are read once into memory; its rows are decoded a batch at a time,
    so Arrow never holds a decoded 65 536-row group: bench/README.md §12).

    The bytes are read once, in order, and hashed as they stream by; the sha256 and size are checked after the
    last row group (ArtifactCorruptedError naming the artifact), and a table that does not decode is reported as
    corrupted when its bytes do not match, as malformed otherwise. Ids must ascend strictly.

    A linked table (:mod:`storage.linked_vectors`) yields its parts merged in id order, with None for the Arrow
    ids."""
    if is_linked(ref):
        from storage.linked_vectors import scan_linked  # imported here: it imports this module

        yield from scan_linked(store, ref)
        return
    what = f"artifact {ref.artifact.uri}"
    path = store._path(store._rel_from_uri(ref.artifact.uri))
    hasher, pos, size = hashlib.sha256(), 0, ref.artifact.size
    try:
        seq, rand = store.fs.open(path, "rb"), store.fs.open(path, "rb")
    except Exception as exc:
        raise _translate(exc, what) from None

    def advance(to: int) -> bytes:
        nonlocal pos
        try:
            data = seq.read(to - pos) if to > pos else b""
        except Exception as exc:
            raise _translate(exc, what) from None
        hasher.update(data)
        pos += len(data)
        return data

    def verify() -> None:
        while pos < size and advance(min(pos + _READ_CHUNK, size)):
            pass
        while advance(pos + _READ_CHUNK if pos > size else pos + 1):  # a longer object is not the ref's bytes
            pass
        ArtifactStore._verify(ref.artifact, hasher.hexdigest(), pos)

    with seq, rand:
        try:
            source = _WindowFile(rand, size)
            parquet = pq.ParquetFile(source, pre_buffer=False)  # the window holds the bytes: no second copy
            _check_vector_schema(ref, parquet.schema_arrow, parquet.metadata.num_rows)
            last = None
            for i in range(parquet.num_row_groups):
                start, end = _row_group_span(parquet.metadata, i)
                _want(start >= pos, f"vector table {ref.artifact.uri} has overlapping row groups")
                while pos < start:
                    advance(min(start, pos + _READ_CHUNK))
                source.window_start, source.window = start, advance(end)
                for batch in parquet.iter_batches(_SCAN_BATCH_ROWS, row_groups=[i], use_threads=False):
                    ids, vectors = batch.column(0), batch.column(1)
                    _want(vectors.null_count == 0, f"vector table {ref.artifact.uri} has null vectors")
                    id_view = _string_ids(ids)
                    _want(bool(np.all(id_view[1:] > id_view[:-1])) and (last is None or id_view[:1] > last),
                          f"vector table {ref.artifact.uri} is not sorted by sample id")
                    last = id_view[-1:]
                    rows = vectors.flatten().to_numpy(zero_copy_only=True).reshape(len(ids), ref.dim)
                    yield ids, id_view, rows
                source.window = b""
        except (StorageError, OSError, ValueError, pa.ArrowException) as exc:
            verify()  # damaged bytes explain a decode error or a bad table best: ArtifactCorruptedError
            if isinstance(exc, StorageError):
                raise
            raise MalformedRecordError(f"vector table {ref.artifact.uri} cannot be read: {exc}") from None
        verify()


def read_vector_matrix(store: ArtifactStore, ref: VectorTableRef, sample_ids: Any = None) -> np.ndarray:
    """The float32 vectors of a verified vector table: all rows in stored (sample-id) order, or the rows of
    ``sample_ids`` in their order (ValueError naming the missing ids if some are not in the table).

    One output array is the only N × dim allocation: rows are decoded a batch at a time and placed by binary
    search on sorted ids. ``sample_ids``: anything :func:`sample_id_array` takes; already sorted and unique ids
    (a dataset split) need no further copy, others cost one sort and a final reordering copy."""
    if sample_ids is None:
        out = np.empty((ref.num_rows, ref.dim), np.float32)
        lo = 0
        for _, _, rows in _scan_vectors(store, ref):
            out[lo:lo + len(rows)] = rows
            lo += len(rows)
        return out
    wanted = sample_id_array(sample_ids)
    inverse = None
    if not np.all(wanted[1:] > wanted[:-1]):
        wanted, inverse = np.unique(wanted, return_inverse=True)
    out = np.empty((len(wanted), ref.dim), np.float32)
    found = np.zeros(len(wanted), dtype=bool)
    for _, ids, rows in _scan_vectors(store, ref):
        lo, hi = np.searchsorted(wanted, ids[0]), np.searchsorted(wanted, ids[-1], side="right")
        if hi - lo == len(ids) and np.array_equal(wanted[lo:hi], ids):
            out[lo:hi], found[lo:hi] = rows, True  # the common case: the split is the table
            continue
        pos = np.minimum(np.searchsorted(ids, wanted[lo:hi]), len(ids) - 1)
        hit = ids[pos] == wanted[lo:hi]
        out[lo:hi][hit] = rows[pos[hit]]
        found[lo:hi] |= hit
    if not found.all():
        requested = sample_id_array(sample_ids)
        lost = ~found if inverse is None else ~found[inverse]
        missing = [s.decode() for s in requested[lost][:3]]
        raise ValueError(f"{int(lost.sum())} of {len(requested)} requested sample ids are not in vector table "
                         f"{ref.artifact.uri}: {', '.join(missing)}{' …' if lost.sum() > 3 else ''}")
    return out if inverse is None else out[inverse]


def scan_vector_rows(store: ArtifactStore, ref: VectorTableRef, sample_ids: Any
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """The rows of :func:`read_vector_matrix` for sorted, unique ``sample_ids`` (a dataset split), streamed: one
    (first position, float32 rows) per decoded batch, consecutive and in the ids' order, so that a reader keeps
    only what it derives from them (e.g. a moment, or a projection). The table is verified after its last row
    group, as :func:`read_vector_matrix` does: what a reader derived counts once the scan has ended without an
    error. ValueError naming the first missing id if some are not in the table (after the whole scan)."""
    wanted = sample_id_array(sample_ids)
    if not np.all(wanted[1:] > wanted[:-1]):
        raise ValueError("scan_vector_rows takes sorted, unique sample ids (read_vector_matrix takes any)")
    done, missing = 0, None  # rows [0, done) yielded; the position of the first missing id
    for _, ids, rows in _scan_vectors(store, ref):
        lo, hi = int(np.searchsorted(wanted, ids[0])), int(np.searchsorted(wanted, ids[-1], side="right"))
        if missing is not None or hi == lo:
            continue  # read on all the same: the bytes are verified at the end
        if lo > done:  # wanted[done:lo] lie between batches
            missing = done
            continue
        if hi - lo == len(ids) and np.array_equal(wanted[lo:hi], ids):
            yield lo, rows  # the common case: the split is the table
        else:
            pos = np.minimum(np.searchsorted(ids, wanted[lo:hi]), len(ids) - 1)
            hit = ids[pos] == wanted[lo:hi]
            if not hit.all():
                missing = lo + int(np.argmin(hit))
                continue
            yield lo, rows[pos]
        done = hi
    if missing is None and done < len(wanted):
        missing = done
    if missing is not None:
        raise ValueError(f"sample id {wanted[missing].decode()} (of {len(wanted)} requested; perhaps more) is not "
                         f"in vector table {ref.artifact.uri}")


def read_vectors(store: ArtifactStore, ref: VectorTableRef,
                 sample_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, float32 matrix) of a verified vector table: in stored (sample-id) order, or in the order of
    ``sample_ids`` — ValueError naming the missing ids if some are not in the table. For large pools prefer
    :func:`read_vector_matrix`, which takes and gives no per-sample Python objects."""
    if sample_ids is None:
        ids: list[str] = []
        out = np.empty((ref.num_rows, ref.dim), np.float32)
        for arrow_ids, id_bytes, rows in _scan_vectors(store, ref):
            out[len(ids):len(ids) + len(rows)] = rows
            ids.extend(arrow_ids.to_pylist() if arrow_ids is not None else id_bytes.astype(str).tolist())
        return ids, out
    wanted = _check_ids(sample_ids, "read_vectors")
    return wanted, read_vector_matrix(store, ref, np.array(wanted, dtype=ID_DTYPE).reshape(-1))


LINKED_SUFFIX = ".json"  # a vector table artifact with this suffix is a link manifest (storage.linked_vectors)


def is_linked(ref: VectorTableRef) -> bool:
    """Whether ``ref`` names a link manifest (:mod:`storage.linked_vectors`) rather than one Parquet table."""
    return ref.artifact.uri.endswith(LINKED_SUFFIX)


def vector_table_ids(store: ArtifactStore, ref: VectorTableRef) -> np.ndarray:
    """The sample ids of a stored vector table as a sorted ``ID_DTYPE`` array, from its footer and id column
    alone (~64 bytes a row, not the ``4 · dim`` of its vectors): a *probe*, not verified against the sha256 — use
    it to decide which tables to read (verified) at all. MalformedRecordError if the footer does not match the ref
    (producer, rows, dim), the ids are not 64 hex digits or do not ascend strictly; the store's error if it
    cannot be read."""
    what = f"artifact {ref.artifact.uri}"
    try:
        with store.fs.open(store._path(store._rel_from_uri(ref.artifact.uri)), "rb") as fh:
            parquet = pq.ParquetFile(_WindowFile(fh, ref.artifact.size), pre_buffer=False)
            _check_vector_schema(ref, parquet.schema_arrow, parquet.metadata.num_rows)
            column = parquet.read(columns=["sample_id"], use_threads=False).column("sample_id")
    except StorageError:
        raise
    except (pa.ArrowInvalid, ValueError) as exc:  # not Parquet, or not this table's
        raise MalformedRecordError(f"vector table {ref.artifact.uri} does not decode ({exc})") from None
    except Exception as exc:  # missing, unreachable, …
        raise _translate(exc, what) from None
    try:
        ids = sample_id_array(column)
    except ValueError as exc:
        raise MalformedRecordError(f"vector table {ref.artifact.uri}: {exc}") from None
    _want(len(ids) == ref.num_rows and bool(np.all(ids[1:] > ids[:-1])),
          f"vector table {ref.artifact.uri}: its sample ids do not ascend strictly")
    return ids


def _table_id_range(store: ArtifactStore, ref: VectorTableRef) -> tuple[bytes, bytes] | None:
    """(first id, last id) of a stored vector table from its Parquet footer alone (a linked table's: from its
    manifest), or None if it lacks them."""
    if is_linked(ref):
        from storage.linked_vectors import linked_range  # imported here: it imports this module

        try:
            return linked_range(store, ref)
        except StorageError:
            return None  # the verified read reports it properly
    try:
        with store.fs.open(store._path(store._rel_from_uri(ref.artifact.uri)), "rb") as fh:
            meta = pq.ParquetFile(_WindowFile(fh, ref.artifact.size)).metadata
    except Exception:
        return None  # unreadable here: the verified read reports it properly
    stats = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
    if not stats or any(s is None or not s.has_min_max for s in stats):
        return None
    return str(stats[0].min).encode(), str(stats[-1].max).encode()


class _MergeCursor:
    """One table of a streaming merge: its current scan batch, consumed from the front."""

    def __init__(self, store: ArtifactStore, ref: VectorTableRef, index: int) -> None:
        self.ref, self.index = ref, index
        self._batches = iter(_scan_vectors(store, ref))
        self.ids: np.ndarray = np.empty(0, ID_DTYPE)
        self.rows: np.ndarray = np.empty((0, ref.dim), np.float32)

    def refill(self) -> bool:
        """Load the next batch once the current one is used up; False when the table is done (bytes verified)."""
        while not len(self.ids):
            batch = next(self._batches, None)
            if batch is None:
                return False
            _, self.ids, self.rows = batch
        return True

    def take(self, bound: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return the current batch's rows with id <= ``bound``: all the table's rows up to ``bound``
        when ``bound`` is at most the batch's last id (the table's ids ascend)."""
        cut = int(np.searchsorted(self.ids, bound, side="right"))
        taken = self.ids[:cut], self.rows[:cut]
        self.ids, self.rows = self.ids[cut:], self.rows[cut:]
        return taken

    def drain(self) -> None:
        """Read the rest of the table, so that damaged bytes raise ArtifactCorruptedError."""
        for _ in self._batches:
            pass

    def close(self) -> None:
        self._batches.close()  # type: ignore[attr-defined]


def _open_cursor(store: ArtifactStore, ref: VectorTableRef, index: int, first: bytes) -> _MergeCursor | None:
    """A cursor on a table's first batch, or None if it has no rows. The merge opens a table when it reaches
    ``first`` (its footer's first id): a table starting before that would come too late, so it is refused."""
    cursor = _MergeCursor(store, ref, index)
    if not cursor.refill():
        return None
    if cursor.ids[0] < first:
        cursor.drain()
        raise ValueError(f"vector table {ref.artifact.uri} starts at sample {cursor.ids[0].decode()}, before the "
                         "first id its footer records")
    return cursor


def _merge_chunk(taken: list[tuple[_MergeCursor, np.ndarray, np.ndarray]], digest: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rows taken from several tables (in ``refs`` order, every copy of each id among them) in id order:
    identical duplicates collapse to the first table's row, different ones raise ValueError naming the sample."""
    taken = [t for t in taken if len(t[1])]
    if len(taken) == 1:
        return taken[0][1], taken[0][2]
    ids = np.concatenate([t[1] for t in taken])
    rows = np.concatenate([t[2] for t in taken])
    order = np.argsort(ids, kind="stable")  # stable: among equal ids the earliest table comes first
    ids, rows = ids[order], rows[order]
    same = ids[1:] == ids[:-1]
    conflict = np.flatnonzero(same & ~(rows[1:] == rows[:-1]).all(axis=1))
    if conflict.size:
        sid = ids[conflict[0]]
        for cursor, part, _ in taken:  # corrupted bytes explain a difference best: verify the tables holding it
            if part[min(int(np.searchsorted(part, sid)), len(part) - 1)] == sid:
                cursor.drain()
        raise ValueError(f"sample {sid.decode()} has different vectors in two tables of producer {digest}")
    if not same.any():
        return ids, rows
    keep = np.concatenate([[True], ~same])
    return ids[keep], rows[keep]


def _merged_rows(store: ArtifactStore, refs: Sequence[VectorTableRef], firsts: Sequence[bytes], digest: str
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The sorted union of overlapping tables (earlier in ``refs`` wins among identical duplicates), streamed.

    A k-way merge over scan batches: each chunk ends at the smallest last id of the open tables' current batches
    and takes every id up to it from each, so all copies of an id land in one chunk. A table is opened when the
    merge reaches ``firsts[i]`` (its footer's first id; b"" opens it at once) and closed once used up: memory
    is one scan batch per table overlapping the current id — about one per run — not the group's rows."""
    pending = sorted(range(len(refs)), key=lambda i: (firsts[i], i))
    pending.reverse()  # next to open at the end
    live: list[_MergeCursor] = []
    try:
        while True:
            live = [c for c in live if c.refill()]
            bound = min((c.ids[-1] for c in live), default=None)
            while pending and (bound is None or firsts[pending[-1]] <= bound):
                i = pending.pop()
                cursor = _open_cursor(store, refs[i], i, firsts[i])
                if cursor is not None:
                    live.append(cursor)
                    bound = cursor.ids[-1] if bound is None else min(bound, cursor.ids[-1])
            if bound is None:
                return
            live.sort(key=lambda c: c.index)
            yield _merge_chunk([(c, *c.take(bound)) for c in live], digest)
    finally:
        for cursor in live:
            cursor.close()


def combine_vectors(store: ArtifactStore, refs: Sequence[VectorTableRef]) -> VectorTableRef:
    """Concatenate vector tables (shards) of one producer into one stored table; return its ref.

    Refuses, with a ValueError naming both digests, tables whose producers (or kinds, or dims) differ. A sample
    present in several shards collapses if its vectors are identical and is an error otherwise. The output is
    the same artifact as :func:`write_vectors` of the union; shards whose id ranges do not overlap (a dataset's
    shards, in any order) are streamed one row group at a time, and overlapping ones (a grown dataset's runs,
    whose ranges interleave) are merged a scan batch per overlapping table at a time (:func:`_merged_rows`).
    """
    refs = list(refs)
    if not refs:
        raise ValueError("combine_vectors needs at least one vector table")
    head = refs[0]
    for other in refs[1:]:
        if other.producer_digest != head.producer_digest:
            raise ValueError(f"refusing to combine vector tables of different producers: {head.artifact.uri} has "
                             f"producer digest {head.producer_digest} and {other.artifact.uri} has "
                             f"{other.producer_digest}")
        if (other.kind, other.dim) != (head.kind, head.dim):
            raise ValueError(f"refusing to combine a {head.kind} table of dim {head.dim} with a {other.kind} table "
                             f"of dim {other.dim}")
    if len(refs) == 1:
        return head
    ranges = [_table_id_range(store, ref) for ref in refs]
    if any(r is None for r in ranges):
        groups = [list(range(len(refs)))]
    else:
        groups = []
        top = b""
        for i in sorted(range(len(refs)), key=lambda i: (ranges[i], i)):
            if groups and ranges[i][0] <= top:
                groups[-1].append(i)
            else:
                groups.append([i])
            top = max(top, ranges[i][1])

    def rows() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for group in groups:
            if len(group) == 1:
                yield from ((ids, rows) for _, ids, rows in _scan_vectors(store, refs[group[0]]))
            else:
                members = sorted(group)
                firsts = [ranges[i][0] if ranges[i] else b"" for i in members]
                yield from _merged_rows(store, [refs[i] for i in members], firsts, head.producer_digest)

    return write_vector_chunks(store, rows(), head.producer, head.kind)  # type: ignore[arg-type]
