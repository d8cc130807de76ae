"""Cache keys from content, not paths: a stage reruns only when its inputs' bytes, its parameters or its code
change.

Prefect's INPUTS policy hashes argument values as given; our tasks exchange artifact refs whose ``uri`` would
tie the key to a location. :class:`ContentCache` reduces every ref to its content hash before hashing, adds an
explicit ``code_version`` (TASK_SOURCE sees only the task body, not the helpers it calls), and raises — never
returns None — when an input cannot be canonicalised, so a broken key is loud instead of silently uncached.

What a cache *hit* may be: the result-storage blocks (:class:`JsonResultsFileSystem` for object stores,
:class:`JsonLocalResultsFileSystem` for local ones) hand Prefect a record only through :func:`accept_cached`:
plain JSON (never a pickle), and every artifact it or the task's inputs name intact in the store. Anything
else reads as a miss, so the task runs again and rewrites the record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pathlib
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fsspec
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore, write_local_atomically
from storage.errors import StorageError
from storage.verify_memo import verify_remembered

__all__ = ["UNCHECKED_KINDS", "CachedResultRefused", "ContentCache", "JsonLocalResultsFileSystem",
           "JsonResultsFileSystem", "accept_cached", "artifact_refs", "content_view", "plain_json_record",
           "verify_once"]

_LOCATION_KEYS = {"uri", "source_uri"}


def content_view(value: Any) -> Any:
    """The part of an input that identifies its content: refs lose their location, the rest stays."""
    if isinstance(value, dict):
        has_hash = "sha256" in value or "version" in value
        return {k: content_view(v) for k, v in sorted(value.items())
                if not (has_hash and k in _LOCATION_KEYS)}
    if isinstance(value, list | tuple):
        return [content_view(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "to_dict"):
        return content_view(value.to_dict())
    raise TypeError(f"cannot derive a content cache key from a {type(value).__name__}; pass refs, not data")


@dataclass(kw_only=True)
class ContentCache(CachePolicy):
    """Key = sha256(task name, code version, canonical JSON of the content view of the inputs).

    Our fields are keyword-only, and ``key_storage`` (CachePolicy's own first field) must stay None: a positional
    code version landing there would silently move the cache records into a folder named after it.

    ``ignore`` names inputs that must not affect the key (e.g. a progress-bar flag); ``key_inputs`` lets a task
    replace its inputs by a content fingerprint it computes (e.g. of a source folder's files).
    """

    code_version: str = "1"
    ignore: tuple[str, ...] = ()
    key_inputs: Any = None

    def __post_init__(self) -> None:
        if self.key_storage is not None:
            raise TypeError("ContentCache takes keyword arguments only (code_version=...); key_storage must be None")

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        selected = {k: v for k, v in inputs.items() if k not in self.ignore}
        if self.key_inputs is not None:
            selected = self.key_inputs(selected)
        payload = {"task": task_ctx.task.name, "code": self.code_version, "inputs": content_view(selected)}
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- trusted records
# The only serializer a store's result records may name: Prefect picks the decoder from the record itself, so a
# record naming pickle (or a JSON "object_decoder" of the writer's choosing) would run code on load.
_PLAIN_JSON = {"type": "json", "jsonlib": "json", "object_encoder": "prefect.serializers.prefect_json_object_encoder",
               "object_decoder": "prefect.serializers.prefect_json_object_decoder", "dumps_kwargs": {},
               "loads_kwargs": {}}
# Dataset shards are the bulk of a pool's bytes: a hit never reads them, and every read that uses them verifies.
UNCHECKED_KINDS = frozenset({"samples"})
_REF_KEYS = {"uri", "sha256", "size", "kind"}
_MEMO_RUNS = 8
_verified: OrderedDict[str, set[tuple[str, str, str, int]]] = OrderedDict()
_verified_lock = threading.Lock()
_logger = logging.getLogger("skmm.cache")


class CachedResultRefused(ValueError):
    """A cached result record that must not be used (Prefect treats it as a cache miss and runs the task)."""


def plain_json_record(content: bytes, path: str) -> dict[str, Any]:
    """The parsed record if ``content`` is a Prefect result record serialized as plain JSON; else
    :class:`CachedResultRefused`."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
    except (ValueError, TypeError, KeyError):
        raise CachedResultRefused(f"cached result {path} is not a JSON result record; refusing to load it") from None
    if serializer != _PLAIN_JSON:
        kind = serializer.get("type") if isinstance(serializer, dict) else type(serializer).__name__
        raise CachedResultRefused(f"cached result {path} names serializer {kind!r} with non-default settings or "
                                  "another type; refusing to load it (only plain JSON is read from a store)")
    return record


def artifact_refs(value: Any) -> list[ArtifactRef]:
    """Every artifact ref (a dict of exactly uri, sha256, size, kind) inside ``value`` (dicts, lists)."""
    found: dict[str, ArtifactRef] = {}
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if set(item) == _REF_KEYS:
                ref = ArtifactRef.from_dict(item)
                found.setdefault(ref.uri, ref)
            else:
                todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return list(found.values())


def _run_key() -> str:
    """The flow run (else task run) being served, so artifacts are verified once per run: a process that runs
    several flows checks again in each (an object may have been damaged in between)."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx = TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run is not None:
        return str(task_ctx.task_run.flow_run_id or task_ctx.task_run.id)
    flow_ctx = FlowRunContext.get()
    return str(flow_ctx.flow_run.id) if flow_ctx is not None and flow_ctx.flow_run is not None else "-"


def verify_once(store: ArtifactStore, ref: ArtifactRef) -> None:
    """Raise (ArtifactNotFoundError, ArtifactCorruptedError, StoreUnavailableError) unless ``ref``'s object is in
    ``store`` with its size and sha256; each (store, object) is checked at most once per run, and hashed only when
    this machine has not hashed it already in the state the store reports for it now (its stat, or its ETag:
    :mod:`storage.verify_memo`)."""
    if ref.kind in UNCHECKED_KINDS:
        return
    run, key = _run_key(), (store.url, ref.uri, ref.sha256, ref.size)
    with _verified_lock:
        if key in _verified.get(run, ()):
            return
    verify_remembered(store, ref)
    with _verified_lock:
        _verified.setdefault(run, set()).add(key)
        _verified.move_to_end(run)
        while len(_verified) > _MEMO_RUNS:
            _verified.popitem(last=False)


def accept_cached(content: bytes, path: str, store: ArtifactStore) -> bytes:
    """``content`` if it may serve as a cache hit, else :class:`CachedResultRefused` (a miss: the task runs again
    and rewrites the record).

    A record is accepted only if it is plain JSON (never a pickle: that would run the writer's code) and every
    artifact it names, and every artifact the task's inputs name, is still in ``store`` with its size and sha256
    (a cache hit must not hide a deleted or damaged model, selection, manifest, feature or sketch table).
    Dataset shards (kind ``samples``) are not hashed: they are the bulk of a pool (hashing them on every rerun
    would cost more than the stages the cache saves), a hit never reads them, and every read that does verifies
    them. Each object is checked once per run, and hashed only when this machine has not hashed it before in the
    state the store reports now (:mod:`storage.verify_memo`): at 10^7 samples the kept runs' feature and sketch
    tables (~30 GB) are hashed once, not every night.
    """
    try:
        record = plain_json_record(content, path)
        result = record.get("result")
        refs = artifact_refs(json.loads(result) if isinstance(result, str) else result)
        refs += [r for r in artifact_refs(_task_inputs()) if r.uri not in {x.uri for x in refs}]
        for ref in refs:
            verify_once(store, ref)
    except CachedResultRefused as exc:
        reason = str(exc)
    except (StorageError, ValueError) as exc:
        reason = f"cached result {path} not used: {exc}"
    else:
        return content
    _warn(f"{reason}; the task runs again")
    raise CachedResultRefused(reason)


def _task_inputs() -> dict[str, Any]:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return dict(ctx.parameters or {}) if ctx is not None else {}


def _warn(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        _logger.warning(message)


class JsonResultsFileSystem(RemoteFileSystem):
    """A RemoteFileSystem (an object store's ``prefect-results`` folder) that hands Prefect only trusted records
    (see :func:`accept_cached`), with the store's timeouts.

    Anyone who can write a shared bucket could otherwise plant a record naming the pickle serializer under a
    cache key and run code on every machine that hits it (Prefect deserializes even to check that a key
    exists). A refused record reads as a cache miss: the task runs again and writes a clean record."""

    _block_type_name = "skmm JSON Results"

    @property
    def filesystem(self) -> Any:
        from tasks.store import StoreTimeouts, bound_s3fs_retries

        if not self._filesystem:
            scheme = urllib.parse.urlsplit(self.basepath).scheme
            extra = StoreTimeouts.from_env().s3_options() if scheme in ("s3", "s3a") else {}
            self._filesystem = fsspec.filesystem(scheme, **self.settings, **extra)
        return bound_s3fs_retries(self._filesystem)  # again after unpickling (e.g. on a Dask worker)

    def artifact_store(self) -> ArtifactStore:
        """The store whose results folder this is."""
        from tasks.store import RESULTS_FOLDER, open_store, store_spec

        return open_store(store_spec(self.basepath.rstrip("/").removesuffix("/" + RESULTS_FOLDER),
                                     self.settings.get("endpoint_url")))

    async def aread_path(self, path: str) -> bytes:
        content = await super().aread_path(path)
        return await asyncio.to_thread(accept_cached, content, path, self.artifact_store())

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        with self.filesystem.open(resolved, "rb") as file:
            return accept_cached(file.read(), path, self.artifact_store())


class JsonLocalResultsFileSystem(LocalFileSystem):
    """A local store's ``prefect-results`` folder, with the same guard as :class:`JsonResultsFileSystem`: a store
    on a shared disk is as exposed as a bucket. Records are written atomically (temporary file + rename)."""

    _block_type_name = "skmm JSON Local Results"

    def artifact_store(self) -> ArtifactStore:
        """The store whose results folder this is."""
        from tasks.store import open_store, store_spec

        return open_store(store_spec(pathlib.Path(self.basepath).parent))

    def _read_record(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        if not resolved.is_file():
            raise ValueError(f"Path {resolved} does not exist or is not a file.")
        return accept_cached(resolved.read_bytes(), path, self.artifact_store())

    def _write_record(self, path: str, content: bytes) -> str:
        resolved = self._resolve_path(path)
        write_local_atomically(resolved, content)
        return str(resolved)

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self._read_record, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read_record(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self._write_record, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._write_record(path, content)
