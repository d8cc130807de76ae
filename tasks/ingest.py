"""Stage "ingest": a user's pool (image folder, manifest, precomputed embeddings, or the bundled digits) into
Parquet shards with content-hash sample ids, a deterministic split, and a quarantine table for unreadable files.

The cache key is a fingerprint of the source's *content* (each file's sha256 and its class), never its path:
the same bytes at a new location hit the cache.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import fsspec
from prefect import task

from storage import sources
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.store import open_store

__all__ = ["ingest", "run_ingest", "source_fingerprint"]

CODE_VERSION = "ingest-1"
SOURCE_KINDS = ("digits", "folder", "manifest", "embeddings")


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as fh:
        while chunk := fh.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _sha_or_missing(path: str) -> str:
    try:
        return _file_sha(path)
    except (FileNotFoundError, OSError):
        return "missing"


def source_fingerprint(source: dict[str, Any]) -> dict[str, Any]:
    """What identifies a source's content: for a folder, the sorted (class, file sha256) pairs; for a manifest,
    its bytes plus the bytes of every file it lists (a listed file can change in place); for an embeddings
    table, its bytes; for digits, nothing but the parameters."""
    params = {k: v for k, v in source.items() if k != "path"}
    kind, path = source.get("kind"), source.get("path")
    if kind == "folder":
        root = pathlib.Path(path)
        if not root.is_dir():
            return {**params, "missing": str(path)}  # the task itself raises the clear error
        entries = sorted((p.relative_to(root).parts[0], _file_sha(str(p)))
                         for p in root.rglob("*") if p.is_file() and len(p.relative_to(root).parts) > 1)
        return {**params, "files": entries}
    if kind in ("manifest", "embeddings"):
        try:
            digest = _file_sha(path)
        except (FileNotFoundError, OSError):
            return {**params, "missing": str(path)}
        if kind == "embeddings":
            return {**params, "sha256": digest}
        try:
            files = [_sha_or_missing(t) for t in sources.manifest_targets(path)]
        except ValueError:  # unreadable manifest: the task raises the clear error
            files = []
        return {**params, "sha256": digest, "files": files}
    return params


def run_ingest(source: dict[str, Any], store: dict) -> dict:
    kind = source.get("kind", "digits")
    st = open_store(store)
    split = {k: source[k] for k in ("val_fraction", "test_fraction", "seed", "shard_rows") if k in source}
    if kind == "digits":
        result = sources.ingest_digits(st, image_size=source.get("image_size", 32), **split)
    elif kind == "folder":
        result = sources.ingest_image_folder(st, os.fspath(source["path"]), **split)
    elif kind == "manifest":
        result = sources.ingest_manifest(st, source["path"], **split)
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
