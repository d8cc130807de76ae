"""Stage "evaluate": the finetuned model's metrics on the held-out test split."""

from __future__ import annotations

from prefect import task

from skmm.finetune import LastLayersFinetuner, LinearProbe, evaluate_predictions, model_format
from skmm.gradients import normalize_features
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, read_samples, read_vectors
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import pool_ids
from tasks.store import open_store

__all__ = ["evaluate", "run_evaluate"]

CODE_VERSION = "evaluate-2"


def run_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict) -> dict:
    """Test-split metrics of a linear probe (on the features) or a last-layers model (on the images)."""
    st = open_store(store)
    data = st.get_bytes(ArtifactRef.from_dict(model))
    ds = DatasetRef.from_dict(dataset)
    ids, labels = pool_ids(st, ds, "test")
    if not ids:
        raise ValueError("the dataset has no test split to evaluate on")
    if model_format(data) == "skmm-last-layers/1":
        table = read_samples(st, ds, columns=["sample_id", "data", "split"])
        images = [d for d, s in zip(table.column("data").to_pylist(), table.column("split").to_pylist(),
                                    strict=True) if s == "test"]
        pred = LastLayersFinetuner.from_bytes(data).predict(images)
        return {**evaluate_predictions("classification", labels, pred), "n_test": len(ids)}
    probe = LinearProbe.from_bytes(data)
    _, X = read_vectors(st, VectorTableRef.from_dict(embeddings), sample_ids=ids)
    metrics = evaluate_predictions(probe.task, labels, probe.predict(normalize_features(X)))
    return {**metrics, "n_test": len(ids)}


@task(name="evaluate", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def evaluate(model: dict, embeddings: dict, dataset: dict, store: dict) -> dict:
    """Prefect task wrapper of :func:`run_evaluate`."""
    return run_evaluate(model, embeddings, dataset, store)
