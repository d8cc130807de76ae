"""Stage "evaluate": the finetuned model's metrics on the held-out test split (or on the val split, when the
pipeline chooses between candidate selections: choices are made on val, the test split only reports).

Streamed, so that memory does not grow with the pool: a last-layers model predicts ``EVAL_IMAGES`` images at a
time as they are read (verified, :func:`storage.sample_reader.iter_split`), a linear probe ``PROBE_ROWS`` feature
rows at a time as the vector table is scanned; only the split's labels and predictions (a few bytes a row) are
kept. The metrics are those of predicting the whole split at once. The val split is evaluated on its
``val_limit`` smallest ids (the sample the finetune stage chooses on, :data:`tasks.finetune.VAL_LIMIT`); the test
split always in full.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task

from skmm.finetune import LastLayersFinetuner, LinearProbe, evaluate_predictions, model_format
from skmm.gradients import normalize_features
from skmm.select.auto_sketch import reblock
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, scan_vector_rows
from storage.sample_reader import check_limit, iter_split, read_split_ids
from tasks.cache import ContentCache
from tasks.finetune import VAL_LIMIT
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["EVAL_IMAGES", "PROBE_ROWS", "evaluate", "run_evaluate"]

CODE_VERSION = "evaluate-3"  # evaluate-3: streamed; the val split's val_limit smallest ids
SPLITS = ("test", "val")
EVAL_IMAGES = 256  # images decoded and predicted at a time (rounded down to a multiple of the model's batch size)
PROBE_ROWS = 8192  # feature rows normalised and predicted at a time


def _split_metrics(task: str, labels: list[pa.Array], pred: np.ndarray, classes: np.ndarray | None,
                   split: str) -> dict[str, float]:
    """:func:`~skmm.finetune.evaluate_predictions` of the split's labels (Arrow chunks) and predictions (indices
    into ``classes``; regression: values), with no per-row Python objects.

    Classification labels and predictions become their ranks in the sorted union of the labels that occur, the
    order scikit-learn sorts string labels in: the same confusion counts in the same class order, so the very
    same metrics as on the strings."""
    if task == "regression":
        y_true = np.concatenate([np.asarray(c.to_pylist(), float) for c in labels]) if labels else np.zeros(0)
        return evaluate_predictions(task, y_true, pred)
    y = pa.chunked_array(labels, pa.string()).combine_chunks()
    if y.null_count:
        raise ValueError(f"{y.null_count} rows of the {split} split have no label: classification metrics need "
                         "a label on every evaluated row")
    encoded = y.dictionary_encode()
    seen, names, used = encoded.dictionary.to_pylist(), classes.tolist(), np.unique(pred)
    rank = {v: i for i, v in enumerate(sorted(set(seen) | {names[i] for i in used}))}
    true_rank = np.array([rank[v] for v in seen], np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]
    class_rank = np.array([rank.get(v, -1) for v in names], np.int64)  # -1: never predicted, never looked up
    return evaluate_predictions(task, true_rank, class_rank[pred])


def _class_index(classes: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Each predicted label's index in ``classes``."""
    order = np.argsort(classes, kind="stable")
    return order[np.searchsorted(classes[order], pred)]


def _last_layers(data: bytes, st: Any, ds: DatasetRef, split: str, limit: int | None
                 ) -> tuple[list[pa.Array], np.ndarray, np.ndarray]:
    """(labels, predicted class indices, classes) of a last-layers model, ``EVAL_IMAGES`` images at a time.

    Chunks are whole multiples of the model's batch size, so every forward batch is the one a single predict
    over the whole split would run: the same predictions, bit for bit."""
    ft = LastLayersFinetuner.from_bytes(data)
    chunk = max(EVAL_IMAGES // ft.batch_size, 1) * ft.batch_size
    labels: list[pa.Array] = []
    preds: list[np.ndarray] = []
    pending: list[bytes] = []

    def flush(n: int) -> None:
        preds.append(ft.decision_function(pending[:n]).argmax(1))
        del pending[:n]

    for part in iter_split(st, ds, split, limit, images=True, batch_rows=chunk):
        labels.extend(part.column("label").chunks)
        pending.extend(part.column("data").to_pylist())
        while len(pending) >= chunk:
            flush(chunk)
    if pending:
        flush(len(pending))
    return labels, np.concatenate(preds) if preds else np.zeros(0, np.int64), ft.classes_


def _probe(data: bytes, st: Any, ds: DatasetRef, emb: VectorTableRef, split: str, limit: int | None
           ) -> tuple[str, list[pa.Array], np.ndarray, np.ndarray | None]:
    """(task, labels, predictions, classes) of a linear probe: the split's ids and labels first (64 B + the label
    a row), then its features ``PROBE_ROWS`` rows at a time."""
    probe = LinearProbe.from_bytes(data)
    ids, labels = read_split_ids(st, ds, split, limit, labels=True)
    n = len(ids)
    pred = np.empty(n, np.float64 if probe.task == "regression" else np.int64)
    if n:
        for lo, block in reblock(scan_vector_rows(st, emb, ids), emb.dim, block_rows=PROBE_ROWS):
            out = probe.predict(normalize_features(block))
            pred[lo:lo + len(block)] = out if probe.task == "regression" else _class_index(probe.classes_, out)
    return probe.task, labels.chunks, pred, probe.classes_


def run_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict, split: str = "test",
                 val_limit: int | None = VAL_LIMIT) -> dict:
    """``split`` metrics of a linear probe (on the features) or a last-layers model (on the images), and the
    number of rows evaluated (``n_test`` / ``n_val``).

    ``val_limit``: the val split is evaluated on its ``val_limit`` smallest sample ids (None: all of it) — the
    sample the finetune stage chose on; the test split always in full. Memory: the split's labels and
    predictions plus one batch, whatever the pool's size."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    val_limit = check_limit(val_limit, "val_limit")
    st = open_store(store)
    data = st.get_bytes(ArtifactRef.from_dict(model))
    ds = DatasetRef.from_dict(dataset)
    limit = val_limit if split == "val" else None
    if model_format(data) == "skmm-last-layers/1":
        task_kind = "classification"
        labels, pred, classes = _last_layers(data, st, ds, split, limit)
    else:
        task_kind, labels, pred, classes = _probe(data, st, ds, VectorTableRef.from_dict(embeddings), split, limit)
    if not len(pred):
        raise ValueError(f"the dataset has no {split} split to evaluate on")
    return {**_split_metrics(task_kind, labels, pred, classes, split), f"n_{split}": len(pred)}


@task(name="evaluate", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def evaluate(model: dict, embeddings: dict, dataset: dict, store: dict, split: str = "test",
             val_limit: int | None = VAL_LIMIT) -> dict:
    """Prefect task wrapper of :func:`run_evaluate`."""
    return run_evaluate(model, embeddings, dataset, store, split, val_limit)
