"""Which store a run uses, passed between tasks as a small JSON-able spec (never credentials).

Credentials for S3 come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile),
so they never enter Prefect parameters, task inputs, cache keys, logs or lineage records.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import urllib.parse
from typing import TYPE_CHECKING, Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import RemoteFileSystem

from storage.artifacts import ArtifactStore

if TYPE_CHECKING:
    from prefect.filesystems import WritableFileSystem

__all__ = ["DEFAULT_STORE", "JsonResultsFileSystem", "open_store", "result_storage", "store_spec"]

DEFAULT_STORE = "./skmm-store"


def store_spec(url: str | os.PathLike = DEFAULT_STORE, endpoint_url: str | None = None) -> dict[str, Any]:
    """The spec tasks receive: an absolute URL (local paths resolved) and an optional S3 endpoint."""
    text = os.fspath(url)
    if "://" not in text:
        text = "file://" + str(pathlib.Path(text).expanduser().resolve())
    if "@" in text.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError("put credentials in the environment (AWS_ACCESS_KEY_ID, ...), not in the store URL")
    if endpoint_url and "@" in urllib.parse.urlsplit(endpoint_url).netloc:
        raise ValueError("put credentials in the environment, not in the endpoint URL (it is saved in a Prefect block)")
    return {"url": text, "endpoint_url": endpoint_url}


def open_store(spec: dict[str, Any]) -> ArtifactStore:
    """The ArtifactStore a spec names."""
    options: dict[str, Any] = {}
    if spec.get("endpoint_url"):
        options["endpoint_url"] = spec["endpoint_url"]
    return ArtifactStore(spec["url"], storage_options=options)


# The only serializer a shared store's result records may name: Prefect picks the decoder from the record
# itself, so a record naming pickle (or a JSON "object_decoder" of the writer's choosing) would run code on load.
_PLAIN_JSON = {"type": "json", "jsonlib": "json", "object_encoder": "prefect.serializers.prefect_json_object_encoder",
               "object_decoder": "prefect.serializers.prefect_json_object_decoder", "dumps_kwargs": {},
               "loads_kwargs": {}}


def plain_json_record(content: bytes, path: str) -> bytes:
    """``content`` if it is a Prefect result record serialized as plain JSON; ValueError otherwise."""
    try:
        serializer = json.loads(content)["metadata"]["serializer"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"cached result {path} is not a JSON result record; refusing to load it") from None
    if serializer != _PLAIN_JSON:
        kind = serializer.get("type") if isinstance(serializer, dict) else type(serializer).__name__
        raise ValueError(f"cached result {path} names serializer {kind!r} with non-default settings or another "
                         "type; refusing to load it (only plain JSON is read from a shared store)")
    return content


class JsonResultsFileSystem(RemoteFileSystem):
    """A RemoteFileSystem that hands Prefect only plain-JSON result records (see :func:`plain_json_record`).

    Anyone who can write a shared bucket could otherwise plant a record naming the pickle serializer under a
    cache key and run code on every machine that hits it (Prefect deserializes even to check that a key
    exists). A refused record reads as a cache miss: the task runs again and writes a clean record."""

    _block_type_name = "skmm JSON Results"

    async def aread_path(self, path: str) -> bytes:
        return plain_json_record(await super().aread_path(path), path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        with self.filesystem.open(resolved, "rb") as file:
            return plain_json_record(file.read(), path)


def result_storage(spec: dict[str, Any]) -> pathlib.Path | WritableFileSystem:
    """What tasks get as Prefect ``result_storage``: a folder *inside the store*, so cached results (small JSON
    refs) live as long as the artifacts they point to, and every machine using the same store shares one cache.

    Local stores give ``<store>/prefect-results`` as a Path. Remote stores give a :class:`JsonResultsFileSystem` on
    ``<store url>/prefect-results``, saved as a Prefect block (tasks refuse unsaved blocks) under a name derived
    from its settings, so every run reuses one block document. Its settings hold only the endpoint URL:
    credentials stay in the environment.
    """
    url = spec["url"]
    if url.startswith("file://"):
        return pathlib.Path(url[len("file://"):]) / "prefect-results"
    name, block = _results_block(spec)
    return _save_block(block, name)


def _results_block(spec: dict[str, Any]) -> tuple[str, WritableFileSystem]:
    """The (deterministic block name, unsaved block) for a remote store's results folder."""
    settings = {"endpoint_url": spec["endpoint_url"]} if spec.get("endpoint_url") else {}
    basepath = spec["url"].rstrip("/") + "/prefect-results"
    digest = hashlib.sha256(json.dumps([basepath, settings], sort_keys=True).encode()).hexdigest()[:16]
    return f"skmm-results-{digest}", JsonResultsFileSystem(basepath=basepath, settings=settings)


def _save_block(block: WritableFileSystem, name: str, attempts: int = 3) -> WritableFileSystem:
    """The saved document ``name`` when it already holds ``block``'s settings, else save ``block`` as ``name``
    (overwrite: the name fixes the content). Processes racing to create the same
    name are safe: the loser of the create updates the winner's document with identical values; a document
    deleted between that process's lookup and update is retried."""
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:  # the common case, every run after the first: one read, no write
        saved = type(block).load(name)
        if (saved.basepath, saved.settings) == (block.basepath, block.settings):
            return saved
    except (ValueError, ObjectNotFound):  # not saved yet on this server
        pass
    for attempt in range(attempts):
        try:
            block.save(name, overwrite=True)
            break
        except (ObjectAlreadyExists, ObjectNotFound):
            if attempt == attempts - 1:
                raise
    return block
