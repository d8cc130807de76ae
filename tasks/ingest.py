"""Stage "ingest": a user's pool (image folder, manifest, WebDataset shards, precomputed embeddings, or the bundled
digits) into Parquet shards with content-hash sample ids, a deterministic split, and a quarantine table for
unreadable or oversized files.

The cache key is a *metadata* fingerprint of the source (:mod:`storage.ingest.fingerprint`: relative paths,
sizes, modification times, object ETags — never a read of the images, never the source's location), so an
unchanged pool of 10^5 files finds its cache hit in ~1.5 s (measured), and a moved one still hits. Remote sources
take credentials from the environment (and ``AWS_ENDPOINT_URL`` for an S3-compatible endpoint).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from storage import ingest as sources
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["ingest", "run_ingest", "source_fingerprint"]

CODE_VERSION = "ingest-3"  # 2: streaming writer (same bytes), links followed, max_pixels, webdataset; 3: ~1 MiB
# pages in sample shards (same rows, other bytes: a cached dataset is written again, its bytes taken from the old one)
SOURCE_KINDS = ("digits", "folder", "manifest", "webdataset", "embeddings")


def source_fingerprint(source: dict[str, Any]) -> dict[str, Any]:
    """What identifies a source for the cache: its parameters (not its path) plus
    :func:`storage.ingest.fingerprint` of its files' metadata. Never raises (Prefect would log a traceback and
    silently skip caching): a source it cannot describe gets a nonce, and the task reports the problem."""
    params = {k: v for k, v in source.items() if k != "path"}
    kind = source.get("kind", "digits")
    if kind == "digits":
        return params
    return {**params, "fingerprint": sources.fingerprint(kind, source.get("path"))}


def run_ingest(source: dict[str, Any], store: dict) -> dict:
    """Ingest ``source`` (a ``SourceConfig`` dump) into ``store``; the :class:`IngestResult` as JSON."""
    kind = source.get("kind", "digits")
    st = open_store(store)
    split = {k: source[k] for k in ("val_fraction", "test_fraction", "seed", "shard_rows") if k in source}
    images = {**split, **({"max_pixels": source["max_pixels"]} if "max_pixels" in source else {})}
    if kind == "digits":
        result = sources.ingest_digits(st, image_size=source.get("image_size", 32), **split)
    elif kind == "folder":
        result = sources.ingest_image_folder(st, os.fspath(source["path"]), **images)
    elif kind == "manifest":
        result = sources.ingest_manifest(st, source["path"], **images)
    elif kind == "webdataset":
        result = sources.ingest_webdataset(st, source["path"], **images)
    elif kind == "embeddings":
        result = sources.ingest_embeddings(st, source["path"], **split)
    else:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {SOURCE_KINDS}")
    return result.to_dict()


def _fingerprint_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {**inputs, "source": source_fingerprint(inputs["source"])}


@task(name="ingest", cache_policy=ContentCache(code_version=CODE_VERSION, key_inputs=_fingerprint_inputs),
      persist_result=True, result_serializer="json", **RETRY)
def ingest(source: dict[str, Any], store: dict) -> dict:
    """Prefect task wrapper of :func:`run_ingest`."""
    return run_ingest(source, store)
