"""Stage "sketch moment": the pool moment SᵀS of a stored sketch (train split) and the sketch reduced with it to
the automatic m, as cached artifacts.

With the automatic sketch dimension every select task fits the m_max-column sketch projected onto the m leading
eigenvectors of its m_max × m_max moment (skmm.select.auto_sketch), and m depends on neither the budget nor the
method. So the projection is done here, once per (sketch, train split):

1. the moment: one streamed read of the table, row group by row group in the train split's order, float64 sums
   over the library's ``BLOCK_ROWS``-row blocks (bitwise the in-memory moment), stored as safetensors (512 KiB
   at m_max = 256);
2. the reduce: m and its basis chosen from the moment as every select task would (:func:`auto_basis`), and the
   table read once more, each ``BLOCK_ROWS``-row block projected (:func:`projected_blocks`, bitwise the rows the
   select path computes) and written as the N × m "reduced" sketch table, in the train split's order.

A select task then reads N × m float32 instead of N × m_max (at N = 10^7, m_max = 256, m = 100: 3.7 of 9.8 GiB;
bench/README.md §12); a rerun of this stage is a cache hit that reads nothing. The reduced table's producer
names its sketch, train split, moment, basis (sha256) and the record of m; a select task uses it only when they
are its own (:func:`usable_reduced`), so a reduced table can never change a selection.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from prefect import task

from skmm.select.auto_sketch import (
    BLOCK_ROWS,
    add_gram,
    auto_projection,
    eigen_moments,
    moment_from_bytes,
    moment_to_bytes,
    project_rows,
    reblock,
)
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import DatasetRef, VectorTableRef, scan_vector_rows, write_vector_chunks
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import train_ids
from tasks.store import open_store

__all__ = ["REDUCED_FORMAT", "auto_basis", "basis_digest", "load_moment", "pool_moment", "projected_blocks",
           "run_sketch_moment", "sketch_moment", "usable_reduced", "write_reduced"]

CODE_VERSION = "sketch-moment-2"  # issue 8: the stage also writes the reduced N × m sketch table
REDUCED_FORMAT = "skmm-reduced-sketch/1"

log = logging.getLogger(__name__)


def _warn(message: str) -> None:
    """A warning in the task run's log (the module's logger outside a run)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        log.warning(message)


def pool_moment(store: ArtifactStore, sketch: VectorTableRef, ids: np.ndarray) -> np.ndarray:
    """SᵀS (float64, dim × dim) of the sketch rows of ``ids`` (sorted), streamed in ``BLOCK_ROWS``-row blocks
    (a vector table holds finite rows only: storage refuses others when it is written)."""
    sigma = np.zeros((sketch.dim, sketch.dim))
    for _, block in reblock(scan_vector_rows(store, sketch, ids), sketch.dim, BLOCK_ROWS):
        add_gram(sigma, block)
    return sigma


def auto_basis(sigma: np.ndarray, num_rows: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(the m_max × m float32 basis of the automatic m, the record of its choice) from the float64 sum SᵀS of
    ``num_rows`` rows: what the library's ``sketch_dim="auto"`` computes from the whole sketch."""
    lam, V = eigen_moments(sigma, num_rows)
    return auto_projection(lam, V, np.float32)


def basis_digest(V: np.ndarray) -> str:
    """sha256 of a float32 basis (its shape and C-order bytes): equal digests, bitwise equal projections."""
    basis = np.ascontiguousarray(V, dtype=np.float32)
    return hashlib.sha256(f"{basis.shape[0]}x{basis.shape[1]}:".encode() + basis.tobytes()).hexdigest()


def projected_blocks(store: ArtifactStore, sketch: VectorTableRef, ids: np.ndarray, V: np.ndarray
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows @ V) of the sketch rows of ``ids`` (sorted), per ``BLOCK_ROWS``-row block of the split
    (each a new float32 array): the blocks and the products of ``tasks.select.read_auto_sketch``."""
    for lo, rows in reblock(scan_vector_rows(store, sketch, ids), sketch.dim, BLOCK_ROWS):
        yield lo, project_rows(((0, rows),), V, np.empty((len(rows), V.shape[1]), np.float32))


def write_reduced(store: ArtifactStore, sketch: VectorTableRef, dataset: DatasetRef, ids: np.ndarray,
                  sigma: np.ndarray, moment: ArtifactRef) -> VectorTableRef:
    """Store the sketch rows of ``ids`` (the train split, sorted) projected onto the automatic basis of
    ``sigma`` (their SᵀS, stored as ``moment``) as an N × m sketch table, streamed block by block."""
    V, auto = auto_basis(sigma, len(ids))
    producer = {"format": REDUCED_FORMAT, "sketch": sketch.artifact.sha256, "dataset": dataset.version,
                "num_rows": len(ids), "moment": moment.sha256, "basis": basis_digest(V), "block_rows": BLOCK_ROWS,
                "auto": auto}
    chunks = ((ids[lo:lo + len(rows)], rows) for lo, rows in projected_blocks(store, sketch, ids, V))
    return write_vector_chunks(store, chunks, producer, kind="sketch")


def run_sketch_moment(sketch: dict, dataset: dict, store: dict) -> dict:
    """The stage as a plain function: store SᵀS of the train split's sketch rows and the rows reduced to the
    automatic m; return small refs: ``{"moment", "reduced" (a vector table ref), "num_rows": N, "dim": m_max,
    "m", "auto" (the record of m)}``."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    sk = VectorTableRef.from_dict(sketch)
    ids = train_ids(st, ds)
    if len(ids) == 0:
        raise ValueError("the dataset has no train split to select from")
    sigma = pool_moment(st, sk, ids)
    data = moment_to_bytes(sigma, len(ids), sketch=sk.artifact.sha256, dataset=ds.version)
    ref = st.put_bytes(data, "moment", ".safetensors")
    reduced = write_reduced(st, sk, ds, ids, sigma, ref)
    return {"moment": ref.to_dict(), "reduced": reduced.to_dict(), "num_rows": len(ids), "dim": sk.dim,
            "m": reduced.dim, "auto": reduced.producer["auto"]}


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


def usable_reduced(moment: dict, sketch: VectorTableRef, dataset: DatasetRef, num_rows: int,
                   sigma: np.ndarray) -> tuple[VectorTableRef, dict[str, Any]] | None:
    """(the reduced table of a :func:`run_sketch_moment` result, the record of m) when it is exactly what this
    code would project from ``sigma`` (SᵀS of this sketch's train-split rows, from :func:`load_moment`); else
    None (a result without one, or a table made with another basis or rule: e.g. by older code, whose cached
    result outlived it), and the caller projects the sketch itself. ValueError for a table of another sketch or
    train split (a wrong argument, as for the moment)."""
    if moment.get("reduced") is None:
        return None
    reduced = VectorTableRef.from_dict(moment["reduced"])  # the producer is checked against the file when read
    made = reduced.producer
    if (made.get("format"), made.get("sketch"), made.get("dataset"), made.get("num_rows"), reduced.num_rows) != \
            (REDUCED_FORMAT, sketch.artifact.sha256, dataset.version, num_rows, num_rows):
        raise ValueError(f"reduced sketch {reduced.artifact.uri} belongs to another sketch or train split "
                         f"(sketch {made.get('sketch')}, dataset {made.get('dataset')}, {made.get('num_rows')} rows)")
    V, auto = auto_basis(sigma, num_rows)
    if (made.get("moment"), made.get("basis"), made.get("auto"), made.get("block_rows"), reduced.dim) != \
            (moment["moment"]["sha256"], basis_digest(V), auto, BLOCK_ROWS, V.shape[1]):
        _warn(f"reduced sketch {reduced.artifact.uri} was made with another moment, basis or rule (m = "
              f"{reduced.dim}, here {V.shape[1]}): this task projects the sketch itself")
        return None
    return reduced, auto


@task(name="sketch_moment", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def sketch_moment(sketch: dict, dataset: dict, store: dict) -> dict:
    """Prefect task wrapper of :func:`run_sketch_moment`."""
    return run_sketch_moment(sketch, dataset, store)
