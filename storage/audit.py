"""An auditor's view: the lineage index's answers joined to the dataset rows they name.

The index knows sample ids; an auditor asks "which files, with which labels". :func:`samples_of_model` and
:func:`models_of_sample` add each sample's ``source_uri``, ``label``, ``split`` and the ``dataset_version`` of
the dataset its selection was made from (the index records, per selection, the dataset manifest upstream of it).
The dataset's Parquet shards are read shard by shard, row group by row group, with only the needed columns
(never the image bytes) and only the row groups whose sample-id range holds a wanted id, so memory is bounded by
one row group of four small columns whatever the pool's size. Because only part of a shard is read, its sha256
cannot be checked: its size and row count are (against the verified manifest), and a shard that does not
decode raises MalformedRecordError naming it. :func:`model_page` is the one-page summary behind
``skmm lineage show``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import ArtifactRef, ArtifactStore, _translate
from storage.datasets import DatasetRef, VectorTableRef, load_manifest
from storage.errors import MalformedRecordError, StorageError
from storage.index import LineageIndex
from storage.linked_vectors import LINKED_SUFFIX, linked_manifest
from storage.sample_reader import _object_path, shard_rows

__all__ = ["AUDIT_COLUMNS", "dataset_rows", "model_page", "models_of_sample", "samples_of_model", "sketch_producer"]

#: The dataset columns an audit answer carries (besides sample_id).
AUDIT_COLUMNS = ("source_uri", "label", "split")
Warn = Callable[[str], None]


def dataset_rows(store: ArtifactStore, dataset: DatasetRef, sample_ids: Sequence[str] | pa.Array,
                 columns: Sequence[str] = AUDIT_COLUMNS) -> pa.Table:
    """sample_id and ``columns`` of the dataset rows whose id is in ``sample_ids``, in sample-id order.

    Streams the verified manifest's shards one row group at a time with column projection (never ``data``);
    ids not in the dataset are simply absent from the answer. The rows of a grown dataset's runs (each in id
    order, their ids interleaved) are sorted together."""
    columns = list(columns)
    if "data" in columns:
        raise ValueError("the audit never reads the sample bytes: leave 'data' out of columns")
    wanted = pc.unique(pa.array(sample_ids, pa.string()) if not isinstance(sample_ids, pa.Array) else
                       sample_ids.cast(pa.string()))
    wanted = wanted.filter(pc.is_valid(wanted))
    wanted = wanted.take(pc.sort_indices(wanted))
    manifest = load_manifest(store, dataset)
    parts = [shard_rows(store, shard, wanted, columns) for shard in manifest.shards] if len(wanted) else []
    schema = pa.schema([pa.field("sample_id", pa.string()), *(pa.field(c, pa.string()) for c in columns)])
    if not parts:
        return schema.empty_table()
    rows = pa.concat_tables(parts)
    return rows.sort_by("sample_id") if manifest.runs else rows


def _datasets(index: LineageIndex, selections: list[str], warn: Warn | None) -> dict[str, list[dict[str, Any]]]:
    """selection sha256 → its usable datasets (rows of the index's selection_datasets); warns about the rest."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in selections}
    recorded = index.selection_datasets(selections).to_pylist()
    for row in recorded:
        if row["dataset_version"] is not None:
            out[row["selection_sha256"]].append(row)
        elif warn:
            warn(f"dataset {row['dataset_uri']} of selection {row['selection_sha256'][:12]}… is no readable dataset "
                 "manifest; its samples' source_uri, label and split are left empty")
    for sel in sorted(set(selections) - {r["selection_sha256"] for r in recorded}):
        if warn:
            warn(f"no dataset is recorded upstream of selection {sel[:12]}…; its samples' source_uri, label and "
                 "split are left empty")
    return out


def _join(store: ArtifactStore, index: LineageIndex, table: pa.Table, warn: Warn | None) -> pa.Table:
    """``table`` (with sample_id and selection_sha256 columns) plus source_uri, label, split, dataset_version,
    in its row order."""
    sels = sorted({s for s in table.column("selection_sha256").to_pylist() if s is not None})
    found = []
    datasets_of = _datasets(index, sels, warn)
    for sel, datasets in datasets_of.items():
        ids = table.filter(pc.equal(table.column("selection_sha256"), sel)).column("sample_id").combine_chunks()
        for d in datasets:
            ref = DatasetRef(ArtifactRef(d["dataset_uri"], d["dataset_sha256"], d["dataset_size"], "dataset"),
                             d["dataset_version"], d["dataset_rows"])
            rows = dataset_rows(store, ref, ids)
            n = rows.num_rows
            found.append(rows.append_column("selection_sha256", pa.array([sel] * n, pa.string()))
                         .append_column("dataset_version", pa.array([d["dataset_version"]] * n, pa.string())))
    schema = pa.schema([("sample_id", pa.string()), *((c, pa.string()) for c in AUDIT_COLUMNS),
                        ("selection_sha256", pa.string()), ("dataset_version", pa.string())])
    extra = pa.concat_tables(found) if found else schema.empty_table()
    if any(len(d) > 1 for d in datasets_of.values()):  # a sample in two datasets of one selection: first row wins
        seen, keep = set(), []
        for key in zip(extra.column("selection_sha256").to_pylist(), extra.column("sample_id").to_pylist(),
                       strict=True):
            keep.append(key not in seen)
            seen.add(key)
        extra = extra.filter(pa.array(keep, pa.bool_()))
    order = pa.array(range(table.num_rows), pa.int64())
    joined = table.append_column("_order", order).join(extra, keys=["selection_sha256", "sample_id"],
                                                       join_type="left outer")
    joined = joined.sort_by("_order").drop_columns(["_order"])
    front = [c for c in table.column_names if c != "selection_sha256"]
    return joined.select([*front, *AUDIT_COLUMNS, "dataset_version", "selection_sha256"])


def samples_of_model(index: LineageIndex, store: ArtifactStore, model: str, warn: Warn | None = None) -> pa.Table:
    """The samples that trained ``model``, in rank order: sample_id, rank, weight, source_uri, label, split,
    dataset_version, selection_sha256. ``warn`` hears about selections whose dataset is unknown or unreadable
    (their dataset columns are null)."""
    return _join(store, index, index.samples_for_model(model), warn)


def models_of_sample(index: LineageIndex, store: ArtifactStore, sample_id: str, warn: Warn | None = None
                     ) -> pa.Table:
    """The models a sample helped train (see :meth:`LineageIndex.models_for_sample`), each with the sample's
    source_uri, label, split and dataset_version in the dataset that selection was made from."""
    table = index.models_for_sample(sample_id)
    with_id = table.append_column("sample_id", pa.array([str(sample_id)] * table.num_rows, pa.string()))
    return _join(store, index, with_id, warn)


def sketch_producer(store: ArtifactStore, ref: ArtifactRef) -> dict[str, Any]:
    """What made a sketch table (its ``SketchSpec.to_dict()``, from the Parquet footer's ``skmm.producer``; only
    the footer is read; a linked sketch's from its manifest, :mod:`storage.linked_vectors`). Raises StorageError /
    MalformedRecordError naming the artifact."""
    if ref.uri.endswith(LINKED_SUFFIX):
        part = linked_manifest(store, ref)["parts"][0]
        if not isinstance(part, dict):
            raise MalformedRecordError(f"linked vector table {ref.uri} has a malformed part")
        return VectorTableRef.from_dict(part.get("vectors")).producer
    path = _object_path(store, ref)
    try:
        with store.fs.open(path, "rb", cache_type="none") as fh:
            meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise _translate(exc, f"artifact {ref.uri}") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise MalformedRecordError(f"sketch {ref.uri} is not a vector table: {type(exc).__name__}") from None
    try:
        return json.loads(meta[b"skmm.producer"])
    except (KeyError, ValueError):
        raise MalformedRecordError(f"sketch {ref.uri} records no producer") from None


def model_page(index: LineageIndex, store: ArtifactStore, model: str, warn: Warn | None = None) -> dict[str, Any]:
    """:meth:`LineageIndex.model_summary` with each sketch's spec read from the store (``spec``: the
    SketchSpec that made it, or None with ``problem`` when it cannot be read)."""
    page = index.model_summary(model)
    for sketch in (page["selection"] or {}).get("sketches", []):
        try:
            sketch["spec"] = sketch_producer(store, ArtifactRef(sketch["uri"], sketch["sha256"], sketch["size"],
                                                                "sketch"))
        except (StorageError, MalformedRecordError) as exc:
            sketch["spec"] = None
            sketch["problem"] = " ".join(str(exc).split())
            if warn:
                warn(f"cannot read the spec of sketch {sketch['uri']}: {sketch['problem']}")
    return page
