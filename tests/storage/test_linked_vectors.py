"""Linked vector tables: a grown dataset's per-run feature tables, linked by a small manifest, read by every vector
reader as the one table write_vectors of the union would be."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from helpers import random_sample_ids as _random_ids

import storage.datasets
from storage import datasets as ds
from storage.artifacts import ArtifactStore
from storage.errors import ArtifactCorruptedError, MalformedRecordError
from storage.linked_vectors import is_linked, link_vectors, linked_parts

PRODUCER = {"model": "link-test"}


def _part(store: ArtifactStore, ids: np.ndarray, mat: np.ndarray, rows: np.ndarray) -> ds.VectorTableRef:
    """The table of ``rows`` (one run's combined features)."""
    return ds.write_vectors(store, [s.decode() for s in ids[rows]], mat[rows], PRODUCER)


def _runs(rng: np.random.Generator, n: int, runs: int) -> list[np.ndarray]:
    """Row numbers of each run: rows dealt at random to ``runs`` interleaved runs."""
    owner = rng.integers(0, runs, n)
    return [rows for r in range(runs) if len(rows := np.flatnonzero(owner == r))]


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """7-row scan batches and 16-row row groups: a merge crosses many batch and row group boundaries."""
    monkeypatch.setattr(storage.datasets, "_SCAN_BATCH_ROWS", 7)
    monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 16)


def _object(ref) -> pathlib.Path:
    return pathlib.Path(ref.artifact.uri.removeprefix("file://"))


@pytest.mark.parametrize("seed", range(4))
def test_every_reader_reads_a_link_of_interleaved_runs_as_the_union(tmp_path, small_batches, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 200))
    ids = _random_ids(rng, n)
    mat = rng.standard_normal((n, 5)).astype(np.float32)
    store = ArtifactStore(tmp_path / "store")
    runs = _runs(rng, n, int(rng.integers(2, 5)))  # one table per run: each run's combined table
    parts = [_part(store, ids, mat, rows) for rows in runs]
    linked = link_vectors(store, [parts[i] for i in rng.permutation(len(parts))])
    union = ds.write_vectors(store, [s.decode() for s in ids], mat, PRODUCER)

    assert is_linked(linked) and linked.num_rows == n and linked.dim == 5
    assert _object(linked).stat().st_size < 1000 * len(parts)  # a manifest, not the features again
    assert link_vectors(store, list(reversed(parts))) == linked  # the same parts in any order: the same link
    got_ids, got = ds.read_vectors(store, linked)
    assert got_ids == [s.decode() for s in ids] and np.array_equal(got, mat)
    assert np.array_equal(ds.read_vector_matrix(store, linked), mat)
    some = np.sort(rng.choice(n, n // 3, replace=False))
    assert np.array_equal(ds.read_vector_matrix(store, linked, ids[some[::-1]]), mat[some[::-1]])
    rows = np.concatenate([r for _, r in ds.scan_vector_rows(store, linked, ids[some])])
    assert np.array_equal(rows, mat[some])
    assert ds.combine_vectors(store, [linked]) == linked
    assert ds.combine_vectors(store, [linked, parts[0]]).artifact == union.artifact  # as the union's table


def test_one_table_is_not_linked_and_mixed_tables_are_refused(store):
    a = ds.write_vectors(store, ["a" * 64], np.ones((1, 3)), PRODUCER)
    assert link_vectors(store, [a]) is a
    other = ds.write_vectors(store, ["b" * 64], np.ones((1, 3)), {"model": "another"})
    with pytest.raises(ValueError, match="different producers"):
        link_vectors(store, [a, other])
    wide = ds.write_vectors(store, ["b" * 64], np.ones((1, 4)), PRODUCER)
    with pytest.raises(ValueError, match="different producers, kinds or dims"):
        link_vectors(store, [a, wide])
    with pytest.raises(ValueError, match="at least one"):
        link_vectors(store, [])
    b = ds.write_vectors(store, ["b" * 64], np.ones((1, 3)), PRODUCER)
    linked = link_vectors(store, [a, b])
    with pytest.raises(ValueError, match="link its parts"):
        link_vectors(store, [linked, a])


def test_a_sample_in_two_parts_is_refused_when_read(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    a = ds.write_vectors(store, ["a" * 64, "c" * 64], np.ones((2, 3)), PRODUCER)
    b = ds.write_vectors(store, ["b" * 64, "c" * 64], np.ones((2, 3)), PRODUCER)  # "c…" twice, identical rows
    linked = link_vectors(store, [a, b])
    with pytest.raises(MalformedRecordError, match="3 distinct samples, not 4"):
        ds.read_vector_matrix(store, linked)


def test_a_damaged_part_or_manifest_is_named(tmp_path, small_batches):
    rng = np.random.default_rng(0)
    ids = _random_ids(rng, 60)
    mat = rng.standard_normal((60, 4)).astype(np.float32)
    store = ArtifactStore(tmp_path / "store")
    parts = [_part(store, ids, mat, rows) for rows in _runs(rng, 60, 2)]
    linked = link_vectors(store, parts)
    path = _object(parts[1])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises((ArtifactCorruptedError, MalformedRecordError), match=parts[1].artifact.sha256):
        ds.read_vector_matrix(store, linked)

    body = json.loads(_object(linked).read_bytes())
    body["num_rows"] = 59
    _object(linked).write_text(json.dumps(body))
    with pytest.raises(ArtifactCorruptedError):
        linked_parts(store, linked)


def test_a_manifest_that_misstates_its_parts_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    a = ds.write_vectors(store, ["a" * 64], np.ones((1, 3)), PRODUCER)
    b = ds.write_vectors(store, ["b" * 64], np.ones((1, 3)), PRODUCER)
    linked = link_vectors(store, [a, b])
    body = json.loads(_object(linked).read_bytes())
    body["parts"] = body["parts"][:1]
    forged = store.put_bytes(json.dumps(body).encode(), "embeddings", ".json")
    with pytest.raises(MalformedRecordError, match="at least two parts"):
        linked_parts(store, ds.VectorTableRef(forged, linked.kind, linked.producer, linked.producer_digest, 2, 3))


def test_the_audit_reads_a_linked_sketchs_spec_from_its_manifest(tmp_path):
    from storage.audit import sketch_producer

    store = ArtifactStore(tmp_path / "store")
    spec = {"mode": "ft", "sketch": {"kind": "sparse_jl", "m": 3}}
    parts = [ds.write_vectors(store, [c * 64], np.ones((1, 3)), spec, kind="sketch") for c in "ab"]
    linked = link_vectors(store, parts)
    assert is_linked(linked) and sketch_producer(store, linked.artifact) == parts[0].producer
