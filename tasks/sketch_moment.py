"""Stage "sketch moment": the pool moment SᵀS of a stored sketch (train split), as a small cached artifact.

With the automatic sketch dimension every select task needs the eigenvectors of the m_max × m_max moment of
the m_max-column sketch (skmm.select.auto_sketch). Computed here once per sketch — one streamed read of the
table, row group by row group in the train split's order, float64 sums over the library's ``BLOCK_ROWS``-row
blocks, so the result is bitwise what the in-memory path computes — it is stored (safetensors, 512 KiB at
m_max = 256) and passed to the select tasks by reference; a rerun is a cache hit that reads nothing.
"""

from __future__ import annotations

import numpy as np
from prefect import task

from skmm.select.auto_sketch import BLOCK_ROWS, add_gram, moment_from_bytes, moment_to_bytes, reblock
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import DatasetRef, VectorTableRef, scan_vector_rows
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import train_ids
from tasks.store import open_store

__all__ = ["load_moment", "pool_moment", "run_sketch_moment", "sketch_moment"]

CODE_VERSION = "sketch-moment-1"


def pool_moment(store: ArtifactStore, sketch: VectorTableRef, ids: np.ndarray) -> np.ndarray:
    """SᵀS (float64, dim × dim) of the sketch rows of ``ids`` (sorted), streamed in ``BLOCK_ROWS``-row blocks
    (a vector table holds finite rows only: storage refuses others when it is written)."""
    sigma = np.zeros((sketch.dim, sketch.dim))
    for _, block in reblock(scan_vector_rows(store, sketch, ids), sketch.dim, BLOCK_ROWS):
        add_gram(sigma, block)
    return sigma


def run_sketch_moment(sketch: dict, dataset: dict, store: dict) -> dict:
    """The stage as a plain function: store SᵀS of the train split's sketch rows; return
    ``{"moment": artifact ref, "num_rows": N, "dim": m_max}``."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    sk = VectorTableRef.from_dict(sketch)
    ids = train_ids(st, ds)
    if len(ids) == 0:
        raise ValueError("the dataset has no train split to select from")
    sigma = pool_moment(st, sk, ids)
    data = moment_to_bytes(sigma, len(ids), sketch=sk.artifact.sha256, dataset=ds.version)
    ref = st.put_bytes(data, "moment", ".safetensors")
    return {"moment": ref.to_dict(), "num_rows": len(ids), "dim": sk.dim}


def load_moment(store: ArtifactStore, moment: dict, sketch: VectorTableRef, dataset: DatasetRef,
                num_rows: int) -> np.ndarray:
    """SᵀS from a :func:`run_sketch_moment` result, checked to be this sketch's and this train split's
    (ValueError otherwise: a moment of another pool would silently change the selection)."""
    sigma, info = moment_from_bytes(store.get_bytes(ArtifactRef.from_dict(moment["moment"])))
    if (info.get("sketch"), info.get("dataset"), info.get("num_rows"), sigma.shape[0]) != \
            (sketch.artifact.sha256, dataset.version, num_rows, sketch.dim):
        raise ValueError(f"sketch moment {moment['moment']['uri']} belongs to another sketch or train split "
                         f"(sketch {info.get('sketch')}, dataset {info.get('dataset')}, {info.get('num_rows')} rows)")
    return sigma


@task(name="sketch_moment", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def sketch_moment(sketch: dict, dataset: dict, store: dict) -> dict:
    """Prefect task wrapper of :func:`run_sketch_moment`."""
    return run_sketch_moment(sketch, dataset, store)
