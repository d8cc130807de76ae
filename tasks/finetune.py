"""Stage "finetune": a linear probe on the selected samples' features, saved as safetensors with its hash.

The probe's strength C is chosen on the validation split (never the test split) from a small grid.
"""

from __future__ import annotations

from prefect import task

from skmm.finetune import LinearProbe
from skmm.gradients import normalize_features
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, read_vectors
from storage.selections import read_selection
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import pool_ids
from tasks.store import open_store

__all__ = ["STRENGTHS", "linear_probe", "run_linear_probe"]

CODE_VERSION = "finetune-lp-1"
STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


def run_linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict,
                     strengths: list[float] | None = None, task: str = "classification") -> dict:
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    train_ids, train_labels = pool_ids(st, ds, "train")
    label_of = dict(zip(train_ids, train_labels, strict=True))
    missing = [s for s in chosen if s not in label_of]
    if missing:
        raise ValueError(f"{len(missing)} selected samples are not in the dataset's train split (first {missing[0]})")
    y = [label_of[s] for s in chosen]
    if any(label is None for label in y):
        raise ValueError("selected samples have no label: the linear probe needs labels for the coreset")
    _, X = read_vectors(st, emb, sample_ids=chosen)
    val_ids, val_labels = pool_ids(st, ds, "val")
    grid = list(strengths or STRENGTHS)
    X_val = None
    if len(grid) > 1:
        if not val_ids:
            raise ValueError("choosing the probe strength needs a val split; pass a single strength instead")
        _, X_val = read_vectors(st, emb, sample_ids=val_ids)
        X_val = normalize_features(X_val)
    probe = LinearProbe(task=task, strengths=grid).fit(normalize_features(X), y, X_val,
                                                        val_labels if X_val is not None else None)
    ref = st.put_bytes(probe.to_bytes(), "model", ".safetensors")
    return {"model": ref.to_dict(), "strength": probe.strength_,
            "validation_scores": {repr(k): v for k, v in probe.validation_scores_.items()}}


@task(name="finetune-linear-probe", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict,
                 strengths: list[float] | None = None, task: str = "classification") -> dict:
    """Prefect task wrapper of :func:`run_linear_probe`."""
    return run_linear_probe(embeddings, dataset, selection, store, strengths, task)
