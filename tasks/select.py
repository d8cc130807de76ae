"""Stage "select": choose ``n`` samples of the pool with SkMM or a baseline; store them as a selection table."""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task

from skmm.select import make_selector
from storage.datasets import DatasetRef, VectorTableRef, read_vectors
from storage.selections import write_selection
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import pool_ids
from tasks.store import open_store

__all__ = ["run_select", "select"]

CODE_VERSION = "select-1"

# With class_balanced=True every method that can use labels spreads the budget evenly over classes
# (the authors' per-class top-n on real data); otherwise selection is label-free, as before labelling.
CLASS_BALANCED: dict[str, dict[str, Any]] = {
    "skmm": {"discretization": "per_class"},
    "skmm_best": {"discretization": "per_class"},
    "uniform": {"class_balanced": True},
}


def run_select(sketch: dict, dataset: dict, store: dict, method: str, n: int, seed: int = 0,
               params: dict | None = None, class_balanced: bool = False) -> dict:
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    sk = VectorTableRef.from_dict(sketch)
    ids, labels = pool_ids(st, ds, "train")
    if n > len(ids):
        raise ValueError(f"budget n={n} is larger than the pool (the train split holds {len(ids)} samples)")
    _, S = read_vectors(st, sk, sample_ids=ids)
    merged = {**(CLASS_BALANCED.get(method, {}) if class_balanced else {}), **(params or {})}
    selector = make_selector(method, n, random_state=seed, **merged)
    y = np.asarray(labels, dtype=object) if all(label is not None for label in labels) else None
    if selector.needs_labels and y is None:
        raise ValueError(f"{method} with class balancing needs a label for every pool sample")
    selector.fit(S, y)
    chosen = [ids[i] for i in selector.indices_]
    ref = write_selection(st, chosen, ranks=np.arange(len(chosen)), weights=selector.weights_, method=method,
                          params={**selector.get_params(), "random_state": seed})
    return {"selection": ref.to_dict(), "method": method, "n": n, "seed": seed}


@task(name="select", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def select(sketch: dict, dataset: dict, store: dict, method: str, n: int, seed: int = 0,
           params: dict | None = None, class_balanced: bool = False) -> dict:
    """Prefect task wrapper of :func:`run_select`."""
    return run_select(sketch, dataset, store, method, n, seed, params, class_balanced)
