"""Precomputed embeddings: vectors, ids, quarantine of non-finite rows, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_pools import CLASSES, quarantine_of, rows_of, written

from storage.artifacts import ArtifactStore
from storage.datasets import read_samples, read_vectors, vector_sample_id
from storage.ingest import (
    IngestResult,
    SourceError,
    SourceNotFoundError,
    ingest_embeddings,
)


def embedding_table(n: int = 30, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), [CLASSES[i % 3] for i in range(n)]


def test_embeddings_fixed_size_list_quarantines_nan_and_writes_vectors(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    mat, labels = embedding_table()
    mat[7, 3] = np.nan
    mat[8, 0] = np.inf
    mat[9] = mat[4]  # an identical vector with the same label (both "cat"? make it so) collapses
    labels[9] = labels[4]
    flat = pa.array(mat.reshape(-1), pa.float32())
    table = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(flat, 8), "label": labels})
    path = tmp_path / "emb.parquet"
    pq.write_table(table, path)

    result = ingest_embeddings(store, path)
    assert result.n_samples == 27 and result.n_quarantined == 2 and result.n_duplicates_collapsed == 1
    assert sorted(quarantine_of(store, result)) == [(f"{path.as_uri()}#row=7", "non-finite vector (NaN or inf)"),
                                                    (f"{path.as_uri()}#row=8", "non-finite vector (NaN or inf)")]
    samples = read_samples(store, result.dataset)
    assert samples["data"].null_count == 27
    assert result.vectors is not None and result.vectors.kind == "embeddings" and result.vectors.dim == 8
    assert result.vectors.producer == {"source": "precomputed", "uri": path.as_uri(), "column": "embedding"}
    ids, vectors = read_vectors(store, result.vectors)
    assert ids == samples["sample_id"].to_pylist()
    assert all(vector_sample_id(v) == s for s, v in zip(ids, vectors, strict=True))
    good = [i for i in range(30) if i not in (7, 8, 9)]
    assert sorted(ids) == sorted(vector_sample_id(mat[i]) for i in good)
    assert IngestResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_embeddings_from_float_columns_and_id_column(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    mat, labels = embedding_table(n=24, dim=4)
    columns = {f"f{j}": mat[:, j].astype(np.float64) for j in range(4)}
    hex_ids = [hashlib.sha256(f"img{i}".encode()).hexdigest().upper() for i in range(12)]
    names = hex_ids + [f"user-key-{i}" for i in range(12, 24)]
    table = pa.table({"key": names, **columns, "label": labels, "score": [1] * 24,
                      "part": ["train"] * 20 + ["test"] * 4})
    path = tmp_path / "cols.parquet"
    pq.write_table(table, path)

    auto = ingest_embeddings(store, path, split_column="part")  # float columns f0..f3 picked automatically
    assert auto.vectors is not None and auto.vectors.dim == 4
    assert auto.vectors.producer["column"] == ["f0", "f1", "f2", "f3"]
    assert auto.split_counts == {"train": 20, "val": 0, "test": 4}

    keyed = ingest_embeddings(store, path, id_column="key", vector_column=["f0", "f1", "f2", "f3"])
    ids = {r[0] for r in rows_of(store, keyed)}
    assert {h.lower() for h in hex_ids} <= ids  # hex ids are taken as they are
    assert hashlib.sha256(b"user-key-12").hexdigest() in ids  # others are hashed
    assert keyed.dataset.version != auto.dataset.version

    clash = table.set_column(0, "key", pa.array(["same"] * 2 + names[2:]))
    pq.write_table(clash, tmp_path / "clash.parquet")
    with pytest.raises(SourceError, match="different vectors"):
        ingest_embeddings(store, tmp_path / "clash.parquet", id_column="key", vector_column=["f0", "f1"])


def test_embeddings_errors(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    mat, labels = embedding_table(n=6, dim=3)
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"embedding": [list(map(float, v)) for v in mat], "cls": labels}), path)
    with pytest.raises(SourceError, match="no label column 'label'"):
        ingest_embeddings(store, path)
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0]], "label": ["a", "b"]}), path)
    with pytest.raises(SourceError, match="different lengths"):
        ingest_embeddings(store, path)
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [3.0, 1.0]], "label": ["a", None]}), path)
    with pytest.raises(SourceError, match="row 1 has an empty label"):
        ingest_embeddings(store, path)
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0, 2.0], [0.0, 2.0]], "label": ["a", "b", "b"]}), path)
    with pytest.raises(SourceError, match="conflicting labels"):
        ingest_embeddings(store, path)
    with pytest.raises(SourceNotFoundError):
        ingest_embeddings(store, tmp_path / "absent.parquet")
    assert written(store) == []
