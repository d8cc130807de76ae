"""Stage "evaluate": the finetuned model's metrics on the held-out test split."""

from __future__ import annotations

from prefect import task

from skmm.finetune import LastLayersFinetuner, LinearProbe, evaluate_predictions, model_format
from skmm.gradients import normalize_features
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, read_vectors
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import split_columns
from tasks.store import open_store

__all__ = ["evaluate", "run_evaluate"]

CODE_VERSION = "evaluate-2"


def run_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict) -> dict:
    """Test-split metrics of a linear probe (on the features) or a last-layers model (on the images)."""
    st = open_store(store)
    data = st.get_bytes(ArtifactRef.from_dict(model))
    ds = DatasetRef.from_dict(dataset)
    last_layers = model_format(data) == "skmm-last-layers/1"
    test = split_columns(st, ds, "test", ["sample_id", "label", *(["data"] if last_layers else [])])
    ids, labels = test["sample_id"], test["label"]
    if not ids:
        raise ValueError("the dataset has no test split to evaluate on")
    if last_layers:
        pred = LastLayersFinetuner.from_bytes(data).predict(test["data"])
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
