"""Pools for the ingest tests (importable as ``ingest_pools``: this folder's conftest puts it on sys.path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from storage.artifacts import ArtifactStore
from storage.datasets import DatasetRef, load_manifest, read_samples, read_shard
from storage.ingest import IngestResult

CLASSES = ("cat", "dog", "fox")


def image_bytes(seed: int, fmt: str = "PNG", size: int = 24) -> bytes:
    """A distinct noise image (content depends on ``seed``) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_pool(root: Path, per_class: int = 6, classes: tuple[str, ...] = CLASSES) -> dict[str, bytes]:
    """root/<class>/img<i>.{png,jpg,JPG}: distinct images; returns {relative path: bytes}."""
    files = {}
    for c, label in enumerate(classes):
        for i in range(per_class):
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("JPEG", "JPG")][i % 3]
            rel = f"{label}/img{i}.{ext}"
            files[rel] = image_bytes(100 * c + i, fmt)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def rows_of(store: ArtifactStore, result: IngestResult) -> list[tuple[str, str, str]]:
    table = read_samples(store, result.dataset, columns=["sample_id", "label", "split"])
    return list(zip(*(table[c].to_pylist() for c in ("sample_id", "label", "split")), strict=True))


def quarantine_of(store: ArtifactStore, result: IngestResult) -> list[tuple[str, str]]:
    assert result.quarantine is not None and result.quarantine.kind == "quarantine"
    table = pq.read_table(pa.BufferReader(store.get_bytes(result.quarantine)))
    assert table.column_names == ["source_uri", "reason"]
    return list(zip(table["source_uri"].to_pylist(), table["reason"].to_pylist(), strict=True))


def written(store: ArtifactStore) -> list[str]:
    return store.list_paths("objects")


def dataset_rows_by_id(store: ArtifactStore, dataset: DatasetRef) -> pa.Table:
    """Every row of ``dataset`` (image bytes included), sorted by sample id, read shard by shard; asserts the
    layout: each run in sample-id order with disjoint shards, no sample in two runs."""
    runs = load_manifest(store, dataset).shard_runs()
    tables = []
    for run in runs:
        part = pa.concat_tables([read_shard(store, sh) for sh in run])
        ids = part["sample_id"].to_pylist()
        assert ids == sorted(ids), "a run is not in sample-id order"
        tables.append(part)
    table = pa.concat_tables(tables)
    ids = table["sample_id"].to_pylist()
    assert len(set(ids)) == len(ids), "a sample in two runs"
    return table.take(pc.sort_indices(table["sample_id"]))


def same_dataset(store: ArtifactStore, dataset: DatasetRef, other_store: ArtifactStore, other: DatasetRef) -> None:
    """The two datasets hold the very same rows (source URIs and image bytes included) and version, whatever
    their shard layout (a grown dataset keeps its unchanged shards as runs)."""
    assert (dataset.version, dataset.num_rows) == (other.version, other.num_rows)
    assert dataset_rows_by_id(store, dataset).equals(dataset_rows_by_id(other_store, other))
