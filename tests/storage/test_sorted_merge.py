"""Merging id-sorted streams (a grown dataset's runs) and the manifest's runs."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from storage.artifacts import ArtifactRef
from storage.datasets import DatasetManifest, ShardRef
from storage.errors import MalformedRecordError
from storage.sorted_merge import merge_sorted_tables


def _ids(n: int, seed: int) -> list[str]:
    return sorted(hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n))


def _stream(ids: list[str], sizes: list[int]) -> list[pa.Table]:
    out, lo = [], 0
    for size in sizes:
        out.append(pa.table({"sample_id": ids[lo:lo + size], "n": list(range(lo, lo + size))}))
        lo += size
    return out


@pytest.mark.parametrize("seed", range(12))
def test_merge_equals_a_global_sort_whatever_the_table_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    streams, every = [], []
    for k in range(int(rng.integers(1, 5))):
        ids = _ids(int(rng.integers(0, 60)), 100 * seed + k)
        every += ids
        sizes, left = [], len(ids)
        while left:
            sizes.append(min(left, int(rng.integers(0, 9))))  # empty tables too
            left -= sizes[-1]
        streams.append(_stream(ids, sizes))
    out = list(merge_sorted_tables(streams))
    got = [sid for t in out for sid in t.column("sample_id").to_pylist()]
    assert got == sorted(every)
    assert all(t.num_rows for t in out)


def test_merge_holds_one_table_a_stream() -> None:
    """Each output ends at the smallest current last id: no stream is read more than one table ahead."""
    a, b = _ids(40, 1), _ids(40, 2)
    pulled = []

    def lazy(ids: list[str], name: str):
        for t in _stream(ids, [4] * 10):
            pulled.append(name)
            yield t

    out = merge_sorted_tables([lazy(a, "a"), lazy(b, "b")])
    first = next(out)
    assert pulled.count("a") <= 2 and pulled.count("b") <= 2
    assert first.num_rows <= 8


def test_an_unsorted_stream_is_refused() -> None:
    ids = _ids(6, 3)
    with pytest.raises(ValueError, match="not in sample_id order"):
        list(merge_sorted_tables([[pa.table({"sample_id": ids[3:]}), pa.table({"sample_id": ids[:3]})],
                                  [pa.table({"sample_id": _ids(2, 4)})]]))


def _shard(i: int) -> ShardRef:
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return ShardRef(ArtifactRef(uri=f"file:///s/{sha}.parquet", sha256=sha, size=10, kind="samples"), 5)


def test_manifest_runs_round_trip_and_one_run_keeps_the_old_bytes() -> None:
    shards = tuple(_shard(i) for i in range(5))
    one = DatasetManifest("a" * 64, 25, shards)
    assert "runs" not in one.to_dict() and one.shard_runs() == (shards,)
    grown = DatasetManifest("a" * 64, 25, shards, runs=(3, 2))
    back = DatasetManifest.from_json(grown.to_json())
    assert back == grown and back.shard_runs() == (shards[:3], shards[3:])


@pytest.mark.parametrize("runs", [[5], [3, 3], [0, 5], [], "5", [2.0, 3]])
def test_bad_runs_are_refused(runs: object) -> None:
    data = DatasetManifest("a" * 64, 25, tuple(_shard(i) for i in range(5))).to_dict()
    data["runs"] = runs
    with pytest.raises(MalformedRecordError, match="runs"):
        DatasetManifest.from_dict(data)
