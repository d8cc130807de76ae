"""Stage "select": choose ``n`` samples of the pool with SkMM or a baseline; store them as a selection table.

Built for pools of 10^7 samples: the train split's ids are one fixed-width byte array (64 B per sample, no
Python object each), the sketch is read straight into one float32 N × m array in the split's order (row group
by row group, matched on the sorted ids), and labels are decoded only for a selector that uses them. With SkMM,
the sketch and its moment matrix P are the only N × m arrays (two copies of the sketch; see "The select stage
at N = 10^7" in bench/README.md). With the automatic m the N × m_max sketch is never held either: the stage
reads the N × m sketch that tasks.sketch_moment reduced once for all select tasks (or, without one, streams the
wide sketch through the projection onto the m leading directions of its moment).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from skmm.select import make_selector
from skmm.select.auto_sketch import BLOCK_ROWS, fit_on_reduced, project_rows, reblock
from skmm.select.moment_matching import AUTO_M_MAX
from storage.artifacts import ArtifactStore
from storage.datasets import (
    DatasetRef,
    VectorTableRef,
    read_vector_matrix,
    scan_vector_rows,
)
from storage.selections import write_selection
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import train_rows
from tasks.sketch_moment import auto_basis, load_moment, pool_moment, usable_reduced
from tasks.store import open_store

__all__ = ["label_array", "read_auto_sketch", "run_select", "select", "train_split"]

CODE_VERSION = "select-7"  # 3: the automatic m is max(64, 2 × signal rank); 4: params record the pivot rule;
# 5: skmm_best's params record third_candidate (SkMMBest's new parameter); indices unchanged; 6: and
# pivoted_candidate; 7: the selectors' default pivoting "auto" (convex SkMM greedy through the signal rank at a
# tight budget, n < 5 × signal rank: other rows there)

# With class_balanced=True every method that can use labels spreads the budget evenly over classes
# (the authors' per-class top-n on real data); otherwise selection is label-free, as before labelling.
CLASS_BALANCED: dict[str, dict[str, Any]] = {
    "skmm": {"discretization": "per_class"},
    "skmm_best": {"discretization": "per_class"},
    "uniform": {"class_balanced": True},
}


def train_split(store: ArtifactStore, dataset: DatasetRef) -> tuple[np.ndarray, pa.ChunkedArray]:
    """The train split's sample ids (sorted ``ID_DTYPE`` array) and labels (Arrow strings), shard by shard.

    Reads the id, label and split columns only (never the image bytes), verified by the dataset version."""
    return train_rows(store, dataset, labels=True)  # type: ignore[return-value]  # labels=True: never None


def label_array(labels: pa.ChunkedArray) -> np.ndarray | None:
    """Labels as an object array whose entries share one str per class (8 bytes a sample), or None when some
    sample has no label."""
    if labels.null_count:
        return None
    encoded = pc.dictionary_encode(labels.combine_chunks())
    classes = np.empty(len(encoded.dictionary), dtype=object)
    classes[:] = encoded.dictionary.to_pylist()
    return classes[encoded.indices.to_numpy()]


def run_select(sketch: dict, dataset: dict, store: dict, method: str, n: int, seed: int = 0,
               params: dict | None = None, class_balanced: bool = False, moment: dict | None = None) -> dict:
    """Select ``n`` train samples with ``method``; store and return the selection's ref.

    With ``sketch_dim="auto"`` (an m_max <= ``AUTO_M_MAX``-column sketch) the N × m_max sketch is never held.
    ``moment``: a :func:`tasks.sketch_moment.run_sketch_moment` result. Its reduced N × m table, when it is this
    sketch's and train split's (ValueError otherwise) and was made with the basis this task computes from the
    moment, is read as the sketch (one N × m float32 read); else the sketch is read once more, projected row group
    by row group onto the m leading eigenvectors of the moment (streamed here without ``moment``). Either way the
    rows, and so the selection, are bitwise those of fitting the whole sketch."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    sk = VectorTableRef.from_dict(sketch)
    ids, labels = train_split(st, ds)
    if n > len(ids):
        raise ValueError(f"budget n={n} is larger than the pool (the train split holds {len(ids)} samples)")
    merged = {**(CLASS_BALANCED.get(method, {}) if class_balanced else {}), **(params or {})}
    selector = make_selector(method, n, random_state=seed, **merged)
    y = label_array(labels) if selector.needs_labels else None  # no selector reads labels it does not need
    del labels
    if selector.needs_labels and y is None:
        raise ValueError(f"{method} with class balancing needs a label for every pool sample")
    if merged.get("sketch_dim") == "auto" and sk.dim <= AUTO_M_MAX:
        sigma = load_moment(st, moment, sk, ds, len(ids)) if moment is not None else pool_moment(st, sk, ids)
        reduced = usable_reduced(moment, sk, ds, len(ids), sigma) if moment is not None else None
        if reduced is not None:  # the N × m table the stage wrote once for every select task
            S, auto = read_vector_matrix(st, reduced[0], ids), reduced[1]
        else:
            S, auto = read_auto_sketch(st, sk, ids, sigma)
        fitted = fit_on_reduced(selector, S, y, auto)
    else:  # a fixed m, or a wider table that the selector first sketches to AUTO_M_MAX columns itself
        S = read_vector_matrix(st, sk, ids)
        fitted = selector.fit(S, y)
    del S, y
    chosen = [s.decode("ascii") for s in ids[fitted.indices_]]
    auto = fitted.selection_.info.get("auto_sketch")  # sketch_dim="auto": the rule and the m it chose
    ref = write_selection(st, chosen, ranks=np.arange(len(chosen)), weights=fitted.weights_, method=method,
                          params={**fitted.get_params(), "random_state": seed,
                                  **({"auto_sketch": auto} if auto else {})})
    out = {"selection": ref.to_dict(), "method": method, "n": n, "seed": seed}
    if auto:
        out["sketch_dim"] = auto["m"]
    return out


def read_auto_sketch(store: ArtifactStore, sketch: VectorTableRef, ids: np.ndarray, sigma: np.ndarray
                     ) -> tuple[np.ndarray, dict]:
    """(the train split's sketch rows projected onto the leading m eigenvectors of SᵀS/N, the record of m): one
    streamed read into one float32 N × m array, in the library's blocks
    (skmm.select.auto_sketch), so the rows equal ``selection_sketch(S, "auto", ·)`` bit for bit."""
    V, auto = auto_basis(sigma, len(ids))
    out = np.empty((len(ids), V.shape[1]), np.float32)
    project_rows(reblock(scan_vector_rows(store, sketch, ids), sketch.dim, BLOCK_ROWS), V, out)
    return out, auto


# ``moment`` (the moment and the reduced table) is derived from the sketch and the dataset, checked on load, and
# used only when it is what this task would compute: it changes no selection, so it is not in the key.
@task(name="select", cache_policy=ContentCache(code_version=CODE_VERSION, ignore=("moment",)), persist_result=True,
      result_serializer="json", **RETRY)
def select(sketch: dict, dataset: dict, store: dict, method: str, n: int, seed: int = 0,
           params: dict | None = None, class_balanced: bool = False, moment: dict | None = None) -> dict:
    """Prefect task wrapper of :func:`run_select`."""
    return run_select(sketch, dataset, store, method, n, seed, params, class_balanced, moment)
