"""The select stage at pool scale: the same selections as fitting the in-memory sketch, one float32 copy of the
sketch read (no per-sample Python objects), and labels read only for a selector that uses them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

import storage.datasets
from skmm.select import make_selector
from storage.datasets import (
    VectorTableRef,
    read_samples,
    read_vectors,
    write_samples,
    write_vector_chunks,
)
from storage.selections import write_selection
from tasks.select import run_select, train_split
from tasks.store import open_store, store_spec

SPLITS = np.array(["train", "train", "train", "val", "test"])


def hex_ids(n: int, seed: int) -> np.ndarray:
    """n distinct random 64-hex-digit sample ids (as str), unsorted."""
    raw = np.random.default_rng(seed).integers(0, 256, size=(n, 32), dtype=np.uint8)
    return np.array([row.tobytes().hex() for row in raw])


def pool_dataset(store: dict, n: int, seed: int = 0, labelled: bool = True):
    """A dataset of n referenced samples (3/5 train) with labels 'c0'…'c4'; returns (ref, train ids sorted)."""
    ids = hex_ids(n, seed)
    labels = [f"c{i % 5}" if labelled or i % 11 else None for i in range(n)]
    table = pa.table({"sample_id": ids, "source_uri": [f"mem://{i}" for i in range(n)], "label": labels,
                      "split": SPLITS[np.arange(n) % 5]})
    ref = write_samples(open_store(store), table, shard_rows=max(n // 7, 1))
    train = np.sort(ids[np.arange(n) % 5 < 3])
    return ref, train


def sketch_table(store: dict, ids: np.ndarray, m: int, seed: int = 1, extra: int = 0) -> VectorTableRef:
    """A stored sketch of the given ids (plus ``extra`` rows of other samples), written in chunks."""
    rng = np.random.default_rng(seed)
    every = np.sort(np.concatenate([ids, hex_ids(extra, seed + 100)])) if extra else np.sort(ids)
    chunks = ((every[lo:lo + 5000], rng.standard_normal((len(every[lo:lo + 5000]), m)).astype(np.float32))
              for lo in range(0, len(every), 5000))
    return write_vector_chunks(open_store(store), chunks, {"mode": "lp", "test": seed}, kind="sketch")


@pytest.mark.parametrize("method,class_balanced", [("skmm", False), ("skmm_v2", False), ("uniform", True),
                                                    ("skmm", True)])
def test_selection_equals_fitting_the_sketch_in_memory(tmp_path, method, class_balanced):
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 1500)
    sketch = sketch_table(store, train, m=8, extra=40)  # the table may hold more samples than the split
    out = run_select(sketch.to_dict(), dataset.to_dict(), store, method, 30, seed=3, class_balanced=class_balanced)
    st = open_store(store)
    ids, S = read_vectors(st, sketch, sample_ids=train.tolist())  # the old path: lists all the way
    label = {r["sample_id"]: r["label"] for r in read_samples(st, dataset).to_pylist()}
    y = np.array([label[s] for s in ids], dtype=object)
    params = {"uniform": {"class_balanced": True}, "skmm": {"discretization": "per_class"}}[method] \
        if class_balanced else {}
    sel = make_selector(method, 30, random_state=3, **params).fit(S, y)
    expected = write_selection(st, [ids[i] for i in sel.indices_], ranks=np.arange(30), weights=sel.weights_,
                               method=method, params={**sel.get_params(), "random_state": 3})
    assert out["selection"] == expected.to_dict()  # the same artifact: ids, order, weights and params


def test_train_split_reads_ids_as_bytes_and_labels_as_arrow(tmp_path):
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 400)
    ids, labels = train_split(open_store(store), dataset)
    assert ids.dtype == np.dtype("S64") and ids.tolist() == [s.encode() for s in train]
    assert isinstance(labels, pa.ChunkedArray) and len(labels) == len(train)


def test_class_balancing_needs_every_label_but_label_free_methods_do_not(tmp_path):
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 300, labelled=False)
    sketch = sketch_table(store, train, m=4).to_dict()
    with pytest.raises(ValueError, match="uniform with class balancing needs a label for every pool sample"):
        run_select(sketch, dataset.to_dict(), store, "uniform", 10, class_balanced=True)
    assert run_select(sketch, dataset.to_dict(), store, "uniform", 10)["n"] == 10
    with pytest.raises(ValueError, match=r"budget n=181 is larger than the pool .* 180 samples"):
        run_select(sketch, dataset.to_dict(), store, "uniform", 181)


def test_missing_sketch_rows_are_named(tmp_path):
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 300)
    sketch = sketch_table(store, train[1:], m=4).to_dict()
    with pytest.raises(ValueError, match=rf"1 of 180 requested sample ids are not in vector table .*{train[0]}"):
        run_select(sketch, dataset.to_dict(), store, "uniform", 10)


def test_reading_the_pool_holds_one_copy_of_the_sketch_and_no_object_per_sample(tmp_path, monkeypatch):
    """Defect: the stage held the sketch's file bytes, a reordered copy, and a Python str and dict entry per
    sample (several times the sketch). Now: one float32 array plus 64 bytes of id per sample (and one row
    group's bytes at a time: small row groups here, so that they do not hide the rest)."""
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 100_000)
    N, m = len(train), 16
    with monkeypatch.context() as patch:
        patch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 4096)
        sketch = sketch_table(store, train, m=m).to_dict()
    run_select(sketch, dataset.to_dict(), store, "uniform", 10)  # warm imports and caches
    tracemalloc.start()
    try:
        run_select(sketch, dataset.to_dict(), store, "uniform", 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sketch_bytes, id_bytes = N * m * 4, N * 64
    assert peak < sketch_bytes + 2 * id_bytes, (peak / 2**20, sketch_bytes / 2**20, id_bytes / 2**20)
