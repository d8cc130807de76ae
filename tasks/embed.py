"""Stage "embed": open_clip image features of every sample, one task per dataset shard, then one table.

Each shard is its own cached task (keyed by the shard's content hash and the model spec), so shards run in
parallel under Prefect's task runner and an unchanged shard is never embedded twice (shards are cut from the
rows sorted by sample id, so new samples shift the boundaries after the first of them). The
shards' tables are combined into one features table keyed by sample id, whose producer is the model spec.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from skmm.models.clip import embed_images
from storage.datasets import (
    DatasetRef,
    ShardRef,
    VectorTableRef,
    combine_vectors,
    load_manifest,
    read_shard,
    write_vectors,
)
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import clip_spec
from tasks.store import open_store

__all__ = ["combine_embeddings", "embed", "embed_shard", "run_embed", "run_embed_shard", "shards_of"]

CODE_VERSION = "embed-3"  # embed-3: fixed-shape blocks (bitwise batch-invariant features)


def shards_of(dataset: dict, store: dict) -> list[dict]:
    """The dataset's shard refs (small JSON), in sample-id order."""
    return [sh.to_dict() for sh in load_manifest(open_store(store), DatasetRef.from_dict(dataset)).shards]


def run_embed_shard(shard: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
                    device: str | None = None, progress: bool = False) -> dict:
    st = open_store(store)
    table = read_shard(st, ShardRef.from_dict(shard), columns=["sample_id", "data"])
    ids, images = table.column("sample_id").to_pylist(), table.column("data").to_pylist()
    if any(img is None for img in images):
        raise ValueError("some samples carry no image bytes: the embed stage needs them (or ingest embeddings)")
    spec = clip_spec(model)
    features = embed_images(images, spec, batch_size=batch_size, device=device, progress=progress)
    return write_vectors(st, ids, features, spec.to_dict(), kind="embeddings").to_dict()


def run_combine(parts: list[dict], store: dict) -> dict:
    return combine_vectors(open_store(store), [VectorTableRef.from_dict(p) for p in parts]).to_dict()


def run_embed(dataset: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
              device: str | None = None, progress: bool = False) -> dict:
    """All shards in sequence, then combined: the plain-function form of the stage."""
    parts = [run_embed_shard(sh, model, store, batch_size, device, progress) for sh in shards_of(dataset, store)]
    return run_combine(parts, store)


@task(name="embed", cache_policy=ContentCache(code_version=CODE_VERSION, ignore=("batch_size", "device", "progress")),
      persist_result=True, result_serializer="json", **RETRY)
def embed_shard(shard: dict, model: dict[str, Any], store: dict, batch_size: int = 64, device: str | None = None,
                progress: bool = False) -> dict:
    """Prefect task: the features of one dataset shard."""
    return run_embed_shard(shard, model, store, batch_size, device, progress)


@task(name="embed-combine", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def combine_embeddings(parts: list[dict], store: dict) -> dict:
    """Prefect task: the shards' feature tables as one table."""
    return run_combine(parts, store)


def embed(dataset: dict, model: dict[str, Any], store: dict, opts: dict, batch_size: int = 64,
          progress: bool = False) -> dict:
    """Submit one ``embed`` task per shard (they run concurrently), then combine: call inside a flow.
    ``progress`` shows a bar per shard (not part of the cache key)."""
    futures = [embed_shard.with_options(**opts).submit(sh, model, store, batch_size=batch_size, progress=progress)
               for sh in shards_of(dataset, store)]
    return combine_embeddings.with_options(**opts)([f.result() for f in futures], store)
