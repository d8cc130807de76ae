"""Stage "evaluate": the finetuned model's metrics on the held-out test split (or on the val split, when the
pipeline chooses between candidate selections: choices are made on val, the test split only reports)."""

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
SPLITS = ("test", "val")


def run_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict, split: str = "test") -> dict:
    """``split`` metrics of a linear probe (on the features) or a last-layers model (on the images)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    st = open_store(store)
    data = st.get_bytes(ArtifactRef.from_dict(model))
    ds = DatasetRef.from_dict(dataset)
    last_layers = model_format(data) == "skmm-last-layers/1"
    rows = split_columns(st, ds, split, ["sample_id", "label", *(["data"] if last_layers else [])])
    ids, labels = rows["sample_id"], rows["label"]
    if not ids:
        raise ValueError(f"the dataset has no {split} split to evaluate on")
    if last_layers:
        pred = LastLayersFinetuner.from_bytes(data).predict(rows["data"])
        return {**evaluate_predictions("classification", labels, pred), f"n_{split}": len(ids)}
    probe = LinearProbe.from_bytes(data)
    _, X = read_vectors(st, VectorTableRef.from_dict(embeddings), sample_ids=ids)
    metrics = evaluate_predictions(probe.task, labels, probe.predict(normalize_features(X)))
    return {**metrics, f"n_{split}": len(ids)}


@task(name="evaluate", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def evaluate(model: dict, embeddings: dict, dataset: dict, store: dict, split: str = "test") -> dict:
    """Prefect task wrapper of :func:`run_evaluate`."""
    return run_evaluate(model, embeddings, dataset, store, split)
