"""combine_vectors merges overlapping tables — a grown dataset's runs, whose id ranges interleave — as a streaming
k-way merge: the same artifact as write_vectors of the union, in memory bounded by one scan per open table."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import random_sample_ids as _random_ids

import storage.datasets
from storage.artifacts import ArtifactStore
from storage.datasets import (
    ID_DTYPE,
    VectorTableRef,
    combine_vectors,
    read_vector_matrix,
    write_vector_chunks,
    write_vectors,
)
from storage.errors import ArtifactCorruptedError

PRODUCER = {"model": "merge-test"}


def _table(store: ArtifactStore, ids: np.ndarray, mat: np.ndarray, rows: np.ndarray) -> VectorTableRef:
    return write_vectors(store, [s.decode() for s in ids[rows]], mat[rows], PRODUCER)


def _runs(rng: np.random.Generator, n: int, runs: int, tables_per_run: int) -> list[np.ndarray]:
    """Row numbers of each table: rows dealt at random to ``runs`` interleaved runs, each cut into tables."""
    owner = rng.integers(0, runs, n)
    return [t for r in range(runs) for t in np.array_split(np.flatnonzero(owner == r), tables_per_run) if len(t)]


def _with_duplicates(rng: np.random.Generator, tables: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Some tables also hold identical copies of other tables' rows (inside and beyond their own range)."""
    out = []
    for rows in tables:
        if rng.random() < 0.4:
            inside = rng.integers(rows[0], rows[-1] + 1, 1 + len(rows) // 3)
            rows = np.union1d(rows, np.concatenate([inside, rng.integers(0, n, 3)]))
        out.append(rows)
    return out


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """7-row scan batches and 16-row row groups: a merge crosses many batch and row group boundaries."""
    monkeypatch.setattr(storage.datasets, "_SCAN_BATCH_ROWS", 7)
    monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 16)


@pytest.mark.parametrize("seed", range(6))
def test_interleaved_runs_combine_to_write_vectors_of_the_union(tmp_path, small_batches, seed):
    """2–4 runs cut into tables, identical duplicates within and across them, refs in any order: the artifact
    write_vectors makes of the union (what the in-memory merge wrote)."""
    rng = np.random.default_rng(seed)
    store = ArtifactStore(tmp_path / "store")
    n = int(rng.integers(150, 400))
    ids, mat = _random_ids(rng, n), rng.standard_normal((n, 5)).astype(np.float32)
    tables = _with_duplicates(rng, _runs(rng, n, int(rng.integers(2, 5)), int(rng.integers(2, 6))), n)
    refs = [_table(store, ids, mat, rows) for rows in tables]
    refs += [refs[i] for i in rng.integers(0, len(refs), 2)]  # the same table twice: every row a duplicate
    refs = [refs[i] for i in rng.permutation(len(refs))]
    union = np.unique(np.concatenate(tables))
    assert combine_vectors(store, refs) == _table(store, ids, mat, union)


def test_copies_of_an_id_at_a_batch_boundary_stay_together(store, small_batches):
    """Sample 6 ends table a's first batch and starts c; 13 ends a's second batch, sits inside b's first and is
    all of d (opened only when the merge reaches it). The first table in refs order gives the kept row."""
    rng = np.random.default_rng(1)
    ids, mat = _random_ids(rng, 30), rng.standard_normal((30, 3)).astype(np.float32)
    mat[7] = 0.0
    signed = mat.copy()
    signed[7] = -0.0  # equal to +0.0: an identical duplicate by value, not by bits
    a = _table(store, ids, mat, np.arange(0, 14))
    b = _table(store, ids, mat, np.array([6, 13, *range(14, 21)]))
    c = _table(store, ids, signed, np.arange(6, 9))
    d = _table(store, ids, mat, np.array([13]))
    assert combine_vectors(store, [c, b, a, d]) == _table(store, ids, signed, np.arange(0, 21))
    assert combine_vectors(store, [a, b, c, d]) == _table(store, ids, mat, np.arange(0, 21))


def test_the_first_table_in_refs_order_gives_each_kept_row(tmp_path):
    """Full-size batches (one sort over thousands of rows): among equal ids the table earliest in refs wins, not
    the one the merge opened first — told apart by +0.0 against -0.0, equal by value but not by bits."""
    rng = np.random.default_rng(7)
    store = ArtifactStore(tmp_path / "store")
    n = 3000
    ids, mat = _random_ids(rng, n), rng.standard_normal((n, 3)).astype(np.float32)
    zeroed = rng.choice(n, n // 3, replace=False)
    mat[zeroed] = 0.0
    signed = mat.copy()
    signed[zeroed] = -0.0
    runs = [_table(store, ids, mat, rows) for rows in _runs(rng, n, 2, 1)]
    copy = _table(store, ids, signed, np.sort(zeroed))
    assert combine_vectors(store, [*runs, copy]) == _table(store, ids, mat, np.arange(n))
    assert combine_vectors(store, [copy, *runs]) == _table(store, ids, signed, np.arange(n))


def test_different_vectors_for_an_id_at_a_boundary_are_refused(store, small_batches):
    rng = np.random.default_rng(2)
    ids, mat = _random_ids(rng, 30), rng.standard_normal((30, 3)).astype(np.float32)
    changed = mat.copy()
    changed[13, 1] += 1.0
    a = _table(store, ids, mat, np.arange(0, 14))
    b = _table(store, ids, mat, np.array([6, *range(14, 21)]))
    d = _table(store, ids, changed, np.array([13, 25]))
    before = set(store.list_paths("objects/embeddings"))
    with pytest.raises(ValueError, match=f"sample {ids[13].decode()} has different vectors in two tables of "
                                         f"producer {a.producer_digest}"):
        combine_vectors(store, [a, b, d])
    assert set(store.list_paths("objects/embeddings")) == before


def test_a_difference_from_damaged_bytes_is_reported_as_corruption(tmp_path, small_batches):
    """A table's bytes replaced by a valid table with one vector changed (same size): its conflict comes before
    its last row group, yet the damaged bytes are what is reported, as when all tables were read first."""
    rng = np.random.default_rng(3)
    store = ArtifactStore(tmp_path / "store")
    ids, mat = _random_ids(rng, 40), rng.standard_normal((40, 4)).astype(np.float32)
    x = _table(store, ids, mat, np.arange(0, 30))
    y = _table(store, ids, mat, np.array([3, 35]))
    for delta in np.arange(0.5, 20.0):
        changed = mat.copy()
        changed[3, 0] += np.float32(delta)
        swapped = _table(store, ids, changed, np.arange(0, 30))
        if swapped.artifact.size == x.artifact.size:
            break
    assert swapped.artifact.size == x.artifact.size
    path = store._path(store._rel_from_uri(x.artifact.uri))
    store.fs.pipe_file(path, store.fs.cat_file(store._path(store._rel_from_uri(swapped.artifact.uri))))
    with pytest.raises(ArtifactCorruptedError, match=x.artifact.sha256[:12]):
        combine_vectors(store, [y, x])


def test_a_table_starting_before_its_footer_says_is_refused(tmp_path, small_batches, monkeypatch):
    """The merge opens a table when it reaches the footer's first id: a table found to start earlier is refused
    (its rows would otherwise come after larger ids)."""
    rng = np.random.default_rng(4)
    store = ArtifactStore(tmp_path / "store")
    ids, mat = _random_ids(rng, 30), rng.standard_normal((30, 3)).astype(np.float32)
    a, b = _table(store, ids, mat, np.arange(0, 30, 2)), _table(store, ids, mat, np.arange(1, 30, 2))
    real = storage.datasets._table_id_range

    def lying(store_: ArtifactStore, ref: VectorTableRef) -> tuple[bytes, bytes] | None:
        first, last = real(store_, ref)
        return (bytes(ids[21]), last) if ref == b else (first, last)

    monkeypatch.setattr(storage.datasets, "_table_id_range", lying)
    with pytest.raises(ValueError, match=re.escape(f"{b.artifact.uri} starts at sample {ids[1].decode()}, before")):
        combine_vectors(store, [a, b])


class _Spy:
    """Counts the vector tables being scanned at once and the largest chunk handed to the writer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open_now = self.most_open = self.largest_chunk = 0
        scan, write = storage.datasets._scan_vectors, storage.datasets.write_vector_chunks

        def scanning(store: ArtifactStore, ref: VectorTableRef) -> Iterator:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
            try:
                yield from scan(store, ref)
            finally:
                self.open_now -= 1

        def writing(store: ArtifactStore, chunks, *args, **kwargs) -> VectorTableRef:
            return write(store, self._sizes(chunks), *args, **kwargs)

        monkeypatch.setattr(storage.datasets, "_scan_vectors", scanning)
        monkeypatch.setattr(storage.datasets, "write_vector_chunks", writing)

    def _sizes(self, chunks) -> Iterator:
        for chunk in chunks:
            self.largest_chunk = max(self.largest_chunk, len(chunk[0]))
            yield chunk


def test_merging_runs_holds_a_batch_per_run_not_the_tables(tmp_path, monkeypatch):
    """40 tables in 4 interleaved runs (120 000 rows): at most one table of each run is open at a time, and the
    traced peak is a small fraction of the rows (the in-memory merge held about three copies of them)."""
    batch, runs, n, dim = 256, 4, 120_000, 16
    monkeypatch.setattr(storage.datasets, "_SCAN_BATCH_ROWS", batch)
    monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 512)
    rng = np.random.default_rng(5)
    store = ArtifactStore(tmp_path / "store")
    ids, mat = _random_ids(rng, n), rng.standard_normal((n, dim)).astype(np.float32)
    tables = _runs(rng, n, runs, 10)
    refs = [write_vector_chunks(store, [(ids[t], mat[t])], PRODUCER) for t in tables]
    expected = write_vector_chunks(store, [(ids, mat)], PRODUCER)
    total_bytes = n * (ID_DTYPE.itemsize + 4 * dim)

    read_vector_matrix(store, refs[0])  # the first scan in a process loads and caches ~3 MB: not the merge's
    spy = _Spy(monkeypatch)
    tracemalloc.start()
    try:
        combined = combine_vectors(store, refs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert combined == expected
    assert spy.most_open <= runs
    assert spy.largest_chunk <= runs * batch
    assert peak < total_bytes / 4, (peak, total_bytes)


def test_tables_without_footer_ranges_are_opened_at_once_and_still_streamed(tmp_path, small_batches,
                                                                           monkeypatch):
    rng = np.random.default_rng(6)
    store = ArtifactStore(tmp_path / "store")
    n = 300
    ids, mat = _random_ids(rng, n), rng.standard_normal((n, 4)).astype(np.float32)
    tables = _with_duplicates(rng, _runs(rng, n, 3, 4), n)
    refs = [_table(store, ids, mat, rows) for rows in tables]
    expected = _table(store, ids, mat, np.unique(np.concatenate(tables)))
    monkeypatch.setattr(storage.datasets, "_table_id_range", lambda store_, ref: None)
    spy = _Spy(monkeypatch)
    assert combine_vectors(store, refs) == expected
    assert spy.most_open == len(refs)
    assert spy.largest_chunk <= len(refs) * 7 < n
