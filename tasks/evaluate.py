"""Stage "evaluate": the finetuned model's metrics on the held-out test split."""

from __future__ import annotations

from prefect import task

from skmm.finetune import LinearProbe, evaluate_predictions
from skmm.gradients import normalize_features
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, read_vectors
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import pool_ids
from tasks.store import open_store

__all__ = ["evaluate", "run_evaluate"]

CODE_VERSION = "evaluate-1"


def run_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict) -> dict:
    st = open_store(store)
    probe = LinearProbe.from_bytes(st.get_bytes(ArtifactRef.from_dict(model)))
    ids, labels = pool_ids(st, DatasetRef.from_dict(dataset), "test")
    if not ids:
        raise ValueError("the dataset has no test split to evaluate on")
    _, X = read_vectors(st, VectorTableRef.from_dict(embeddings), sample_ids=ids)
    metrics = evaluate_predictions(probe.task, labels, probe.predict(normalize_features(X)))
    return {**metrics, "n_test": len(ids)}


@task(name="evaluate", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def evaluate(model: dict, embeddings: dict, dataset: dict, store: dict) -> dict:
    """Prefect task wrapper of :func:`run_evaluate`."""
    return run_evaluate(model, embeddings, dataset, store)
