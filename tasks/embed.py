"""Stage "embed": open_clip image features of every sample, batched, on CUDA when available.

The features table is keyed by sample id and records the model spec as its producer; the cache key is the
dataset's content version plus the model spec.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from skmm.models.clip import ClipSpec, embed_images
from storage.datasets import DatasetRef, read_samples, write_vectors
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["embed", "run_embed"]

CODE_VERSION = "embed-1"


def run_embed(dataset: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
              device: str | None = None, progress: bool = False) -> dict:
    st = open_store(store)
    spec = ClipSpec(model=model["name"], pretrained=model.get("pretrained"), init_seed=model.get("init_seed", 0))
    table = read_samples(st, DatasetRef.from_dict(dataset), columns=["sample_id", "data"])
    ids = table.column("sample_id").to_pylist()
    images = table.column("data").to_pylist()
    if any(img is None for img in images):
        raise ValueError("some samples carry no image bytes: the embed stage needs them (or ingest embeddings)")
    features = embed_images(images, spec, batch_size=batch_size, device=device, progress=progress)
    return write_vectors(st, ids, features, spec.to_dict(), kind="embeddings").to_dict()


@task(name="embed", cache_policy=ContentCache(code_version=CODE_VERSION, ignore=("batch_size", "device", "progress")),
      persist_result=True, result_serializer="json", **RETRY)
def embed(dataset: dict, model: dict[str, Any], store: dict, batch_size: int = 64, device: str | None = None,
          progress: bool = False) -> dict:
    """Prefect task wrapper of :func:`run_embed`."""
    return run_embed(dataset, model, store, batch_size, device, progress)
