"""The sketch reduced once (issue 8): with the automatic m, the sketch-moment stage writes the train split's sketch
projected to N × m, and every select task reads that table instead of the N × m_max one — with the same rows,
the same selection, and never a table of another sketch, train split or basis."""

from __future__ import annotations

import collections
import logging
from typing import ClassVar

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

import storage.datasets
from storage.datasets import VectorTableRef, read_vector_matrix, write_samples, write_vector_chunks
from tasks.select import read_auto_sketch, run_select
from tasks.sketch_moment import load_moment, run_sketch_moment, usable_reduced, write_reduced
from tasks.store import open_store, store_spec

SPLITS = np.array(["train", "train", "train", "val", "test"])
M_MAX = 96  # wider than the automatic m's floor (64): the reduced table is narrower than the sketch
POOL = 110_000  # 66 000 train rows: two of the library's 65 536-row blocks, the second one short


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under the ``skmmcount://`` scheme, counting the bytes read from each file."""

    protocol = ("skmmcount",)
    read_bytes: ClassVar[collections.Counter] = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("skmmcount://"):] if path.startswith("skmmcount://") else path)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "r" not in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


class _CountingOpener(LocalFileOpener):
    def read(self, *args, **kwargs):
        data = super().read(*args, **kwargs)
        CountingFileSystem.read_bytes[self.path] += len(data)
        return data

    def readinto(self, buffer):
        got = super().readinto(buffer)
        CountingFileSystem.read_bytes[self.path] += got or 0
        return got


fsspec.register_implementation("skmmcount", CountingFileSystem, clobber=True)


def hex_ids(n: int, seed: int) -> np.ndarray:
    """n distinct random 64-hex-digit sample ids (as str), unsorted."""
    raw = np.random.default_rng(seed).integers(0, 256, size=(n, 32), dtype=np.uint8)
    return np.array([row.tobytes().hex() for row in raw])


def pool_dataset(store: dict, n: int, seed: int = 0, label_prefix: str = "c"):
    """A dataset of n referenced samples (3/5 train), labels ``label_prefix`` + 0…4; returns (ref, train ids)."""
    ids = hex_ids(n, seed)
    table = pa.table({"sample_id": ids, "source_uri": [f"mem://{i}" for i in range(n)],
                      "label": [f"{label_prefix}{i % 5}" for i in range(n)], "split": SPLITS[np.arange(n) % 5]})
    ref = write_samples(open_store(store), table, shard_rows=max(n // 7, 1))
    return ref, np.sort(ids[np.arange(n) % 5 < 3])


def clustered_sketch(store: dict, ids: np.ndarray, m: int, seed: int = 1, extra: int = 0) -> VectorTableRef:
    """A stored 8-cluster sketch of the ids (plus ``extra`` rows of other samples) in 5 000-row chunks: signal rank
    ~8, so the automatic m is the floor, 64."""
    rng = np.random.default_rng(seed)
    every = np.sort(np.concatenate([ids, hex_ids(extra, seed + 100)])) if extra else np.sort(ids)
    centers = rng.standard_normal((8, m)).astype(np.float32) * 3
    chunks = ((every[lo:lo + 5000], centers[rng.integers(0, 8, len(every[lo:lo + 5000]))]
               + 0.1 * rng.standard_normal((len(every[lo:lo + 5000]), m)).astype(np.float32))
              for lo in range(0, len(every), 5000))
    return write_vector_chunks(open_store(store), chunks, {"mode": "lp", "test": seed}, kind="sketch")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A 110 000-sample pool in a counting store, its m_max = 96 sketch (5 000-row row groups across the 65 536-row
    blocks, other samples' rows between the split's), and the stage's result for it."""
    store = store_spec(f"skmmcount://{tmp_path_factory.mktemp('reduce') / 'store'}")
    dataset, train = pool_dataset(store, POOL)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 5000)
        sketch = clustered_sketch(store, train, M_MAX, extra=40)
    return store, dataset, train, sketch, run_sketch_moment(sketch.to_dict(), dataset.to_dict(), store)


def test_the_reduced_table_holds_bitwise_the_rows_the_select_path_projects(pool):
    store, dataset, train, sketch, stage = pool
    st = open_store(store)
    sigma = load_moment(st, stage, sketch, dataset, len(train))
    S, auto = read_auto_sketch(st, sketch, train.astype("S64"), sigma)
    reduced = VectorTableRef.from_dict(stage["reduced"])
    assert stage["m"] == reduced.dim == auto["m"] == 64 < M_MAX and stage["auto"] == auto and stage["dim"] == M_MAX
    assert reduced.num_rows == len(train) and reduced.producer["sketch"] == sketch.artifact.sha256
    R = read_vector_matrix(st, reduced, train)
    assert R.dtype == np.float32 and R.shape == S.shape and R.tobytes() == S.tobytes()
    again = run_sketch_moment(sketch.to_dict(), dataset.to_dict(), store)
    assert again == stage  # content-addressed: the same moment and reduced table


@pytest.mark.parametrize("method,class_balanced", [("skmm", False), ("skmm_v2", False), ("skmm_best", False),
                                                    ("skmm", True)])
def test_a_select_reads_the_reduced_table_and_stores_the_same_selection(pool, method, class_balanced):
    """Defect (issue 8): every select task read the whole N × m_max table to project it onto the same m
    directions. Now it reads the N × m table the stage wrote once — and stores the same selection artifact
    (ids, order, weights, params with the record of m) as the path that projects the wide table itself."""
    store, dataset, train, sketch, stage = pool
    params = {"sketch_dim": "auto", **({"max_iter": 20} if method != "skmm_v2" else {})}
    runs, reads = {}, {}
    paths = {"reduced": stage, "streamed": {k: v for k, v in stage.items() if k != "reduced"}}
    if method == "skmm_v2":
        paths["no moment"] = None  # the moment streamed in the task too
    for path, moment in paths.items():
        CountingFileSystem.read_bytes.clear()
        runs[path] = run_select(sketch.to_dict(), dataset.to_dict(), store, method, 30, seed=2, params=params,
                                class_balanced=class_balanced, moment=moment)
        reads[path] = dict(CountingFileSystem.read_bytes)
    assert runs["reduced"] == runs["streamed"] == runs.get("no moment", runs["reduced"])
    assert runs["reduced"]["sketch_dim"] == 64
    st = open_store(store)
    wide = st._path(st._rel_from_uri(sketch.artifact.uri))
    narrow = st._path(st._rel_from_uri(stage["reduced"]["artifact"]["uri"]))
    footer = 1 << 17  # each scan also reads the Parquet footer through a second handle

    def read_once(got: int, size: int) -> bool:
        return size <= got <= size + footer

    assert wide not in reads["reduced"] and read_once(reads["reduced"][narrow], stage["reduced"]["artifact"]["size"])
    assert narrow not in reads["streamed"] and read_once(reads["streamed"][wide], sketch.artifact.size)
    if "no moment" in reads:  # two passes: the moment, then the projection
        assert 2 * sketch.artifact.size <= reads["no moment"][wide] <= 2 * (sketch.artifact.size + footer)
    # what the select task reads of vector tables: N × m float32 (+ ids), not N × m_max
    n_rows = len(train)
    assert sketch.artifact.size > n_rows * M_MAX * 4 and n_rows * 64 * 4 < reads["reduced"][narrow] < \
        n_rows * (64 * 4 + 70)


@pytest.fixture
def small(tmp_path):
    store = store_spec(tmp_path / "store")
    dataset, train = pool_dataset(store, 600)
    return store, dataset, train


def test_a_reduced_table_of_another_sketch_or_train_split_is_refused(small):
    store, dataset, train = small
    other_dataset, _ = pool_dataset(store, 600, label_prefix="k")  # the same train ids, another dataset version
    assert other_dataset.version != dataset.version
    sketch, other_sketch = clustered_sketch(store, train, 72, seed=1), clustered_sketch(store, train, 72, seed=2)
    stage = run_sketch_moment(sketch.to_dict(), dataset.to_dict(), store)
    for sk, ds in ((other_sketch, dataset), (sketch, other_dataset)):
        theirs = run_sketch_moment(sk.to_dict(), ds.to_dict(), store)  # a valid moment of that pair
        mixed = {**theirs, "reduced": stage["reduced"]}  # with the reduced table of another pair
        with pytest.raises(ValueError, match=r"reduced sketch .* belongs to another sketch or train split"):
            run_select(sk.to_dict(), ds.to_dict(), store, "skmm", 10, params={"sketch_dim": "auto"}, moment=mixed)
        assert run_select(sk.to_dict(), ds.to_dict(), store, "skmm", 10, params={"sketch_dim": "auto"},
                          moment=theirs)["sketch_dim"] == 64


def test_a_reduced_table_made_with_another_basis_changes_no_selection(small, caplog):
    """A stage result that outlived the code that made it (another basis or rule for m): the select task
    recomputes the basis from the moment, sees the table is not its own, and projects the sketch itself."""
    store, dataset, train = small
    st = open_store(store)
    sketch = clustered_sketch(store, train, 72)
    stage = run_sketch_moment(sketch.to_dict(), dataset.to_dict(), store)
    sigma = load_moment(st, stage, sketch, dataset, len(train))
    from storage.artifacts import ArtifactRef

    stale = write_reduced(st, sketch, dataset, train.astype("S64"), sigma * (1 + 1e-6) + np.eye(72),
                          ArtifactRef.from_dict(stage["moment"]))
    reduced = VectorTableRef.from_dict(stage["reduced"])
    assert stale.producer["basis"] != reduced.producer["basis"]
    assert read_vector_matrix(st, stale, train).tobytes() != read_vector_matrix(st, reduced, train).tobytes()
    old = {**stage, "reduced": stale.to_dict()}
    assert usable_reduced(stage, sketch, dataset, len(train), sigma) is not None
    with caplog.at_level(logging.WARNING, logger="tasks.sketch_moment"):
        assert usable_reduced(old, sketch, dataset, len(train), sigma) is None
    assert "made with another moment, basis or rule" in caplog.text
    params = {"sketch_dim": "auto"}
    got = run_select(sketch.to_dict(), dataset.to_dict(), store, "skmm_v2", 12, params=params, moment=old)
    assert got == run_select(sketch.to_dict(), dataset.to_dict(), store, "skmm_v2", 12, params=params)
