"""Readers that promise sample-id order, on a dataset of several runs (a grown dataset: each run in id order, the
runs' ids interleaved): every one answers exactly what it answers for the same samples written as one run."""

from __future__ import annotations

import pathlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CountingFileSystem, replant_shard

from storage.artifacts import ArtifactStore
from storage.audit import dataset_rows
from storage.datasets import (
    DatasetManifest,
    DatasetRef,
    dataset_version,
    load_manifest,
    read_samples,
    sample_id,
    write_samples,
)
from storage.errors import ArtifactCorruptedError
from storage.sample_reader import iter_metadata, iter_split, read_images, read_metadata, read_split_ids

LABELS = ['say "cheese"', "a,b", "", "naïve ☃", "1", None, "cat", "dog"]
SPLITS = ("train", "val", "test", None, "train", "val")
RUN_SIZES = (26, 21, 13)  # three runs: disjoint random subsets of the pool


def _pool(n: int = sum(RUN_SIZES), size: int = 300) -> list[dict]:
    return [{"data": random.Random(i).randbytes(size), "source_uri": f"file:///pool/img{i}.png",
             "label": LABELS[i % len(LABELS)], "split": SPLITS[i % len(SPLITS)]} for i in range(n)]


def _grown(store: ArtifactStore, records: list[dict], sizes: tuple[int, ...], shard_rows: int,
           seed: int = 0) -> DatasetRef:
    """The records as a dataset of ``len(sizes)`` runs: each a random subset written on its own, the manifest
    listing their shards run after run (what a grown dataset keeps)."""
    shuffled = random.Random(seed).sample(records, len(records))
    shards, runs, lo = [], [], 0
    for size in sizes:
        part = write_samples(store, shuffled[lo:lo + size], shard_rows=shard_rows)
        run = load_manifest(store, part).shards
        shards += run
        runs.append(len(run))
        lo += size
    version = dataset_version((sample_id(r["data"]), r["label"], r["split"]) for r in records)
    manifest = DatasetManifest(version, len(records), tuple(shards), runs=tuple(runs))
    return DatasetRef(store.put_bytes(manifest.to_json(), "dataset", ".json"), version, len(records))


@pytest.fixture
def datasets(tmp_path):
    """(store, the grown dataset, the same samples written at once, the records)."""
    store = ArtifactStore(tmp_path / "store")
    records = _pool()
    grown = _grown(store, records, RUN_SIZES, shard_rows=4)
    assert len(load_manifest(store, grown).shard_runs()) == 3
    return store, grown, write_samples(store, records, shard_rows=4), records


def _shards_out_of_order(store: ArtifactStore, ref: DatasetRef) -> bool:
    """Whether the ids, read shard after shard in manifest order, are out of order: what the merge is for."""
    ids = [sid for sh in load_manifest(store, ref).shards
           for sid in pq.read_table(_path(sh), columns=["sample_id"]).column("sample_id").to_pylist()]
    return ids != sorted(ids)


def _path(shard) -> pathlib.Path:
    return pathlib.Path(shard.artifact.uri.removeprefix("file://"))


def test_metadata_is_the_one_run_metadata(datasets):
    store, grown, single, _ = datasets
    assert _shards_out_of_order(store, grown)
    for columns in (("sample_id", "label", "split"), ("source_uri", "sample_id"), ("split",)):
        parts = list(iter_metadata(store, grown, columns))
        assert pa.concat_tables(parts).equals(pa.concat_tables(list(iter_metadata(store, single, columns))))
        assert read_metadata(store, grown, columns).equals(read_metadata(store, single, columns))
    for split in ("train", "val", "test", "none-such"):
        assert read_metadata(store, grown, ["sample_id", "label"], split).equals(
            read_metadata(store, single, ["sample_id", "label"], split))


@pytest.mark.parametrize("images", [False, True])
@pytest.mark.parametrize("batch_rows", [1, 3, 256])
def test_iter_split_is_the_one_run_split(datasets, images, batch_rows):
    store, grown, single, _ = datasets
    for split in ("train", "val", "test", "none-such"):
        for limit in (None, 1, 5, 10**6):
            got = list(iter_split(store, grown, split, limit, images=images, batch_rows=batch_rows))
            want = list(iter_split(store, single, split, limit, images=images, batch_rows=batch_rows))
            assert all(0 < t.num_rows <= batch_rows for t in got)
            assert sum(t.num_rows for t in got) == sum(t.num_rows for t in want)
            if want:
                assert pa.concat_tables(got).equals(pa.concat_tables(want)), (split, limit)


def test_read_split_ids_is_the_one_run_ids(datasets):
    store, grown, single, _ = datasets
    for split in ("train", "val", "test", "none-such"):
        for limit in (None, 1, 4, 10**6):
            ids, labels = read_split_ids(store, grown, split, limit, labels=True)
            want_ids, want_labels = read_split_ids(store, single, split, limit, labels=True)
            assert np.array_equal(ids, want_ids) and labels.to_pylist() == want_labels.to_pylist()


def test_read_images_is_in_id_order(datasets):
    store, grown, single, records = datasets
    ids = [sample_id(r["data"]) for r in records]
    rng = random.Random(7)
    for k in (1, 2, 9, len(ids)):
        wanted = rng.sample(ids, k) + rng.sample(ids, 1)  # unordered, with a duplicate
        got = read_images(store, grown, wanted)
        assert got.column("sample_id").to_pylist() == sorted(set(wanted))
        assert got.equals(read_images(store, single, wanted))
    with pytest.raises(ValueError, match=f"1 wanted samples are not in dataset .* \\(first {'0' * 64}\\)"):
        read_images(store, grown, [ids[3], "0" * 64])
    assert read_images(store, grown, []).num_rows == 0


def test_audit_rows_are_in_id_order(datasets):
    store, grown, single, records = datasets
    ids = [sample_id(r["data"]) for r in records]
    rng = random.Random(8)
    for k in (1, 2, 9, len(ids)):
        asked = [*rng.sample(ids, k), "0" * 64]  # an id the dataset lacks: simply absent
        assert dataset_rows(store, grown, asked).equals(dataset_rows(store, single, asked))
        assert dataset_rows(store, grown, asked, columns=["label"]).equals(
            dataset_rows(store, single, asked, columns=["label"]))
    assert dataset_rows(store, grown, []).num_rows == 0


def test_read_samples_is_in_id_order(datasets):
    store, grown, single, _ = datasets
    for columns in (None, ["label", "split"], ["data", "sample_id"]):
        assert read_samples(store, grown, columns).equals(read_samples(store, single, columns))


# ---------------------------------------------------------------------------------------------- damage
@pytest.mark.parametrize("tamper", ["label", "order"])
def test_a_tampered_run_fails_the_version(tmp_path, tamper):
    store = ArtifactStore(tmp_path / "store")
    grown = _grown(store, _pool(size=2000), RUN_SIZES, shard_rows=4)
    shard = load_manifest(store, grown).shard_runs()[1][2]
    table = pq.read_table(_path(shard))
    if tamper == "label":
        labels = table.column("label").to_pylist()
        labels[1] = "2" if labels[1] != "2" else "3"
        table = table.set_column(2, "label", pa.array(labels, pa.string()))
    else:
        table = table.take([1, 0, *range(2, table.num_rows)])
    replant_shard(shard, table)
    fresh = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactCorruptedError, match=grown.manifest.uri):
        read_metadata(fresh, grown)
    for images in (False, True):
        for limit in (None, 1):
            with pytest.raises(ArtifactCorruptedError, match=grown.manifest.uri):
                list(iter_split(fresh, grown, "train", limit, images=images))
    with pytest.raises(ArtifactCorruptedError, match=grown.manifest.uri):
        read_split_ids(fresh, grown, "val")


def test_a_damaged_image_is_named(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    records = _pool(size=2000)
    grown = _grown(store, records, RUN_SIZES, shard_rows=4)
    victim = max((r for r in records if r["split"] == "test"), key=lambda r: sample_id(r["data"]))
    for shard in load_manifest(store, grown).shards:  # random bytes: zstd keeps them verbatim
        raw = bytearray(_path(shard).read_bytes())
        at = raw.find(victim["data"][1000:1064])
        if at >= 0:
            raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
            _path(shard).write_bytes(bytes(raw))
    with pytest.raises(ArtifactCorruptedError, match=f"bytes of sample {sample_id(victim['data'])}"):
        list(iter_split(store, grown, "test", images=True))
    assert sum(t.num_rows for t in iter_split(store, grown, "test", limit=2, images=True)) == 2  # not read
    with pytest.raises(ArtifactCorruptedError, match=f"bytes of sample {sample_id(victim['data'])}"):
        read_images(store, grown, [sample_id(victim["data"])])


# ---------------------------------------------------------------------------------------------- bytes read

def test_a_limited_split_reads_the_images_of_the_sample_only(tmp_path):
    """With images and a limit, each run's images past the sample's last id are never read, and neither are the
    run's shards after the one that reaches it (their metadata was read once, for the version)."""
    records = [{"data": random.Random(i).randbytes(20_000), "source_uri": f"file:///pool/{i}.png", "label": "a",
                "split": "val"} for i in range(60)]
    grown = _grown(ArtifactStore(tmp_path / "store"), records, (20, 20, 20), shard_rows=5)
    shards = load_manifest(ArtifactStore(tmp_path / "store"), grown).shards
    total = sum(s.artifact.size for s in shards)
    store = ArtifactStore(tmp_path / "store")
    store.fs = CountingFileSystem()
    got = pa.concat_tables(list(iter_split(store, grown, "val", limit=2, images=True)))
    assert got.column("sample_id").to_pylist() == sorted(sample_id(r["data"]) for r in records)[:2]
    # at most two shards' image bytes (the runs holding the 2 smallest ids), metadata twice at most
    assert store.fs.bytes_read < 2 * max(s.artifact.size for s in shards) + 0.06 * total, (store.fs.bytes_read, total)
