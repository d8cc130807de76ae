"""Reading a pool's files: a bounded, ordered thread pool, and remote objects with an anonymous fallback.

- :func:`ordered_map` runs a read (and its hash and decode check) on a few threads but never holds more than
  ``window`` items in flight, and yields results in input order, so which duplicate counts as "first" never
  depends on thread timing, and memory holds O(workers) images whatever the pool's size.
- :class:`SourceFiles` reads local paths and fsspec URLs, each file or object in one request. Credentials come
  from the environment (or ``storage_options``); an ``s3://`` source with none there is retried anonymously, so
  a public bucket works, and a private one fails with :class:`CredentialsMissingError` — one line naming what to
  set — instead of botocore's "Unable to locate credentials". An S3-compatible endpoint for sources is set the
  standard way, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), or ``endpoint_url`` in ``storage_options``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Generic, TypeVar

import fsspec

__all__ = ["READ_WORKERS", "CredentialsMissingError", "SourceFiles", "ordered_map"]

READ_WORKERS = 8  # reads in flight: enough to hide object-store latency, small enough to bound memory

T = TypeVar("T")
R = TypeVar("R")

_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")
_ANONYMOUS_OK = ("s3", "s3a")


class _Ready(Generic[R]):
    """A result computed in the caller's thread, queued among the futures (same ``result``/``cancel``)."""

    __slots__ = ("value",)

    def __init__(self, value: R) -> None:
        self.value = value

    def result(self) -> R:
        return self.value

    def cancel(self) -> bool:
        return False


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = READ_WORKERS,
                window: int | None = None, inline: Callable[[T], bool] | None = None) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads with at most ``window`` (default 2·workers) items in flight.

    ``items`` is consumed lazily in the caller's thread (so it may stream a tar or a manifest), and results come
    back in input order. Items for which ``inline(item)`` is true are computed in the caller's thread at once
    (work too small for a thread hand-off, which costs ~19 µs an item: more than a reused sample needs). If the
    caller stops early (an error), pending work is cancelled and the threads are joined before the exception goes
    on.
    """
    window = max(1, window or 2 * workers)
    pending: deque[Future[R] | _Ready[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skmm-ingest-read") as pool:
        try:
            for item in items:
                pending.append(_Ready(fn(item)) if inline is not None and inline(item) else pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class CredentialsMissingError(PermissionError):
    """A private object in a bucket, and no credentials in the environment to read it with."""


def _is_missing_credentials(exc: BaseException) -> bool:
    return any(cls.__name__ in _NO_CREDENTIALS for cls in type(exc).__mro__)


class SourceFiles:
    """Local and remote reads for one ingest (or one fingerprint): one filesystem per protocol, created without
    fsspec's instance cache (a cached instance would keep the credentials of whoever created it first)."""

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        self._options = dict(storage_options or {})
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._anonymous: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _protocol(url: str) -> str:
        return url.split("://", 1)[0].lower()

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = self._protocol(url)
        with self._lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                options = {**self._options, **({"anon": True} if protocol in self._anonymous else {})}
                fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
                self._filesystems[protocol] = fs
        return fs, fs._strip_protocol(url)

    def _go_anonymous(self, protocol: str) -> bool:
        """Switch ``protocol`` to anonymous access once; False if that cannot help."""
        if protocol not in _ANONYMOUS_OK or "anon" in self._options:
            return False
        with self._lock:
            if protocol not in self._anonymous:
                self._anonymous.add(protocol)
                self._filesystems.pop(protocol, None)
        return True

    def _call(self, url: str, op: Callable[[fsspec.AbstractFileSystem, str], R]) -> R:
        protocol = self._protocol(url)
        fs, path = self._fs(url)
        try:
            return op(fs, path)
        except Exception as exc:
            if not _is_missing_credentials(exc) or not self._go_anonymous(protocol):
                raise
        fs, path = self._fs(url)
        try:
            return op(fs, path)
        except PermissionError:
            raise CredentialsMissingError(
                f"no credentials for {protocol}:// in the environment (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), and it is not publicly readable") from None

    def cat(self, url: str) -> bytes:
        """All bytes of a local file or remote object (one request)."""
        if "://" not in url:
            with open(url, "rb") as fh:
                return fh.read()
        return self._call(url, lambda fs, path: fs.cat_file(path))

    def info(self, url: str) -> dict[str, Any]:
        """fsspec's ``info`` of a remote object (size, ETag, version id, ... as the backend gives them)."""
        return self._call(url, lambda fs, path: fs.info(path))

    def ls(self, url: str) -> list[dict[str, Any]]:
        """fsspec's detailed listing of a remote folder (prefix)."""
        return self._call(url, lambda fs, path: fs.ls(path, detail=True))

    def glob(self, url: str) -> list[str]:
        """Remote URLs matching a glob pattern, sorted."""
        protocol = self._protocol(url)
        return sorted(f"{protocol}://{p}" for p in self._call(url, lambda fs, path: fs.glob(path)))

    def open(self, url: str, block_size: int = 8 * 2**20) -> IO[bytes]:
        """A sequential binary reader (remote: read ahead in ``block_size`` blocks, never the whole object)."""
        if "://" not in url:
            return open(url, "rb")
        return self._call(url, lambda fs, path: fs.open(path, "rb", block_size=block_size,
                                                        cache_type="readahead"))
