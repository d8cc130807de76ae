"""The LP sketch stage, streamed (issue 8): byte-identical to the stage that held the pool's N × d features, and
its memory bounded by a few blocks instead of growing with N × d."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

import storage.datasets
from skmm.gradients import normalize_features
from skmm.sketch import GaussianProjector
from storage.datasets import (
    DatasetRef,
    VectorTableRef,
    read_vectors,
    write_samples,
    write_vector_chunks,
    write_vectors,
)
from tasks.sketch import pool_ids, run_sketch, train_ids
from tasks.store import open_store, store_spec

SPLITS = np.array(["train", "train", "train", "val", "test"])


def reference_lp_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64,
                        seed: int = 0) -> dict:
    """Frozen copy of run_sketch's LP branch before streaming (code version sketch-2): the whole N × d matrix."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    ids, _ = pool_ids(st, ds, "train")
    if not ids:
        raise ValueError("the dataset has no train split to select from")
    _, features = read_vectors(st, emb, sample_ids=ids)
    grads = normalize_features(features.astype(np.float32))
    spec = None
    if sketch_dim is not None and sketch_dim < grads.shape[1]:
        proj = GaussianProjector(grads.shape[1], sketch_dim, seed).fit()
        grads = np.concatenate([proj.project(grads[i:i + 8192]) for i in range(0, len(grads), 8192)])
        spec = proj.spec.to_dict()
    producer = {"mode": "lp", "features": emb.producer_digest, "sketch": spec}
    ref = write_vectors(st, ids, grads, producer, kind="sketch")
    return ref.to_dict()


def hex_ids(n: int, seed: int) -> np.ndarray:
    """n distinct random 64-hex-digit sample ids (as str), unsorted."""
    raw = np.random.default_rng(seed).integers(0, 256, size=(n, 32), dtype=np.uint8)
    return np.array([row.tobytes().hex() for row in raw])


def pool(store: dict, n: int, d: int, seed: int = 0, extra: int = 0, splits: np.ndarray = SPLITS
         ) -> tuple[DatasetRef, VectorTableRef]:
    """A dataset of n referenced samples (split cycling through ``splits``) and an embeddings table of all of
    them plus ``extra`` samples outside the dataset: rows of varied norms, one of them zero."""
    ids = hex_ids(n, seed)
    table = pa.table({"sample_id": ids, "source_uri": [f"mem://{i}" for i in range(n)],
                      "label": [f"c{i % 5}" for i in range(n)], "split": splits[np.arange(n) % len(splits)]})
    st = open_store(store)
    dataset = write_samples(st, table, shard_rows=max(n // 7, 1))
    every = np.sort(np.concatenate([ids, hex_ids(extra, seed + 100)])) if extra else np.sort(ids)
    rng = np.random.default_rng(seed + 1)

    def chunks():
        for lo in range(0, len(every), 3000):
            part = every[lo:lo + 3000]
            rows = rng.standard_normal((len(part), d)).astype(np.float32) * rng.uniform(0.1, 30, (len(part), 1))
            if lo == 0:
                rows[min(2, len(part) - 1)] = 0.0
            yield part, rows.astype(np.float32)

    emb = write_vector_chunks(st, chunks(), {"model": "synthetic", "seed": seed}, kind="embeddings")
    return dataset, emb


def file_bytes(store: dict, ref: dict) -> bytes:
    st = open_store(store)
    with st.fs.open(st._path(st._rel_from_uri(ref["artifact"]["uri"])), "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("n,d,sketch_dim,shard_rows", [
    (40, 16, None, None),  # a small pool: one row group, one block, no projection
    (40, 16, 8, None),  # projected
    (40, 16, 32, None),  # sketch_dim >= d: the normalised features
    (900, 300, 256, None),  # the automatic sketch's m_max (256) below d
    (36_000, 24, 8, 1000),  # ~21 600 train rows: 3 blocks of 8192 over 1 000-row groups, split ⊂ table
    (36_000, 24, None, 1000),
    (24_000, 512, 256, 1000),  # d = 512 sketched to m_max (256) over 1 000-row groups: two blocks
    (30_000, 12, 5, 8192),  # row groups that are exactly the blocks (no regrouping copy)
])
def test_streamed_lp_sketch_is_byte_identical_to_the_in_memory_stage(tmp_path, monkeypatch, n, d, sketch_dim,
                                                                      shard_rows):
    if shard_rows is not None:
        monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", shard_rows)
    store = store_spec(tmp_path / "store")
    dataset, emb = pool(store, n, d, extra=n // 10 + 3)  # the table holds val/test rows and other samples too
    assert emb.num_rows > len(train_ids(open_store(store), dataset))
    new = run_sketch(emb.to_dict(), dataset.to_dict(), store, sketch_dim=sketch_dim, seed=3)
    old = reference_lp_sketch(emb.to_dict(), dataset.to_dict(), store, sketch_dim=sketch_dim, seed=3)
    assert new == old  # the same ref: uri, sha256, producer, rows, dim
    assert file_bytes(store, new) == file_bytes(store, old)
    if shard_rows is not None:
        assert new["num_rows"] > 8192  # several blocks, over several row groups


def test_train_ids_are_the_sorted_split_as_fixed_width_bytes(tmp_path):
    store = store_spec(tmp_path / "store")
    dataset, _ = pool(store, 300, 4)
    ids = train_ids(open_store(store), dataset)
    listed, _ = pool_ids(open_store(store), dataset, "train")
    assert ids.dtype == np.dtype("S64") and ids.tolist() == [s.encode() for s in listed]


def test_missing_embeddings_and_an_empty_split_are_errors(tmp_path):
    store = store_spec(tmp_path / "store")
    _, emb = pool(store, 50, 4)
    other, _ = pool(store, 50, 4, seed=9)
    with pytest.raises(ValueError, match="not in vector table"):
        run_sketch(emb.to_dict(), other.to_dict(), store, sketch_dim=2)
    no_train, _ = pool(store, 20, 4, seed=5, splits=np.array(["val", "test"]))
    with pytest.raises(ValueError, match="no train split"):
        run_sketch(emb.to_dict(), no_train.to_dict(), store, sketch_dim=2)


def test_lp_sketch_memory_is_a_few_blocks_not_the_pool(tmp_path, monkeypatch):
    """Storage reads and writes a row group (DEFAULT_SHARD_ROWS rows) at a time, so the bound is a few row groups
    plus the split's ids; with 8 192-row groups a 270 000-row split is 33 of them. The in-memory stage peaked
    at 244 MB here (features, normalised copy, projection, the ids as str): 3.5 × the N × d array."""
    monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 8192)
    n, d = 300_000, 64
    store = store_spec(tmp_path / "store")
    dataset, emb = pool(store, n, d, splits=np.array(["train"] * 9 + ["val"]))
    tracemalloc.start()
    try:
        out = run_sketch(emb.to_dict(), dataset.to_dict(), store, sketch_dim=16, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["num_rows"] == 270_000
    features = out["num_rows"] * d * 4  # the N × d float32 array the in-memory stage held (and a normalised copy)
    ids = n * 64  # the ids array, 64 B a dataset row (held by design; shrunk to the split)
    group = 8192 * d * 4
    assert peak < ids + 8 * group, (peak, ids, group)
    assert peak < 0.6 * features
