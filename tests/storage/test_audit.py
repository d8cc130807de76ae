"""The auditor's dataset join: dataset rows for a set of sample ids, read with column projection shard by shard."""

from __future__ import annotations

import pathlib
import random

import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactStore
from storage.audit import dataset_rows
from storage.datasets import load_manifest, read_samples, sample_id, write_samples
from storage.errors import ArtifactCorruptedError


def _dataset(store: ArtifactStore, n: int = 10):
    records = [{"data": f"image bytes {i}".encode() + random.Random(i).randbytes(4000), "source_uri": f"file:///pool/img{i}.png",
                "label": str(i % 3), "split": ("train", "val", "test")[i % 3]} for i in range(n)]
    return write_samples(store, records, shard_rows=4), records


def test_rows_of_the_wanted_ids_across_shards(store):
    ref, _ = _dataset(store)
    assert len(load_manifest(store, ref).shards) == 3
    every = read_samples(store, ref, columns=["sample_id", "source_uri", "label", "split"]).to_pylist()
    wanted = [every[1]["sample_id"], every[9]["sample_id"], every[5]["sample_id"], "0" * 64, "not-an-id"]
    got = dataset_rows(store, ref, wanted)
    assert got.column_names == ["sample_id", "source_uri", "label", "split"]
    assert got.to_pylist() == [every[i] for i in (1, 5, 9)]  # in sample-id order; unknown ids are absent
    assert dataset_rows(store, ref, []).num_rows == 0
    assert dataset_rows(store, ref, [every[0]["sample_id"]], columns=["label"]).to_pylist() == [
        {"sample_id": every[0]["sample_id"], "label": every[0]["label"]}]
    with pytest.raises(ValueError, match="never reads the sample bytes"):
        dataset_rows(store, ref, wanted, columns=["data"])


def test_the_image_bytes_are_never_read(tmp_path):
    """Damage every shard's ``data`` column chunk (same size): a full read fails, the audit read never touches it."""
    store = ArtifactStore(tmp_path / "store")
    ref, records = _dataset(store)
    for shard in load_manifest(store, ref).shards:
        path = pathlib.Path(shard.artifact.uri.removeprefix("file://"))
        meta = pq.ParquetFile(path).metadata
        data_col = meta.row_group(0).column(meta.schema.names.index("data"))
        raw = bytearray(path.read_bytes())
        start = data_col.dictionary_page_offset if data_col.has_dictionary_page else data_col.data_page_offset
        size = data_col.total_compressed_size
        for pos in range(start + size // 4, start + 3 * size // 4):  # inside the page's values, past its header
            raw[pos] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(OSError):  # reading the damaged column fails: the audit read below never does
            pq.read_table(path, columns=["data"])
    with pytest.raises(ArtifactCorruptedError):
        read_samples(store, ref)
    wanted = [sample_id(r["data"]) for r in records]
    got = {r["sample_id"]: r for r in dataset_rows(store, ref, wanted).to_pylist()}
    assert {i: (got[i]["source_uri"], got[i]["label"], got[i]["split"]) for i in wanted} == {
        sample_id(r["data"]): (r["source_uri"], r["label"], r["split"]) for r in records}


def test_a_truncated_shard_is_named(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref, _ = _dataset(store)
    shard = load_manifest(store, ref).shards[1]
    path = pathlib.Path(shard.artifact.uri.removeprefix("file://"))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactCorruptedError, match=shard.artifact.uri):
        dataset_rows(store, ref, ["0" * 64])
