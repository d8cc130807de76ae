"""Scanning a vector table decodes a few thousand rows at a time, not a whole 65 536-row group: the LP sketch,
the sketch moment, the reduce pass and the LP evaluate all stream tables through this scan."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage.artifacts import ArtifactStore
from storage.datasets import DEFAULT_SHARD_ROWS, ID_DTYPE, read_vector_matrix, scan_vector_rows, write_vector_chunks


def test_a_scan_holds_much_less_arrow_memory_than_one_decoded_row_group(tmp_path):
    n, dim = DEFAULT_SHARD_ROWS + 4_464, 64
    ids = np.array([f"{i:064x}".encode() for i in range(n)], dtype=ID_DTYPE)
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    store = ArtifactStore(tmp_path / "store")
    ref = write_vector_chunks(store, [(ids, vectors)], {"name": "scan-memory"}, kind="sketch")
    group_bytes = DEFAULT_SHARD_ROWS * dim * 4  # one decoded row group's vectors, ids not counted

    base, peak, seen = pa.total_allocated_bytes(), 0, []
    for lo, rows in scan_vector_rows(store, ref, ids):
        peak = max(peak, pa.total_allocated_bytes() - base)
        seen.append((lo, rows.copy()))
    assert peak < group_bytes  # the whole-group decode held ~2.4 × group_bytes here
    assert [lo for lo, _ in seen] == list(np.cumsum([0] + [len(r) for _, r in seen[:-1]]))
    assert np.array_equal(np.concatenate([r for _, r in seen]), vectors)  # the same rows, in order
    assert np.array_equal(read_vector_matrix(store, ref), vectors)
