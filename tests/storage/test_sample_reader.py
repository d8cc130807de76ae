"""Partial reads of a dataset: metadata without the image bytes (verified by the dataset version), and the images
of a few ids (verified by their ids); the callers in tasks read through them."""

from __future__ import annotations

import pathlib
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CountingFileSystem, replant_shard

from storage import datasets
from storage.artifacts import ArtifactStore
from storage.datasets import (
    dataset_version,
    load_manifest,
    read_samples,
    sample_id,
    write_samples,
)
from storage.errors import ArtifactCorruptedError
from storage.sample_reader import _VersionCheck, iter_metadata, iter_split, read_images, read_metadata
from tasks.finetune import _selected_images
from tasks.select import train_split
from tasks.sketch import dataset_num_classes, pool_ids, split_columns

TRICKY = ['say "cheese"', "a,b", "", "naïve ☃ 🐍", "two\nlines", "back\\slash", "\u2028", "nul\x00", "1", None]
SPLITS = ("train", "val", "test", None, "train")


def _records(n: int, size: int = 3000) -> list[dict]:
    return [{"data": random.Random(i).randbytes(size), "source_uri": f"file:///pool/img{i}.jpg",
             "label": TRICKY[i % len(TRICKY)], "split": SPLITS[i % len(SPLITS)]} for i in range(n)]


def _path(shard) -> pathlib.Path:
    return pathlib.Path(shard.artifact.uri.removeprefix("file://"))


def test_version_is_dataset_version_byte_for_byte(tmp_path):
    """The vectorised per-shard hash equals dataset_version on labels that need JSON escaping, and null ones."""
    store = ArtifactStore(tmp_path / "store")
    ref = write_samples(store, _records(47), shard_rows=9)
    rows = read_samples(store, ref, columns=["sample_id", "label", "split"])
    check = _VersionCheck(ref)
    for start in range(0, rows.num_rows, 9):
        check.update(rows.slice(start, 9))
    expected = dataset_version(zip(*(rows.column(c).to_pylist() for c in ("sample_id", "label", "split")),
                                   strict=True))
    assert check.hash.hexdigest() == expected == ref.version
    check.finish()
    # one row per call, a whole table at once: the same bytes
    single = _VersionCheck(ref)
    for i in range(rows.num_rows):
        single.update(rows.slice(i, 1))
    whole = _VersionCheck(ref)
    whole.update(rows)
    assert single.hash.hexdigest() == whole.hash.hexdigest() == expected


def test_metadata_equals_the_full_read(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = write_samples(store, _records(23), shard_rows=5)
    full = read_samples(store, ref, columns=["sample_id", "source_uri", "label", "split"])
    assert read_metadata(store, ref).equals(full.select(["sample_id", "label", "split"]))
    assert read_metadata(store, ref, ["source_uri", "sample_id"]).to_pylist() == \
        full.select(["source_uri", "sample_id"]).to_pylist()
    val = read_metadata(store, ref, ["sample_id", "label"], split="val")
    assert val.to_pylist() == [{"sample_id": r["sample_id"], "label": r["label"]} for r in full.to_pylist()
                               if r["split"] == "val"]
    assert sum(t.num_rows for t in iter_metadata(store, ref, ["sample_id"])) == 23
    with pytest.raises(ValueError, match="read_images"):
        read_metadata(store, ref, ["sample_id", "data"])


def _forget_memoised_shards() -> None:
    """Empty read_shard's per-process memo, so that the next whole-shard read goes to the store."""
    with datasets._SHARD_LOCK:
        datasets._SHARD_CACHE.clear()


def _flip_image(store: ArtifactStore, ref, data: bytes) -> None:
    """Flip bytes inside one image's stored bytes (random bytes: zstd keeps them verbatim), keeping the size."""
    for shard in load_manifest(store, ref).shards:
        raw = bytearray(_path(shard).read_bytes())
        at = raw.find(data[1000:1064])
        if at >= 0:
            for pos in range(at, at + 64):
                raw[pos] ^= 0xFF
            _path(shard).write_bytes(bytes(raw))
            return
    raise AssertionError("image bytes not found verbatim in any shard")


def test_metadata_readers_never_touch_the_image_bytes(tmp_path):
    """A damaged image fails the full shard read; select's, sketch's and evaluate's metadata reads still succeed
    (and give what they gave before), and only a read of that very image fails."""
    store = ArtifactStore(tmp_path / "store")
    records = _records(30)
    ref = write_samples(store, records, shard_rows=8)
    before = (train_split(store, ref), pool_ids(store, ref, "val"), split_columns(store, ref, "test", ["label"]),
              dataset_num_classes(store, ref))
    victim = next(r for r in records if r["split"] == "train")
    _flip_image(store, ref, victim["data"])
    _forget_memoised_shards()
    with pytest.raises(ArtifactCorruptedError):
        read_samples(store, ref)
    _forget_memoised_shards()
    ids, labels = train_split(store, ref)
    assert (ids == before[0][0]).all() and labels.equals(before[0][1])
    assert pool_ids(store, ref, "val") == before[1]
    assert split_columns(store, ref, "test", ["label"]) == before[2]
    assert dataset_num_classes(store, ref) == before[3]
    others = [sample_id(r["data"]) for r in records if r is not victim][:5]
    got = read_images(store, ref, others)
    assert {s: d for s, d in zip(*(got.column(c).to_pylist() for c in ("sample_id", "data")), strict=True)} == \
        {sample_id(r["data"]): r["data"] for r in records if sample_id(r["data"]) in others}
    with pytest.raises(ArtifactCorruptedError, match=f"bytes of sample {sample_id(victim['data'])}"):
        read_images(store, ref, [*others, sample_id(victim["data"])])


@pytest.mark.parametrize("tamper", ["label", "split", "order"])
def test_tampered_metadata_is_caught_by_the_version(tmp_path, tamper):
    store = ArtifactStore(tmp_path / "store")
    ref = write_samples(store, _records(24, size=2000), shard_rows=8)
    shard = load_manifest(store, ref).shards[1]
    table = pq.read_table(_path(shard))
    if tamper == "label":
        labels = table.column("label").to_pylist()
        labels[3] = "1" if labels[3] != "1" else "2"
        table = table.set_column(2, "label", pa.array(labels, pa.string()))
    elif tamper == "split":
        splits = table.column("split").to_pylist()
        splits[2] = "train" if splits[2] != "train" else "val"
        table = table.set_column(3, "split", pa.array(splits, pa.string()))
    else:
        table = table.take([1, 0, *range(2, 8)])
    replant_shard(shard, table)
    fresh = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactCorruptedError, match=ref.manifest.uri):
        read_metadata(fresh, ref)
    with pytest.raises(ArtifactCorruptedError, match=ref.manifest.uri):
        train_split(fresh, ref)
    parts = []
    with pytest.raises(ArtifactCorruptedError):  # the iterator: a changed row at its end, disorder at once
        for part in iter_metadata(fresh, ref):
            parts.append(part)
    assert len(parts) == (1 if tamper == "order" else 3)


def test_read_images_wants_every_id(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    records = _records(12)
    ref = write_samples(store, records, shard_rows=5)
    ids = sorted(sample_id(r["data"]) for r in records)
    got = read_images(store, ref, [ids[7], ids[1], ids[7]])
    assert got.column("sample_id").to_pylist() == [ids[1], ids[7]]
    with pytest.raises(ValueError, match=f"1 wanted samples are not in dataset .* \\(first {'0' * 64}\\)"):
        read_images(store, ref, [ids[2], "0" * 64])
    assert read_images(store, ref, []).num_rows == 0


# ---------------------------------------------------------------------------------------------- bytes read

def _counting_store(path: pathlib.Path) -> ArtifactStore:
    store = ArtifactStore(path)
    store.fs = CountingFileSystem()
    return store


def test_metadata_and_selected_images_read_a_fraction_of_the_bytes(tmp_path):
    records = [{"data": random.Random(i).randbytes(40_000), "source_uri": f"file:///pool/{i}.jpg", "label": str(i % 3),
                "split": "train"} for i in range(40)]
    for i in (3, 5):
        records[i]["split"] = "val"
    ref = write_samples(ArtifactStore(tmp_path / "store"), records, shard_rows=10)
    shards = load_manifest(ArtifactStore(tmp_path / "store"), ref).shards
    total = sum(s.artifact.size for s in shards)

    _forget_memoised_shards()
    old = _counting_store(tmp_path / "store")
    read_samples(old, ref, columns=["sample_id", "label", "split"])
    assert old.fs.bytes_read >= total  # the whole-shard path: every byte of every shard

    _forget_memoised_shards()
    new = _counting_store(tmp_path / "store")
    ids, _ = train_split(new, ref)
    assert len(ids) == 38
    assert new.fs.bytes_read < 0.03 * total, (new.fs.bytes_read, total)

    # finetune: metadata, then the data column of the row groups holding a chosen or a val sample only
    ordered = sorted(records, key=lambda r: sample_id(r["data"]))
    val_shards = {i // 10 for i, r in enumerate(ordered) if r["split"] == "val"}
    chosen_rows = [i for i, r in enumerate(ordered) if r["split"] == "train" and i // 10 in val_shards][:4]
    chosen = [sample_id(ordered[i]["data"]) for i in chosen_rows]
    _forget_memoised_shards()
    ft = _counting_store(tmp_path / "store")
    images, ys, val_images, _, classes = _selected_images(ft, ref, chosen)
    assert images == [ordered[i]["data"] for i in chosen_rows] and ys == [ordered[i]["label"] for i in chosen_rows]
    assert sorted(val_images) == sorted(r["data"] for r in records if r["split"] == "val")
    assert classes == ["0", "1", "2"]
    hit = sum(shards[s].artifact.size for s in val_shards)
    assert ft.fs.bytes_read < hit + 0.03 * total < total, (ft.fs.bytes_read, hit, total)


# ---------------------------------------------------------------------------------------------- one split, streamed
def test_iter_split_streams_one_split_in_bounded_batches(tmp_path):
    """iter_split: the split's rows in id order, at most batch_rows per table, images verified; ``limit``: the
    split's smallest ids; the metadata of every shard is read all the same (the version covers every row)."""
    store = ArtifactStore(tmp_path / "store")
    records = _records(47)
    ref = write_samples(store, records, shard_rows=9)
    data_of = {sample_id(r["data"]): r["data"] for r in records}
    val = read_metadata(store, ref, ["sample_id", "label"], split="val")
    assert val.num_rows == 10
    meta = list(iter_split(store, ref, "val", batch_rows=3))
    assert all(t.num_rows <= 3 for t in meta) and pa.concat_tables(meta).equals(val)
    parts = list(iter_split(store, ref, "val", images=True, batch_rows=2))
    assert all(0 < t.num_rows <= 2 for t in parts)
    got = pa.concat_tables(parts)
    assert got.select(["sample_id", "label"]).equals(val)
    assert got.column("data").to_pylist() == [data_of[s] for s in val.column("sample_id").to_pylist()]
    for limit in (1, 4, 10, 11):
        first = pa.concat_tables(list(iter_split(store, ref, "val", limit, images=True, batch_rows=2)))
        assert first.column("sample_id").to_pylist() == sorted(val.column("sample_id").to_pylist())[:limit]
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            list(iter_split(store, ref, "val", bad))
    assert list(iter_split(store, ref, "no-such-split", images=True)) == []


def test_iter_split_verifies_images_and_the_version(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    records = _records(24, size=2000)
    ref = write_samples(store, records, shard_rows=8)
    victim = sorted((r for r in records if r["split"] == "test"), key=lambda r: sample_id(r["data"]))[-1]
    _flip_image(store, ref, victim["data"])
    with pytest.raises(ArtifactCorruptedError, match=f"bytes of sample {sample_id(victim['data'])}"):
        list(iter_split(store, ref, "test", images=True))
    assert len(list(iter_split(store, ref, "test", limit=1, images=True))) == 1  # the damaged image is not read
    shard = load_manifest(store, ref).shards[2]
    table = pq.read_table(_path(shard))
    labels = table.column("label").to_pylist()
    labels[3] = "1" if labels[3] != "1" else "2"
    replant_shard(shard, table.set_column(2, "label", pa.array(labels, pa.string())))
    parts = []
    with pytest.raises(ArtifactCorruptedError, match=ref.manifest.uri):  # even past the limit: at the end
        for part in iter_split(ArtifactStore(tmp_path / "store"), ref, "val", limit=1):
            parts.append(part)
    assert len(parts) == 1


def test_iter_split_with_a_limit_reads_the_images_of_the_sample_only(tmp_path):
    records = [{"data": random.Random(i).randbytes(40_000), "source_uri": f"file:///pool/{i}.jpg", "label": "a",
                "split": "val"} for i in range(40)]
    ref = write_samples(ArtifactStore(tmp_path / "store"), records, shard_rows=10)
    shards = load_manifest(ArtifactStore(tmp_path / "store"), ref).shards
    total = sum(s.artifact.size for s in shards)
    _forget_memoised_shards()
    counting = _counting_store(tmp_path / "store")
    got = list(iter_split(counting, ref, "val", limit=3, images=True))
    assert sum(t.num_rows for t in got) == 3
    # the row group holding the 3 smallest ids (the first shard's), and the other shards' metadata only
    assert counting.fs.bytes_read < shards[0].artifact.size + 0.03 * total, (counting.fs.bytes_read, total)


def test_read_split_ids_is_iter_split_as_one_id_array(tmp_path):
    """The split's ids (and labels) in one fixed-width array, with and without a limit: the rows iter_split gives."""
    import numpy as np

    from storage.datasets import sample_id_array
    from storage.sample_reader import read_split_ids

    store = ArtifactStore(tmp_path / "store")
    ref = write_samples(store, _records(47), shard_rows=9)
    for split, limit in (("train", None), ("val", None), ("test", 3), ("val", 10**6)):
        rows = [t for t in iter_split(store, ref, split, limit)]
        want_ids = np.concatenate([sample_id_array(t.column("sample_id")) for t in rows])
        want_labels = [v for t in rows for v in t.column("label").to_pylist()]
        ids, labels = read_split_ids(store, ref, split, limit, labels=True)
        assert np.array_equal(ids, want_ids) and labels.to_pylist() == want_labels
        assert read_split_ids(store, ref, split, limit)[1] is None
    assert len(read_split_ids(store, ref, "test", 3)[0]) == 3
