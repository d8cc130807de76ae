"""Ingest a Parquet table of precomputed embeddings: a sample table (``data`` null) plus a vector table.

Scale: unlike the image sources, the table is read into memory whole (a table of vectors: N × k float32, e.g.
10^6 × 512 = 2 GiB), because the vector table written beside the samples is built in one piece by
:func:`storage.datasets.write_vectors`; the sample rows themselves still go through the streaming
:class:`~storage.ingest.writer.DatasetWriter` (so duplicates, conflicts and pool checks are the same code).
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import ArtifactStore
from storage.datasets import VectorTableRef, sample_id, vector_sample_id, write_vectors
from storage.errors import redact
from storage.ingest.common import (
    IngestResult,
    SourceError,
    SourceNotFoundError,
    absolute,
    check_common,
    is_url,
    norm_label,
    norm_split,
    one_line,
)
from storage.ingest.writer import DatasetWriter

__all__ = ["ingest_embeddings"]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _list_matrix(column: pa.ChunkedArray, name: str, shown: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 N×k matrix with NaN where values are null, mask of rows whose list is not null)."""
    arr = column.combine_chunks()
    n = len(arr)
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_fixed_size_list(arr.type):
        k = arr.type.list_size
    else:
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        sizes = sorted(set(lengths[present].tolist()))
        if len(sizes) > 1:
            first = int(np.flatnonzero(present)[0])
            row = int(np.flatnonzero(present & (lengths != lengths[first]))[0])
            raise SourceError(f"embeddings {shown}: column {name!r} has vectors of different lengths "
                              f"({lengths[first]} at row {first}, {lengths[row]} at row {row})")
        k = sizes[0] if sizes else 0
    if k == 0:
        raise SourceError(f"embeddings {shown}: column {name!r} holds no vector values")
    value_type = arr.type.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise SourceError(f"embeddings {shown}: column {name!r} holds {value_type} values, not numbers")
    flat = pc.list_flatten(arr).cast(pa.float64()).to_numpy(zero_copy_only=False)
    mat = np.full((n, k), np.nan, dtype=np.float32)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf → quarantined
        mat[present] = flat.reshape(-1, k).astype(np.float32)
    return mat, present


def _columns_matrix(table: pa.Table, names: Sequence[str], shown: str) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for name in names:
        col = table.column(name)
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise SourceError(f"embeddings {shown}: vector column {name!r} is {col.type}, not a number column")
        parts.append(col.cast(pa.float64()).to_numpy())
    with np.errstate(over="ignore"):
        mat = np.column_stack(parts).astype(np.float32)
    return mat, np.ones(len(mat), dtype=bool)


def _pick_vector_columns(table: pa.Table, vector_column: str | Sequence[str] | None, reserved: set[str],
                         shown: str) -> str | list[str]:
    names = table.column_names
    if vector_column is None:
        if "embedding" in names:
            return "embedding"
        floats = [c for c in names if c not in reserved and pa.types.is_floating(table.schema.field(c).type)]
        if not floats:
            raise SourceError(f"embeddings {shown}: no 'embedding' column and no float columns; "
                              f"its columns are {names}")
        return floats
    wanted = [vector_column] if isinstance(vector_column, str) else list(vector_column)
    missing = [c for c in wanted if c not in names]
    if not wanted or missing:
        raise SourceError(f"embeddings {shown} has no vector column(s) {missing or wanted}; its columns are {names}")
    return vector_column if isinstance(vector_column, str) else wanted


def _external_id(value: Any, where: str) -> str:
    """A sample id from an id column: 64 hex digits are used as is (lower-cased), anything else is hashed."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = str(int(value))
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where} has an empty or non-text id ({value!r:.40})")
    value = value.strip()
    return value.lower() if _HEX64.match(value) else sample_id(value.encode("utf-8"))


def ingest_embeddings(store: ArtifactStore, parquet_path_or_url: str | os.PathLike, *,
                      id_column: str | None = None, label_column: str = "label", split_column: str | None = None,
                      vector_column: str | Sequence[str] | None = None, val_fraction: float = 0.15,
                      test_fraction: float = 0.15, seed: int = 0, shard_rows: int = 65_536,
                      storage_options: Mapping[str, Any] | None = None) -> IngestResult:
    """Ingest a Parquet table of precomputed embeddings: a sample table (``data`` null) plus a vector table.

    Vectors: ``vector_column`` names one list / fixed-size-list column of numbers, or several number columns
    (one per dimension); by default the ``embedding`` column if there is one, else every float column other than
    the id/label/split columns. Sample id: :func:`storage.datasets.vector_sample_id` of the float32 vector, or,
    with ``id_column``, the column's value — used as is when it is 64 hex digits (e.g. ids from an image ingest,
    so the embeddings line up with that dataset), else the sha256 of its UTF-8 text. ``source_uri`` is
    ``<table uri>#row=<0-based row>``. Rows with a null vector or a NaN/inf value (also after the cast to
    float32) are quarantined. The vector table (kind ``"embeddings"``) has producer
    ``{"source": "precomputed", "uri": <redacted table uri>, "column": <column name or list>}``.

    Raises SourceNotFoundError (table missing) or SourceError naming the column or the 0-based row: a missing
    label/id/split/vector column, an empty label, vectors of different lengths, one id with two vectors, the
    same vector with two labels, fewer than 2 classes.
    """
    check_common(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, shard_rows=shard_rows)
    opts = dict(storage_options or {})
    url = os.fspath(parquet_path_or_url)
    source = redact(url) if is_url(url) else absolute(url).as_uri()
    shown = redact(url)
    try:
        if is_url(url):
            with fsspec.open(url, "rb", **opts) as fh:
                table = pq.read_table(fh)
        else:
            table = pq.read_table(str(absolute(url)))
    except FileNotFoundError:
        raise SourceNotFoundError(f"embeddings table {shown} does not exist") from None
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read embeddings table {shown}: {one_line(exc)}") from None
    names = table.column_names
    for role, col in (("label", label_column), ("id", id_column), ("split", split_column)):
        if col is not None and col not in names:
            raise SourceError(f"embeddings {shown} has no {role} column {col!r}; its columns are {names}")
    if table.num_rows == 0:
        raise SourceError(f"embeddings {shown} has no rows")
    reserved = {c for c in (id_column, label_column, split_column) if c}
    chosen = _pick_vector_columns(table, vector_column, reserved, shown)
    if isinstance(chosen, str):
        if not (pa.types.is_list(table.schema.field(chosen).type) or pa.types.is_large_list(
                table.schema.field(chosen).type) or pa.types.is_fixed_size_list(table.schema.field(chosen).type)):
            raise SourceError(f"embeddings {shown}: vector column {chosen!r} is {table.schema.field(chosen).type}, "
                              "not a list of numbers (pass several number columns as a list)")
        mat, present = _list_matrix(table.column(chosen), chosen, shown)
    else:
        mat, present = _columns_matrix(table, chosen, shown)
    finite = np.isfinite(mat).all(axis=1)
    labels = table.column(label_column).to_pylist()
    splits = table.column(split_column).to_pylist() if split_column else [None] * table.num_rows
    ids = table.column(id_column).to_pylist() if id_column else None
    first: dict[str, int] = {}  # sample id → the row whose vector it keeps
    producer = {"source": "precomputed", "uri": source, "column": chosen}
    with DatasetWriter(store, source_name=f"embeddings {shown}", shard_rows=shard_rows, seed=seed,
                       val_fraction=val_fraction, test_fraction=test_fraction) as writer:
        for i in range(table.num_rows):
            where = f"embeddings {shown} row {i}"
            uri = f"{source}#row={i}"
            label = norm_label(labels[i], where)
            split = norm_split(splits[i], where)
            if not present[i]:
                writer.quarantine(uri, "missing vector")
                continue
            if not finite[i]:
                writer.quarantine(uri, "non-finite vector (NaN or inf)")
                continue
            sid = _external_id(ids[i], where) if ids is not None else vector_sample_id(mat[i])
            j = first.setdefault(sid, i)
            if j != i and not np.array_equal(mat[i], mat[j]):
                raise SourceError(f"sample id {sid} is given to different vectors at {source}#row={j} and {uri}")
            writer.add(sid, uri, label, split, None)

        def vectors() -> VectorTableRef:
            kept = sorted(first)
            return write_vectors(store, kept, mat[[first[s] for s in kept]], producer, "embeddings")

        return writer.finish(source=source, vectors=vectors)
