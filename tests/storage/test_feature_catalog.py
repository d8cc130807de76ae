"""The feature catalog: per-producer entries of stored vector tables, looked up by sample id (local and S3)."""

from __future__ import annotations

import hashlib
import logging
import shutil

import numpy as np
import pytest

from storage.artifacts import ArtifactStore
from storage.datasets import producer_digest, write_vectors
from storage.feature_catalog import CatalogEntry, FeatureCatalog

PRODUCER = {"model": "tiny", "init_seed": 0}
DIGEST = producer_digest(PRODUCER)
IDS = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(30))


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def catalog(store: ArtifactStore, digest: str = DIGEST, version: str = "v1") -> FeatureCatalog:
    return FeatureCatalog(store, "embeddings", digest, version)


def test_lookup_returns_exact_vectors_reading_only_overlapping_tables(store):
    low, high = IDS[:10], IDS[20:]
    low_vec, high_vec = vectors(10, 0), vectors(10, 1)
    cat = catalog(store)
    cat.register(write_vectors(store, low, low_vec, PRODUCER), low)
    cat.register(write_vectors(store, high, high_vec, PRODUCER), high)

    fresh = catalog(store)  # a later run: lists the store
    assert sorted(s[:2] for s in fresh.spans()) == [(low[0], low[-1]), (high[0], high[-1])]
    got = fresh.lookup([low[2], low[7], IDS[5], IDS[12]])  # IDS[12] lies between the tables: never embedded
    assert got.tables == 1 and set(got.vectors) == {low[2], low[7], IDS[5]}
    for sid in got.vectors:
        assert np.array_equal(got.vectors[sid], low_vec[low.index(sid)])
    got = fresh.lookup(IDS[12:25])
    assert got.tables == 1 and set(got.vectors) == set(IDS[20:25])
    assert fresh.lookup([]).vectors == {}


def test_entries_are_idempotent_and_scoped_by_producer_and_version(store):
    ref = write_vectors(store, IDS[:5], vectors(5, 0), PRODUCER)
    cat = catalog(store)
    first = cat.register(ref, IDS[:5])
    assert cat.register(ref, IDS[:5]) == first  # the same entry again: a no-op
    assert CatalogEntry.from_json(first.to_json(), "here") == first
    assert first.name == f"{IDS[0]}-{IDS[4]}-{ref.artifact.sha256}.json"
    assert len(catalog(store).spans()) == 1
    assert catalog(store, version="v2").spans() == []  # features of another code version are never reused
    other = producer_digest({**PRODUCER, "init_seed": 1})
    assert catalog(store, digest=other).spans() == []
    with pytest.raises(ValueError, match="refusing to catalogue"):
        catalog(store, digest=other).register(ref, IDS[:5])
    with pytest.raises(ValueError, match="3 sample ids"):
        cat.register(ref, IDS[:3])


def test_a_catalog_lists_once_and_sees_its_own_entries(store):
    early = catalog(store)
    assert early.lookup(IDS[:5]).vectors == {}  # lists: nothing yet
    catalog(store).register(write_vectors(store, IDS[:5], vectors(5, 0), PRODUCER), IDS[:5])
    assert early.lookup(IDS[:5]).vectors == {}  # one listing per run: entries of others appear next run
    assert len(catalog(store).lookup(IDS[:5]).vectors) == 5
    early.register(write_vectors(store, IDS[5:9], vectors(4, 1), PRODUCER), IDS[5:9])
    assert len(early.lookup(IDS[5:9]).vectors) == 4  # its own entries join its listing


def test_missing_corrupt_or_malformed_entries_are_skipped(store, caplog):
    gone = write_vectors(store, IDS[:5], vectors(5, 0), PRODUCER)
    kept = write_vectors(store, IDS[10:15], vectors(5, 1), PRODUCER)
    cat = catalog(store)
    cat.register(gone, IDS[:5])
    cat.register(kept, IDS[10:15])
    store.fs.rm(f"{store.root}/objects/embeddings/{gone.artifact.sha256}.parquet")
    junk = f"{IDS[20]}-{IDS[25]}-{'0' * 64}.json"
    store.put_immutable(f"{cat.prefix}/{junk}", b"{not json")
    with caplog.at_level(logging.WARNING, logger="storage.feature_catalog"):
        got = catalog(store).lookup(IDS)
    assert set(got.vectors) == set(IDS[10:15]) and got.tables == 3
    assert gone.artifact.sha256 in caplog.text and junk in caplog.text


def test_a_sample_in_two_tables_takes_the_table_with_the_smallest_sha(store):
    a = write_vectors(store, IDS[:3], vectors(3, 0), PRODUCER)
    b = write_vectors(store, IDS[1:4], vectors(3, 1), PRODUCER)  # IDS[1], IDS[2] computed twice (a race)
    cat = catalog(store)
    for ref, ids in ((a, IDS[:3]), (b, IDS[1:4])):
        cat.register(ref, ids)
    _, first_ids, first_vec = min((a, IDS[:3], vectors(3, 0)), (b, IDS[1:4], vectors(3, 1)),
                                  key=lambda t: t[0].artifact.sha256)
    got = catalog(store).lookup(IDS[:4]).vectors
    assert set(got) == set(IDS[:4])
    for sid in (IDS[1], IDS[2]):
        assert np.array_equal(got[sid], first_vec[first_ids.index(sid)])


def test_a_moved_store_keeps_its_catalog(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    vec = vectors(5, 0)
    catalog(store).register(write_vectors(store, IDS[:5], vec, PRODUCER), IDS[:5])
    shutil.copytree(tmp_path / "store", tmp_path / "moved")
    got = catalog(ArtifactStore(tmp_path / "moved")).lookup(IDS[:5]).vectors
    assert np.array_equal(np.stack([got[s] for s in IDS[:5]]), vec)


def test_an_instance_that_listed_early_sees_another_process_entry_once_included(store):
    early = catalog(store)
    assert early.lookup(IDS[:3]).vectors == {}  # lists the (empty) store now
    entry = catalog(store).register(write_vectors(store, IDS[:3], vectors(3, 2), PRODUCER), IDS[:3])
    assert early.lookup(IDS[:3]).vectors == {}  # its listing predates the entry
    early.include(entry)
    early.include(entry)  # idempotent
    got = early.lookup(IDS[:3])
    assert sorted(got.vectors) == IDS[:3] and got.tables == 1
    np.testing.assert_array_equal(np.stack([got.vectors[s] for s in IDS[:3]]), vectors(3, 2))


def test_a_lookup_of_uncatalogued_ids_reads_only_the_id_columns(tmp_path):
    """A grown pool's new samples are looked up in every table their id range meets, and found in none: the
    lookup reads those tables' sample ids, never their vectors (at 10^7 samples × 512 floats that is ~640 MB of
    ids instead of ~20 GB of vectors a growth)."""
    from helpers import CountingFileSystem

    ids = sorted(hashlib.sha256(f"t{i}".encode()).hexdigest() for i in range(3000))
    store = ArtifactStore(tmp_path / "store")
    cat = catalog(store)
    wide = np.random.default_rng(0).standard_normal((3000, 256)).astype(np.float32)
    for part in (ids[0::3], ids[1::3], ids[2::3]):  # three tables, each spanning the whole id range
        rows = [ids.index(s) for s in part]
        cat.register(write_vectors(store, part, wide[rows], PRODUCER), part)
    tables = sum(e.stat().st_size for e in (tmp_path / "store" / "objects" / "embeddings").iterdir())
    new = [hashlib.sha256(f"new{i}".encode()).hexdigest() for i in range(20)]

    counting = ArtifactStore(tmp_path / "store")
    counting.fs = CountingFileSystem()
    got = catalog(counting).lookup(new)
    assert got.vectors == {} and got.tables == 0
    assert counting.fs.bytes_read < 0.15 * tables, (counting.fs.bytes_read, tables)

    counting.fs.bytes_read = 0  # a mixed lookup reads the vectors of the tables that hold some of its ids only
    got = catalog(counting).lookup([*new, ids[1], ids[4]])
    assert got.tables == 1 and set(got.vectors) == {ids[1], ids[4]}
    assert np.array_equal(got.vectors[ids[4]], wide[4])
    assert counting.fs.bytes_read < 0.6 * tables, (counting.fs.bytes_read, tables)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_probe_never_lets_unverified_vectors_through(store, caplog, where):
    """A flipped byte anywhere in a catalogued table — its id column (the probe reads it) or its vectors — costs
    the table's samples their reuse, with a warning; no vector of a damaged table is returned."""
    ref = write_vectors(store, IDS, vectors(len(IDS), 0), PRODUCER)
    catalog(store).register(ref, IDS)
    path = f"{store.root}/objects/embeddings/{ref.artifact.sha256}.parquet"
    raw = bytearray(store.fs.cat_file(path))
    raw[int(where * len(raw))] ^= 0x01
    store.fs.pipe_file(path, bytes(raw))
    with caplog.at_level(logging.WARNING, logger="storage.feature_catalog"):
        got = catalog(store).lookup(IDS[3:9])
    assert got.vectors == {}
    assert got.tables == 0 or ref.artifact.sha256 in caplog.text
