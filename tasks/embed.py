"""Stage "embed": open_clip image features of every sample, one task per dataset shard, then one table.

Each shard is its own cached task (keyed by the shard's content hash and the model spec), so shards run in
parallel under Prefect's task runner and an unchanged shard is never embedded twice. Shards are cut from the rows
sorted by sample id, so a grown pool's new samples change the shards from the first of them on (about all of them:
ids are uniform). A changed shard therefore embeds only the samples that no earlier run embedded with the same
model: it looks its ids up in the store's feature catalog (:mod:`storage.feature_catalog`: per producer digest
and :data:`CODE_VERSION`, listed once per run), takes the vectors found there, runs the tower on the rest, writes
the shard's table (sorted by id, as before) and catalogues the rows it computed. Features are bitwise
batch-invariant (``skmm.models.clip``), so the table is byte for byte what a from-scratch run writes, and a 1 %
growth embeds about 1 % of the pool. The shards' tables are combined into one features table keyed by sample id,
whose producer is the model spec.

The feature spec (:func:`feature_spec`) is the model config's tower plus its ``precision`` ("fp32" unless the
config names another) and ``block_rows`` (64 unless the config names another). :func:`embed_model`, called where
the stage starts (the flow's process), adds the block size of that machine's device
(:func:`skmm.models.clip.default_block_rows`: 64 on the CPU, 512 on a large CUDA device), so the model config the
tasks receive, which is their cache key, determines the spec: a task never picks a block size of its own. Both are
in the spec's dict, hence in every table's producer, the catalog's scope and the task cache key whenever they
differ from the defaults, and in the stage's counts (lineage metrics) always: features computed at another
precision or block shape are never mixed. The default CPU spec is unchanged (64-row fp32 blocks), so are its
tables and keys.
Decoding runs in worker processes while the tower encodes (``decode_workers``, not part of any key: the bits do
not depend on it).

Caveat shared with the task cache: features are bitwise reproducible on one machine and build; a store shared by
CPU and GPU machines at the same block size and precision mixes their (float32 round-off apart) features, at
shard granularity through the cache and at sample granularity through the catalog (at their default block
sizes, 64 and 512, they differ in the spec and are not mixed).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
from prefect import task

from skmm.models.clip import BLOCK_ROWS, MAX_PIXELS, ClipSpec, default_block_rows, embed_images
from storage.artifacts import ArtifactStore
from storage.datasets import (
    DatasetRef,
    ShardRef,
    VectorTableRef,
    combine_vectors,
    load_manifest,
    producer_digest,
    read_shard,
    write_vectors,
)
from storage.feature_catalog import FeatureCatalog
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["combine_embeddings", "embed", "embed_model", "embed_shard", "embed_with_counts", "feature_spec",
           "run_embed", "run_embed_shard", "shards_of"]

# embed-3: fixed-shape blocks (bitwise batch-invariant features). embed-4: 16-bit, I and F images decoded
# faithfully (they were clipped to white), so their features changed; 8-bit images' did not. The feature catalog is
# scoped by this version too (per-sample reuse itself changed no output byte).
CODE_VERSION = "embed-4"
KIND = "embeddings"

_CATALOGS: OrderedDict[tuple[str, str, str], FeatureCatalog] = OrderedDict()
_CATALOGS_LOCK = threading.Lock()
_KEEP_CATALOGS = 2  # runs whose catalogs a process keeps, e.g. tasks of runs that ended elsewhere
log = logging.getLogger(__name__)


def shards_of(dataset: dict, store: dict) -> list[dict]:
    """The dataset's shard refs (small JSON), in sample-id order."""
    return [sh.to_dict() for sh in load_manifest(open_store(store), DatasetRef.from_dict(dataset)).shards]


def feature_spec(model: dict[str, Any]) -> ClipSpec:
    """The spec of the features the embed stage computes from the pipeline's model config (name, pretrained,
    init_seed; optional precision, default "fp32", and block_rows, default 64)."""
    return ClipSpec(model=model["name"], pretrained=model.get("pretrained"), init_seed=model.get("init_seed", 0),
                    precision=model.get("precision", "fp32"), block_rows=model.get("block_rows", BLOCK_ROWS))


def embed_model(model: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """``model`` as the embed tasks are given it: with ``device``'s block size (None: this machine's, as
    :func:`~skmm.models.clip.resolve_device`) when the config names none and it is not the default 64, so a CUDA
    run's task cache keys and spec differ from a CPU run's; unchanged otherwise."""
    if model.get("block_rows") is not None:
        return model
    rows = default_block_rows(device)
    return model if rows == BLOCK_ROWS else {**model, "block_rows": rows}


def feature_catalog(st: ArtifactStore, spec: ClipSpec, catalog_run: str | None = None) -> FeatureCatalog:
    """The feature catalog of ``spec``'s features in ``st``: one shared instance per ``catalog_run`` (so the
    shards of one run list the catalog once), a fresh one when ``catalog_run`` is None."""
    digest = producer_digest(spec.to_dict())
    if catalog_run is None:
        return FeatureCatalog(st, KIND, digest, CODE_VERSION)
    key = (st.url, digest, catalog_run)
    with _CATALOGS_LOCK:
        catalog = _CATALOGS.get(key)
        if catalog is None:
            catalog = _CATALOGS[key] = FeatureCatalog(st, KIND, digest, CODE_VERSION)
            while len(_CATALOGS) > _KEEP_CATALOGS:
                _CATALOGS.popitem(last=False)
        _CATALOGS.move_to_end(key)
        return catalog


def _release_catalogs(catalog_run: str) -> None:
    """Drop a finished run's catalogs (and the tables they cache) from this process."""
    with _CATALOGS_LOCK:
        for key in [k for k in _CATALOGS if k[2] == catalog_run]:
            del _CATALOGS[key]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def run_embed_shard(shard: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
                    device: str | None = None, progress: bool = False, catalog_run: str | None = None,
                    max_pixels: int = MAX_PIXELS, decode_workers: int | None = None) -> dict:
    """The features of one dataset shard, embedding only the samples the feature catalog does not hold
    (``decode_workers``: see :func:`skmm.models.clip.embed_images`; None = cores − 1).

    Returns ``{"vectors": <VectorTableRef dict>, "embedded": n, "reused": m}``."""
    st = open_store(store)
    table = read_shard(st, ShardRef.from_dict(shard), columns=["sample_id", "data"])
    ids, images = table.column("sample_id").to_pylist(), table.column("data").to_pylist()
    if any(img is None for img in images):
        raise ValueError("some samples carry no image bytes: the embed stage needs them (or ingest embeddings)")
    spec = feature_spec(model)
    catalog = feature_catalog(st, spec, catalog_run)
    known = catalog.lookup(ids)
    todo = [i for i, sid in enumerate(ids) if sid not in known.vectors]
    fresh = (embed_images([images[i] for i in todo], spec, batch_size=batch_size, device=device, progress=progress,
                          max_pixels=max_pixels, decode_workers=decode_workers)
             if todo else None)
    dim = fresh.shape[1] if fresh is not None else len(next(iter(known.vectors.values())))
    if any(len(v) != dim for v in known.vectors.values()):
        raise ValueError(f"feature catalog {st.uri(catalog.prefix)} holds vectors of another width than {spec.model}'s "
                         f"{dim}: delete that catalog folder and rerun")
    features = np.empty((len(ids), dim), dtype=np.float32)
    for i, sid in enumerate(ids):
        if sid in known.vectors:
            features[i] = known.vectors[sid]
    if fresh is not None:
        features[todo] = fresh
    ref = write_vectors(st, ids, features, spec.to_dict(), kind=KIND)
    if todo:  # catalogue the rows computed here: the shard table itself when nothing was reused
        new_ids = [ids[i] for i in todo]
        delta = ref if len(todo) == len(ids) else write_vectors(st, new_ids, fresh, spec.to_dict(), kind=KIND)
        catalog.register(delta, new_ids)
    _logger().info("embed shard %s…: %d samples embedded, %d reused from %d catalogued table(s)",
                   ShardRef.from_dict(shard).artifact.sha256[:12], len(todo), len(ids) - len(todo), known.tables)
    return {"vectors": ref.to_dict(), "embedded": len(todo), "reused": len(ids) - len(todo)}


def _vectors_of(result: dict) -> dict:
    """The table ref in a shard result (results cached before the counts were added are the bare ref)."""
    return result["vectors"] if "vectors" in result else result


def run_combine(parts: list[dict], store: dict) -> dict:
    return combine_vectors(open_store(store), [VectorTableRef.from_dict(_vectors_of(p)) for p in parts]).to_dict()


def run_embed(dataset: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
              device: str | None = None, progress: bool = False) -> dict:
    """All shards in sequence, then combined: the plain-function form of the stage (no task cache, so every
    shard is looked up in the catalog; unchanged ones embed nothing). The block size is ``device``'s
    (:func:`embed_model`)."""
    run = uuid.uuid4().hex
    model = embed_model(model, device)
    try:
        parts = [run_embed_shard(sh, model, store, batch_size, device, progress, catalog_run=run)
                 for sh in shards_of(dataset, store)]
    finally:
        _release_catalogs(run)
    return run_combine(parts, store)


@task(name="embed", cache_policy=ContentCache(code_version=CODE_VERSION,
                                              ignore=("batch_size", "device", "progress", "catalog_run",
                                                      "max_pixels", "decode_workers")),
      persist_result=True, result_serializer="json", **RETRY)
def embed_shard(shard: dict, model: dict[str, Any], store: dict, batch_size: int = 64, device: str | None = None,
                progress: bool = False, catalog_run: str | None = None, max_pixels: int = MAX_PIXELS,
                decode_workers: int | None = None) -> dict:
    """Prefect task: the features of one dataset shard (``catalog_run``, not in the cache key, groups the shards
    of one run so that they list the feature catalog once; ``max_pixels``, not in it either, is the ingest's
    limit: the images in the dataset passed it, and their features do not depend on it; nor do they depend on
    ``decode_workers``)."""
    return run_embed_shard(shard, model, store, batch_size, device, progress, catalog_run, max_pixels,
                           decode_workers)


@task(name="embed-combine", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def combine_embeddings(parts: list[dict], store: dict) -> dict:
    """Prefect task: the shards' feature tables as one table."""
    return run_combine(parts, store)


def embed_with_counts(dataset: dict, model: dict[str, Any], store: dict, opts: dict, batch_size: int = 64,
                      progress: bool = False, max_pixels: int = MAX_PIXELS,
                      decode_workers: int | None = None) -> tuple[dict, dict[str, Any]]:
    """:func:`embed`, also returning what this run did: ``shards``, ``shards_cached`` (task cache hits),
    ``samples_cached`` (their rows), ``samples_embedded`` (through the tower) and ``samples_reused`` (from the
    feature catalog), and how the features are computed: ``precision`` and ``block_rows`` (the feature spec's).
    Call inside a flow."""
    run = uuid.uuid4().hex
    model = embed_model(model)  # this machine's block size, in the tasks' cache keys
    spec = feature_spec(model)
    shards = shards_of(dataset, store)
    futures = [embed_shard.with_options(**opts).submit(sh, model, store, batch_size=batch_size, progress=progress,
                                                       catalog_run=run, max_pixels=max_pixels,
                                                       decode_workers=decode_workers) for sh in shards]
    try:
        results = [f.result() for f in futures]
    finally:  # shards that ran in this process shared one catalog; the run is over
        _release_catalogs(run)
    counts: dict[str, Any] = {"shards": len(shards), "shards_cached": 0, "samples_cached": 0, "samples_embedded": 0,
                              "samples_reused": 0, "precision": spec.precision, "block_rows": spec.block_rows}
    for shard, future, result in zip(shards, futures, results, strict=True):
        if future.state.name == "Cached":  # the result describes the run that computed it, not this one
            counts["shards_cached"] += 1
            counts["samples_cached"] += shard["num_rows"]
        else:
            counts["samples_embedded"] += result["embedded"]
            counts["samples_reused"] += result["reused"]
    _logger().info("embed: %(samples_embedded)d samples embedded, %(samples_reused)d reused from the feature "
                   "catalog, %(samples_cached)d in %(shards_cached)d of %(shards)d shards cached", counts)
    combined = combine_embeddings.with_options(**opts)([_vectors_of(r) for r in results], store)
    return combined, counts


def embed(dataset: dict, model: dict[str, Any], store: dict, opts: dict, batch_size: int = 64,
          progress: bool = False) -> dict:
    """Submit one ``embed`` task per shard (they run concurrently), then combine: call inside a flow.
    ``progress`` shows a bar per shard (not part of the cache key)."""
    return embed_with_counts(dataset, model, store, opts, batch_size=batch_size, progress=progress)[0]
