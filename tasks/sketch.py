"""Stage "gradients + sketch": per-sample gradients of the pool (train split), sketched with a seeded projector.

LP mode: the gradient of a linear head w.r.t. its weights is the L2-normalised feature (SKMM.md §2), so the
gradients are the normalised embeddings, sketched to ``sketch_dim`` with a Gaussian projector when
``sketch_dim`` < d. FT mode: per-sample cross-entropy gradients, with seeded random pseudo-labels, w.r.t. the
last ``k`` blocks of the open_clip image tower plus a seeded head, projected batch by batch with one sparse JL
sketch (r is in the millions; the N×r matrix never exists). The sketch table records its producer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
from prefect import task

from skmm.gradients import normalize_features
from skmm.gradients.clip_ft import ft_gradient_sketch
from skmm.models.clip import ClipSpec
from skmm.sketch import GaussianProjector
from storage.datasets import DatasetRef, VectorTableRef, read_samples, read_vectors, write_vectors
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["run_sketch", "sketch"]

CODE_VERSION = "sketch-2"
MODES = ("lp", "ft")


def split_columns(store: Any, dataset: DatasetRef, split: str, columns: list[str]) -> dict[str, list]:
    """``columns`` of the rows of one split, as lists, in the dataset's (sorted) order."""
    table = read_samples(store, dataset, columns=sorted({*columns, "split"}))
    rows = table.filter(pc.equal(table.column("split"), split))
    return {c: rows.column(c).to_pylist() for c in columns}


def pool_ids(store: Any, dataset: DatasetRef, split: str = "train") -> tuple[list[str], list[str | None]]:
    """Sample ids and labels of one split, in the dataset's (sorted) order."""
    cols = split_columns(store, dataset, split, ["sample_id", "label"])
    return cols["sample_id"], cols["label"]


def clip_spec(model: dict[str, Any]) -> ClipSpec:
    """The ClipSpec of the pipeline's model config (name, pretrained, init_seed)."""
    return ClipSpec(model=model["name"], pretrained=model.get("pretrained"), init_seed=model.get("init_seed", 0))


def run_ft_sketch(dataset: dict, store: dict, model: dict[str, Any], sketch_dim: int, seed: int = 0, k: int = 1,
                  batch_size: int = 32, device: str | None = None) -> dict:
    """FT mode: sketched per-sample gradients of the last ``k`` tower blocks + head (label-free)."""
    if sketch_dim is None:
        raise ValueError("FT gradients have millions of coordinates: give a sketch_dim")
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    train = split_columns(st, ds, "train", ["sample_id", "data"])
    ids, images = train["sample_id"], train["data"]
    if not ids:
        raise ValueError("the dataset has no train split to select from")
    # The class count shapes the head; it is metadata of the dataset, not a per-sample label.
    labels = read_samples(st, ds, columns=["label"]).column("label").to_pylist()
    num_classes = len({label for label in labels if label is not None})
    grads, producer = ft_gradient_sketch(images, ids, clip_spec(model), k=k, num_classes=max(num_classes, 2),
                                         sketch_dim=sketch_dim, seed=seed, batch_size=batch_size, device=device)
    return write_vectors(st, ids, grads, producer, kind="sketch").to_dict()


def run_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
               mode: str = "lp", model: dict[str, Any] | None = None, k: int = 1, batch_size: int = 32,
               device: str | None = None) -> dict:
    if mode not in MODES:
        raise ValueError(f"gradient mode must be one of {MODES}; got {mode!r}")
    if mode == "ft":
        if model is None:
            raise ValueError("FT gradients need the model config")
        return run_ft_sketch(dataset, store, model, sketch_dim, seed, k, batch_size, device)
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


@task(name="gradients-sketch",
      cache_policy=ContentCache(code_version=CODE_VERSION, ignore=("batch_size", "device")),
      persist_result=True, result_serializer="json", **RETRY)
def sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
           mode: str = "lp", model: dict[str, Any] | None = None, k: int = 1, batch_size: int = 32,
           device: str | None = None) -> dict:
    """Prefect task wrapper of :func:`run_sketch`."""
    return run_sketch(embeddings, dataset, store, sketch_dim, seed, mode, model, k, batch_size, device)
