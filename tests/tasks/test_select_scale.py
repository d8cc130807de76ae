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


# --------------------------------------------------------------------------- the automatic m, streamed (issue 8)
AUTO_POOL = 110_000  # 66 000 train rows: two moment blocks of the library's 65 536 rows, the second one short


@pytest.fixture(scope="module")
def auto_pool(tmp_path_factory):
    """A pool whose train split spans two 65 536-row blocks, and m_max = 24 sketches of it: "aligned" (the split
    alone, row groups of 65 536 rows: the blocks themselves), "groups" (the split alone in 5 000-row row groups,
    several per block and across their edges) and "extra" (5 000-row groups with other samples' rows between the
    split's)."""
    store = store_spec(tmp_path_factory.mktemp("auto") / "store")
    dataset, train = pool_dataset(store, AUTO_POOL)
    sketches = {"aligned": sketch_table(store, train, m=24)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 5000)
        sketches["groups"] = sketch_table(store, train, m=24, seed=2)
        sketches["extra"] = sketch_table(store, train, m=24, seed=3, extra=40)
    return store, dataset, train, sketches


def old_auto_selection(store: dict, dataset, train, sketch: VectorTableRef, method: str, n: int, seed: int,
                       class_balanced: bool) -> dict:
    """What the stage stored before: the whole N × m_max sketch in memory, fitted with sketch_dim="auto"."""
    from storage.datasets import read_vector_matrix

    st = open_store(store)
    S = read_vector_matrix(st, sketch, train)
    assert S.shape == (len(train), 24)
    label = {r["sample_id"]: r["label"] for r in read_samples(st, dataset, columns=["sample_id", "label"]).to_pylist()}
    y = np.array([label[s] for s in train], dtype=object)
    params = {"discretization": "per_class"} if class_balanced else {}
    sel = make_selector(method, n, random_state=seed, sketch_dim="auto", **params).fit(S, y)
    auto = sel.selection_.info["auto_sketch"]
    return write_selection(st, [train[i] for i in sel.indices_], ranks=np.arange(n), weights=sel.weights_,
                           method=method, params={**sel.get_params(), "random_state": seed, "auto_sketch": auto}
                           ).to_dict()


@pytest.mark.parametrize("method,class_balanced,layout,stored_moment", [
    ("skmm", False, "groups", True), ("skmm_best", False, "aligned", True), ("skmm_v2", False, "groups", False),
    ("skmm", True, "extra", True)])
def test_automatic_m_streams_the_sketch_and_stores_the_same_selection(auto_pool, method, class_balanced, layout,
                                                                      stored_moment):
    """Defect (issue 8): with sketch_dim="auto" each select task held the whole N × m_max sketch (10 GB at 10^7)
    and recomputed its moment. Now the moment is a stored artifact, the sketch streams through the projection,
    and the stored selection is the same artifact as before (ids, order, weights, params, the m chosen)."""
    from tasks.sketch_moment import run_sketch_moment

    store, dataset, train, sketches = auto_pool
    sketch = sketches[layout]
    moment = run_sketch_moment(sketch.to_dict(), dataset.to_dict(), store) if stored_moment else None
    if moment is not None:
        assert moment["num_rows"] == len(train) and moment["dim"] == 24 and moment["moment"]["kind"] == "moment"
    n, seed = 30, 2
    out = run_select(sketch.to_dict(), dataset.to_dict(), store, method, n, seed=seed,
                     params={"sketch_dim": "auto"}, class_balanced=class_balanced, moment=moment)
    assert out["selection"] == old_auto_selection(store, dataset, train, sketch, method, n, seed, class_balanced)
    assert out["sketch_dim"] == 24  # max(64, 2 × signal rank), at most the sketch's 24 columns


def test_the_stored_moment_is_the_library_moment_and_belongs_to_its_sketch(auto_pool):
    from skmm.select.moment_matching import gram
    from storage.artifacts import ArtifactRef
    from storage.datasets import read_vector_matrix
    from tasks.sketch_moment import load_moment, moment_from_bytes, run_sketch_moment

    store, dataset, train, sketches = auto_pool
    st = open_store(store)
    moment = run_sketch_moment(sketches["extra"].to_dict(), dataset.to_dict(), store)
    assert run_sketch_moment(sketches["extra"].to_dict(), dataset.to_dict(), store) == moment  # content-addressed
    sigma, info = moment_from_bytes(st.get_bytes(ArtifactRef.from_dict(moment["moment"])))
    assert np.array_equal(sigma, gram(read_vector_matrix(st, sketches["extra"], train)))  # bitwise the library's
    assert info["num_rows"] == len(train) and info["sketch"] == sketches["extra"].artifact.sha256
    with pytest.raises(ValueError, match="belongs to another sketch or train split"):
        load_moment(st, moment, sketches["groups"], dataset, len(train))
    with pytest.raises(ValueError, match="belongs to another sketch or train split"):
        run_select(sketches["groups"].to_dict(), dataset.to_dict(), store, "skmm", 10, params={"sketch_dim": "auto"},
                   moment=moment)


def test_automatic_m_names_a_missing_row(tmp_path):
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 300)
    sketch = sketch_table(store, train[1:], m=4).to_dict()
    with pytest.raises(ValueError, match=rf"sample id {train[0]} .* is not in vector table"):
        run_select(sketch, dataset.to_dict(), store, "skmm", 10, params={"sketch_dim": "auto"})
    middle = sketch_table(store, np.delete(train, 50), m=4).to_dict()  # a gap inside a row group
    with pytest.raises(ValueError, match=rf"sample id {train[50]} .* is not in vector table"):
        run_select(middle, dataset.to_dict(), store, "skmm", 10, params={"sketch_dim": "auto"})


def test_automatic_m_reads_hold_the_reduced_sketch_not_the_wide_one(tmp_path, monkeypatch):
    """The moment pass and the projection pass hold one 65 536-row block of the wide sketch at a time (and the
    moment's float64 copy of it), and the projection's output: at 10^7 rows a few hundred MB over the N × m
    result, where the select task used to hold the N × m_max float32 sketch (10 GB). Small row groups here, so
    that they do not hide the rest."""
    from skmm.select.auto_sketch import BLOCK_ROWS
    from tasks.select import read_auto_sketch
    from tasks.sketch_moment import pool_moment

    store = store_spec(tmp_path / "store")
    st = open_store(store)
    ids = np.sort(hex_ids(300_000, 5)).astype("S64")
    monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 4096)
    sketch = sketch_table(store, ids.astype(str), m=128)
    pool_moment(st, sketch, ids[:1000].copy())  # warm imports and caches
    tracemalloc.start()
    try:
        sigma = pool_moment(st, sketch, ids)
        moment_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        S, auto = read_auto_sketch(st, sketch, ids, sigma)
        read_peak = tracemalloc.get_traced_memory()[1] - S.nbytes
    finally:
        tracemalloc.stop()
    wide, block = len(ids) * 128 * 4, BLOCK_ROWS * 128 * 4  # one block of the wide sketch
    projected = BLOCK_ROWS * auto["m"] * 4  # one block of its projection
    assert S.shape == (len(ids), auto["m"]) and 64 <= auto["m"] <= 128
    assert moment_peak < 3.5 * block < wide, moment_peak / block
    assert read_peak < 1.2 * (block + projected) < 0.6 * wide, read_peak / (block + projected)


def test_the_sketch_moment_is_a_cached_task_and_the_select_key_ignores_it(tmp_path, prefect_api):
    """Rerunning the stage reads nothing: the moment task is a cache hit on the same sketch and split; and a
    select task's key does not depend on the moment ref (derived from the sketch, checked on load)."""
    from prefect import flow

    from tasks.select import select
    from tasks.sketch_moment import sketch_moment
    from tasks.store import result_storage

    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 300)
    sketch = sketch_table(store, train, m=6).to_dict()
    opts = {"result_storage": result_storage(store)}

    @flow
    def run(with_moment: bool) -> tuple:
        made = sketch_moment.with_options(**opts)(sketch, dataset.to_dict(), store, return_state=True)
        moment = made.result() if with_moment else None
        chosen = select.with_options(**opts)(sketch, dataset.to_dict(), store, "skmm", 20,
                                             params={"sketch_dim": "auto"}, moment=moment, return_state=True)
        return made.name, made.result(), chosen.name, chosen.result()

    first, again = run(True), run(False)
    assert (first[0], first[2]) == ("Completed", "Completed") and (again[0], again[2]) == ("Cached", "Cached")
    assert again[1] == first[1] and again[3] == first[3]
