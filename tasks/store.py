"""Which store a run uses, passed between tasks as a small JSON-able spec (never credentials), and the one place
that opens it: flows, tasks and the ``skmm lineage`` commands all call :func:`open_store`.

Credentials for S3 come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile),
so they never enter Prefect parameters, task inputs, cache keys, logs or lineage records.

An S3 store answers within bounded time: every request has a connect and a read timeout (also while it sends a
body, which aiohttp leaves unbounded) and at most ``SKMM_STORE_ATTEMPTS`` attempts; s3fs adds no retry loop of
its own. A frozen endpoint therefore fails a request within :func:`StoreTimeouts.request_bound_s` seconds, with
a one-line :class:`~storage.errors.StoreUnavailableError` naming the endpoint. Environment variables (read when
a store is opened): ``SKMM_STORE_CONNECT_TIMEOUT`` (seconds, default 3), ``SKMM_STORE_READ_TIMEOUT`` (seconds
without progress, default 8), ``SKMM_STORE_ATTEMPTS`` (attempts per request, default 2).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from storage.artifacts import ArtifactStore
from storage.errors import StoreUnavailableError

if TYPE_CHECKING:
    from prefect.filesystems import WritableFileSystem

__all__ = ["DEFAULT_STORE", "RESULTS_FOLDER", "StoreTimeouts", "open_store", "result_storage", "store_spec"]

DEFAULT_STORE = "./skmm-store"
RESULTS_FOLDER = "prefect-results"
_S3_SCHEMES = ("s3", "s3a")


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


# ---------------------------------------------------------------------------------------------- timeouts
@dataclass(frozen=True)
class StoreTimeouts:
    """Connect / read timeouts (seconds) and attempts per request for object stores."""

    connect_s: float = 3.0
    read_s: float = 8.0
    attempts: int = 2

    ENV: ClassVar[dict[str, str]] = {"connect_s": "SKMM_STORE_CONNECT_TIMEOUT",
                                     "read_s": "SKMM_STORE_READ_TIMEOUT", "attempts": "SKMM_STORE_ATTEMPTS"}

    @classmethod
    def from_env(cls) -> StoreTimeouts:
        """The defaults, overridden by ``SKMM_STORE_CONNECT_TIMEOUT`` / ``_READ_TIMEOUT`` / ``_ATTEMPTS``."""
        values: dict[str, Any] = {}
        for field, var in cls.ENV.items():
            text = os.environ.get(var, "").strip()
            if not text:
                continue
            try:
                value = int(text) if field == "attempts" else float(text)
            except ValueError:
                value = 0
            if not 0 < value < float("inf"):
                kind = "a positive whole number of attempts" if field == "attempts" else "a positive number of seconds"
                raise ValueError(f"{var} must be {kind}; got {text!r}")
            values[field] = value
        return cls(**values)

    def request_bound_s(self) -> float:
        """Worst case before one store request fails against a frozen endpoint: every attempt may spend its
        connect and its read timeout, plus botocore's backoff between attempts (at most 2**(i-1) s before the
        i-th retry, capped at 20 s)."""
        backoff = sum(min(2.0 ** (i - 1), 20.0) for i in range(1, self.attempts))
        return self.attempts * (self.connect_s + self.read_s) + backoff

    def s3_options(self) -> dict[str, Any]:
        """s3fs storage options that apply these limits (s3fs's own retry loop is switched off separately)."""
        return {"config_kwargs": {"connect_timeout": self.connect_s, "read_timeout": self.read_s,
                                  "retries": {"total_max_attempts": self.attempts, "mode": "standard"},
                                  "http_session_cls": _stall_guard_session()}}


def bound_s3fs_retries(fs: Any) -> Any:
    """Switch off s3fs's own retry loop (5 tries, on top of botocore's), so a request's attempts are botocore's
    alone and :meth:`StoreTimeouts.request_bound_s` holds. Returns ``fs``."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if set(_S3_SCHEMES) & set(protocols):
        fs.retries = 1
    return fs


@functools.cache
def _stall_guard_session() -> type:
    """aiobotocore's HTTP session, with a time limit on sending the request body.

    aiohttp starts its read timeout only once the body is sent, and sets none while it sends it or waits for
    '100 Continue' (botocore asks for that on every PUT): a frozen endpoint hangs uploads forever. Here a body
    that makes no progress for connect + read timeout seconds fails as botocore's ReadTimeoutError, which
    botocore retries like any read timeout."""
    import asyncio
    import inspect

    from aiobotocore.httpsession import AIOHTTPSession
    from botocore.exceptions import ReadTimeoutError

    chunk = 256 * 1024

    class StallGuardSession(AIOHTTPSession):
        async def send(self, request: Any) -> Any:
            body = request.body
            if body is None or (isinstance(body, bytes | bytearray | str) and not body):
                return await super().send(request)
            loop = asyncio.get_running_loop()
            stall_s = (self._timeout.sock_connect or 0) + (self._timeout.sock_read or 0)
            state = {"last": loop.time(), "done": False}

            async def chunks() -> Any:
                data = body.encode() if isinstance(body, str) else body
                if isinstance(data, bytes | bytearray | memoryview):
                    view = memoryview(data)
                    for start in range(0, len(view), chunk):
                        state["last"] = loop.time()
                        yield bytes(view[start:start + chunk])
                else:
                    while True:
                        state["last"] = loop.time()
                        piece = data.read(chunk)
                        if inspect.isawaitable(piece):
                            piece = await piece
                        if not piece:
                            break
                        yield piece
                state["done"] = True

            request.body = chunks()
            sending = asyncio.ensure_future(super().send(request))
            try:
                while True:
                    done, _ = await asyncio.wait({sending}, timeout=max(0.05, state["last"] + stall_s - loop.time()))
                    if done or state["done"]:  # once the body is out, aiohttp's read timeout applies
                        return await sending
                    if loop.time() - state["last"] >= stall_s:
                        sending.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await sending
                        raise ReadTimeoutError(endpoint_url=request.url,
                                               error=f"no upload progress for {stall_s:g} s")
            finally:
                request.body = body

    # picklable by reference (storage options travel with filesystems, e.g. to Dask workers): see __getattr__
    StallGuardSession.__module__, StallGuardSession.__qualname__ = __name__, "_StallGuardSession"
    return StallGuardSession


def __getattr__(name: str) -> Any:
    if name == "_StallGuardSession":  # built on first use: importing aiobotocore costs time the CLI need not pay
        return _stall_guard_session()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- opening
class _EndpointNamedStore(ArtifactStore):
    """An S3 ArtifactStore whose 'cannot reach' errors name the endpoint and say what to do."""

    def __init__(self, url: str, storage_options: dict[str, Any], endpoint: str, timeouts: StoreTimeouts) -> None:
        super().__init__(url, storage_options=storage_options)
        self.endpoint = endpoint
        self.timeouts = timeouts
        bound_s3fs_retries(self.fs)

    @contextlib.contextmanager
    def _naming(self) -> Iterator[None]:
        try:
            yield
        except StoreUnavailableError as exc:
            if f"endpoint {self.endpoint}" in str(exc):
                raise
            t = self.timeouts
            hint = (f"no answer within {t.connect_s:g} s connect + {t.read_s:g} s read, {t.attempts} attempt(s); "
                    "check that it is up, then rerun (limits: SKMM_STORE_CONNECT_TIMEOUT, SKMM_STORE_READ_TIMEOUT, "
                    "SKMM_STORE_ATTEMPTS)") if exc.transient else "check the bucket, credentials and endpoint"
            raise StoreUnavailableError(f"{exc} at endpoint {self.endpoint}: {hint}", transient=exc.transient) from None

    @contextlib.contextmanager
    def writer(self, kind: str, suffix: str = "") -> Iterator[Any]:
        with self._naming(), super().writer(kind, suffix) as handle:
            yield handle

    @contextlib.contextmanager
    def local_path(self, ref: Any) -> Iterator[pathlib.Path]:
        with self._naming(), super().local_path(ref) as path:
            yield path


def _named(method: Any) -> Any:
    @functools.wraps(method)
    def call(self: _EndpointNamedStore, *args: Any, **kwargs: Any) -> Any:
        with self._naming():
            return method(self, *args, **kwargs)
    return call


for _name in ("check", "put_bytes", "put_file", "put_immutable", "get_bytes", "verify", "exists", "list_paths",
              "read_rel"):
    setattr(_EndpointNamedStore, _name, _named(getattr(ArtifactStore, _name)))


def _endpoint_name(endpoint_url: str | None) -> str:
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "(AWS default S3 endpoint)")


def open_store(spec: dict[str, Any]) -> ArtifactStore:
    """The ArtifactStore a spec names; S3 stores get the :class:`StoreTimeouts` of the environment."""
    options: dict[str, Any] = {}
    if spec.get("endpoint_url"):
        options["endpoint_url"] = spec["endpoint_url"]
    if urllib.parse.urlsplit(spec["url"]).scheme not in _S3_SCHEMES:
        return ArtifactStore(spec["url"], storage_options=options)
    timeouts = StoreTimeouts.from_env()
    return _EndpointNamedStore(spec["url"], {**options, **timeouts.s3_options()}, _endpoint_name(
        spec.get("endpoint_url")), timeouts)


# ---------------------------------------------------------------------------------------------- cached results
def result_storage(spec: dict[str, Any]) -> WritableFileSystem:
    """What tasks get as Prefect ``result_storage``: a folder *inside the store* (``<store>/prefect-results``),
    so cached results (small JSON refs) live as long as the artifacts they point to, and every machine using the
    same store shares one cache.

    Local and remote stores alike give a block that hands Prefect only plain-JSON records whose artifacts are
    intact (:mod:`tasks.cache`), saved as a Prefect block (tasks refuse unsaved blocks) under a name derived from
    its settings, so every run reuses one block document. Its settings hold the results folder and the endpoint
    URL only: credentials stay in the environment, timeouts are applied when the block is used.
    """
    name, block = _results_block(spec)
    return _save_block(block, name)


def _results_block(spec: dict[str, Any]) -> tuple[str, WritableFileSystem]:
    """The (deterministic block name, unsaved block) for a store's results folder."""
    from tasks.cache import JsonLocalResultsFileSystem, JsonResultsFileSystem

    url = spec["url"]
    if url.startswith("file://"):
        basepath = str(pathlib.Path(url[len("file://"):]) / RESULTS_FOLDER)
        digest = hashlib.sha256(json.dumps(["local", basepath]).encode()).hexdigest()[:16]
        return f"skmm-local-results-{digest}", JsonLocalResultsFileSystem(basepath=basepath)
    settings = {"endpoint_url": spec["endpoint_url"]} if spec.get("endpoint_url") else {}
    basepath = url.rstrip("/") + "/" + RESULTS_FOLDER
    digest = hashlib.sha256(json.dumps([basepath, settings], sort_keys=True).encode()).hexdigest()[:16]
    return f"skmm-results-{digest}", JsonResultsFileSystem(basepath=basepath, settings=settings)


def _block_settings(block: Any) -> tuple[Any, Any]:
    return block.basepath, getattr(block, "settings", None)


def _save_block(block: WritableFileSystem, name: str, attempts: int = 3) -> WritableFileSystem:
    """The saved document ``name`` when it already holds ``block``'s settings, else save ``block`` as ``name``
    (overwrite: the name fixes the content). Processes racing to create the same
    name are safe: the loser of the create updates the winner's document with identical values; a document
    deleted between that process's lookup and update is retried."""
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:  # the common case, every run after the first: one read, no write
        saved = type(block).load(name)
        if _block_settings(saved) == _block_settings(block):
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
