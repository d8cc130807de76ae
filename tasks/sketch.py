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
from storage.datasets import (
    DatasetRef,
    ShardRef,
    VectorTableRef,
    combine_vectors,
    load_manifest,
    read_shard,
    read_vectors,
    write_vectors,
)
from storage.sample_reader import iter_metadata, read_images, read_metadata
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["combine_sketches", "ft_sketch_shard", "gradients_sketch", "run_ft_sketch_shard", "run_sketch", "sketch"]

CODE_VERSION = "sketch-2"
FT_CODE_VERSION = "ft-sketch-1"  # FT gradients shard by shard
MODES = ("lp", "ft")


def split_columns(store: Any, dataset: DatasetRef, split: str, columns: list[str]) -> dict[str, list]:
    """``columns`` of the rows of one split, as lists, in the dataset's (sorted) order.

    The ids, labels and splits are read without the image bytes (verified by the dataset version); with ``data``
    among ``columns``, only the split's images are read then (each verified by its id)."""
    meta = read_metadata(store, dataset, sorted({"sample_id", *columns} - {"data"}), split=split)
    out = {c: meta.column(c).to_pylist() for c in columns if c != "data"}
    if "data" in columns:
        images = read_images(store, dataset, meta.column("sample_id"))
        out["data"] = images.column("data").to_pylist()  # both in sample-id order, one row per id
    return out


def pool_ids(store: Any, dataset: DatasetRef, split: str = "train") -> tuple[list[str], list[str | None]]:
    """Sample ids and labels of one split, in the dataset's (sorted) order."""
    cols = split_columns(store, dataset, split, ["sample_id", "label"])
    return cols["sample_id"], cols["label"]


def clip_spec(model: dict[str, Any]) -> ClipSpec:
    """The ClipSpec of the pipeline's model config (name, pretrained, init_seed)."""
    return ClipSpec(model=model["name"], pretrained=model.get("pretrained"), init_seed=model.get("init_seed", 0))


def dataset_num_classes(store: Any, dataset: DatasetRef) -> int:
    """The number of distinct labels of the dataset (the FT head's width), read from the label column."""
    classes: set[str] = set()
    for part in iter_metadata(store, dataset, ["label"]):
        classes.update(pc.unique(part.column("label").drop_null()).to_pylist())
    return max(len(classes), 2)


def run_ft_sketch_shard(shard: dict, store: dict, model: dict[str, Any], num_classes: int, sketch_dim: int,
                        seed: int = 0, k: int = 1, batch_size: int = 32, device: str | None = None) -> dict | None:
    """FT mode, one dataset shard: the sketched gradients of its train rows (None when it has none).

    A row depends on its image, id, the model, class count, seed and k, and on the batch it was computed in
    only through float rounding (~1e-7): the shards are fixed by the dataset, so a rerun, or the same shards
    on other workers, give the same rows."""
    st = open_store(store)
    table = read_shard(st, ShardRef.from_dict(shard), columns=["sample_id", "split", "data"])
    train = table.filter(pc.equal(table.column("split"), "train"))
    if train.num_rows == 0:
        return None
    ids = train.column("sample_id").to_pylist()
    grads, producer = ft_gradient_sketch(train.column("data").to_pylist(), ids, clip_spec(model), k=k,
                                         num_classes=num_classes, sketch_dim=sketch_dim, seed=seed,
                                         batch_size=batch_size, device=device)
    return write_vectors(st, ids, grads, producer, kind="sketch").to_dict()


def run_ft_sketch(dataset: dict, store: dict, model: dict[str, Any], sketch_dim: int, seed: int = 0, k: int = 1,
                  batch_size: int = 32, device: str | None = None, num_classes: int | None = None) -> dict:
    """FT mode: sketched per-sample gradients of the last ``k`` tower blocks + head (label-free), shard by shard
    (one shard's images in memory at a time), combined into one table."""
    if sketch_dim is None:
        raise ValueError("FT gradients have millions of coordinates: give a sketch_dim")
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    classes = num_classes or dataset_num_classes(st, ds)  # metadata of the dataset, not a per-sample label
    parts = [run_ft_sketch_shard(sh.to_dict(), store, model, classes, sketch_dim, seed, k, batch_size, device)
             for sh in load_manifest(st, ds).shards]
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("the dataset has no train split to select from")
    return combine_vectors(st, [VectorTableRef.from_dict(p) for p in parts]).to_dict()


def run_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
               mode: str = "lp", model: dict[str, Any] | None = None, k: int = 1, batch_size: int = 32,
               device: str | None = None, num_classes: int | None = None) -> dict:
    """The stage as a plain function: LP (normalised features, Gaussian sketch) or FT (shard by shard)."""
    if mode not in MODES:
        raise ValueError(f"gradient mode must be one of {MODES}; got {mode!r}")
    if mode == "ft":
        if model is None:
            raise ValueError("FT gradients need the model config")
        return run_ft_sketch(dataset, store, model, sketch_dim, seed, k, batch_size, device, num_classes)
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
    """Prefect task wrapper of :func:`run_sketch` (the LP stage; FT runs per shard, see :func:`gradients_sketch`)."""
    return run_sketch(embeddings, dataset, store, sketch_dim, seed, mode, model, k, batch_size, device)


@task(name="gradients-sketch-shard",
      cache_policy=ContentCache(code_version=FT_CODE_VERSION, ignore=("batch_size", "device")),
      persist_result=True, result_serializer="json", **RETRY)
def ft_sketch_shard(shard: dict, store: dict, model: dict[str, Any], num_classes: int, sketch_dim: int,
                    seed: int = 0, k: int = 1, batch_size: int = 32, device: str | None = None) -> dict | None:
    """Prefect task: one shard's sketched FT gradients (a unit a Dask worker can take)."""
    return run_ft_sketch_shard(shard, store, model, num_classes, sketch_dim, seed, k, batch_size, device)


@task(name="gradients-sketch-combine", cache_policy=ContentCache(code_version=FT_CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def combine_sketches(parts: list[dict], store: dict) -> dict:
    """Prefect task: the shards' sketch tables as one table (the one select reads)."""
    if not parts:
        raise ValueError("the dataset has no train split to select from")
    return combine_vectors(open_store(store), [VectorTableRef.from_dict(p) for p in parts]).to_dict()


def gradients_sketch(embeddings: dict | None, dataset: dict, store: dict, opts: dict, *, sketch_dim: int | None,
                     seed: int, mode: str, model: dict[str, Any], k: int = 1, num_classes: int | None = None,
                     batch_size: int = 32) -> dict:
    """The gradients + sketch stage inside a flow: LP as one task; FT as one task per dataset shard, submitted
    concurrently (on the flow's task runner: threads, or Dask workers), then combined."""
    if mode != "ft":
        return sketch.with_options(**opts)(embeddings, dataset, store, sketch_dim=sketch_dim, seed=seed, mode=mode,
                                           model=model, k=k)
    if sketch_dim is None:
        raise ValueError("FT gradients have millions of coordinates: give a sketch_dim")
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    classes = num_classes or dataset_num_classes(st, ds)
    futures = [ft_sketch_shard.with_options(**opts).submit(sh.to_dict(), store, model, classes, sketch_dim, seed, k,
                                                           batch_size=batch_size)
               for sh in load_manifest(st, ds).shards]
    parts = [p for p in (f.result() for f in futures) if p is not None]
    return combine_sketches.with_options(**opts)(parts, store)
