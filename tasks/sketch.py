"""Stage "gradients + sketch": per-sample gradients of the pool (train split), sketched with a seeded projector.

LP mode: the gradient of a linear head w.r.t. its weights is the L2-normalised feature (SKMM.md §2), so the
gradients are the normalised embeddings, sketched to ``sketch_dim`` with a Gaussian projector when
``sketch_dim`` < d. The sketch table records its producer: the mode, the embeddings' producer digest and the
sketch spec.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task

from skmm.gradients import normalize_features
from skmm.sketch import GaussianProjector
from storage.datasets import DatasetRef, VectorTableRef, read_samples, read_vectors, write_vectors
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["run_sketch", "sketch"]

CODE_VERSION = "sketch-1"


def pool_ids(store: Any, dataset: DatasetRef, split: str = "train") -> tuple[list[str], list[str | None]]:
    """Sample ids and labels of one split, in the dataset's (sorted) order."""
    table = read_samples(store, dataset, columns=["sample_id", "label", "split"])
    ids, labels, splits = (table.column(c).to_pylist() for c in ("sample_id", "label", "split"))
    keep = [i for i, s in enumerate(splits) if s == split]
    return [ids[i] for i in keep], [labels[i] for i in keep]


def run_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
               mode: str = "lp") -> dict:
    if mode != "lp":
        raise ValueError(f"gradient mode {mode!r} is not available in the pipeline yet; use 'lp'")
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    ids, _ = pool_ids(st, ds, "train")
    if not ids:
        raise ValueError("the dataset has no train split to select from")
    _, features = read_vectors(st, emb, sample_ids=ids)
    grads = normalize_features(features.astype(np.float32))
    spec = None
    if sketch_dim is not None and sketch_dim < grads.shape[1]:
        proj = GaussianProjector(grads.shape[1], sketch_dim, seed).fit()
        grads = np.concatenate([proj.project(grads[i:i + 8192]) for i in range(0, len(grads), 8192)])
        spec = proj.spec.to_dict()
    producer = {"mode": mode, "features": emb.producer_digest, "sketch": spec}
    ref = write_vectors(st, ids, grads, producer, kind="sketch")
    return ref.to_dict()


@task(name="gradients-sketch", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
           mode: str = "lp") -> dict:
    """Prefect task wrapper of :func:`run_sketch`."""
    return run_sketch(embeddings, dataset, store, sketch_dim, seed, mode)
