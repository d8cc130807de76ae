"""Content-addressed, immutable artifacts on any fsspec filesystem (local folder by default, s3://, memory://).

An artifact is identified by a small :class:`ArtifactRef` — (uri, sha256, size, kind) — which is all that
tasks pass around. Objects live at ``<root>/objects/<kind>/<sha256><suffix>``:

- **writes** are staged (a hidden file ``.<uuid>-…`` in ``<root>/tmp`` on a local disk, in this user's
  ``<system temp>/skmm-staging-<uid>`` for remote stores), hashed while written, then published in one step
  (``os.replace`` locally, a single PUT or completed multipart upload on S3), so a reader never sees a partial
  object and a killed writer leaves none; what a killed writer leaves in staging is removed by
  :meth:`ArtifactStore.clean_staging` once it is older than a safe age (24 h by default);
- **nothing is overwritten**: publishing bytes that already exist is a no-op (same address, same content);
- **reads verify** the sha256 and size and fail loudly, naming the artifact, on mismatch or absence.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import pathlib
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import (
    ArtifactCorruptedError,
    ArtifactNotFoundError,
    MalformedRecordError,
    StorageError,
    StoreUnavailableError,
    redact,
)

_log = logging.getLogger(__name__)

__all__ = ["STAGING_MAX_AGE_S", "ArtifactRef", "ArtifactStore", "StagingEntry", "sha256_bytes", "sha256_file",
           "staging_max_age_s", "write_local_atomically"]

_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,16}){0,2}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 4 * 2**20
# Staging: every temporary file or folder this module creates is named ".<uuid4 hex>-..." (see _staging_name).
_STAGED = re.compile(r"^\.[0-9a-f]{32}-")
STAGING_MAX_AGE_S = 24 * 3600.0  # staging debris younger than this may belong to a live writer: never removed
STAGING_AGE_ENV = "SKMM_STAGING_MAX_AGE_HOURS"


def staging_max_age_s() -> float:
    """The age (seconds) above which staging leftovers are removed at the start of a run: 24 h, or
    ``$SKMM_STAGING_MAX_AGE_HOURS``."""
    text = os.environ.get(STAGING_AGE_ENV, "").strip()
    if not text:
        return STAGING_MAX_AGE_S
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours > 0 or hours == float("inf"):
        raise ValueError(f"{STAGING_AGE_ENV} must be a positive number of hours; got {text!r}")
    return hours * 3600.0


def _staging_name() -> str:
    return f".{uuid.uuid4().hex}-"


def _remote_staging_dir() -> str | None:
    """This user's private staging folder in the system temp dir (created 0700), or None if it cannot be
    trusted (not a real folder of ours: then staging falls back to the temp dir itself and is never cleaned)."""
    path = os.path.join(tempfile.gettempdir(), f"skmm-staging-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() else None


@dataclass(frozen=True)
class StagingEntry:
    """A staging leftover: its local path, size in bytes (a folder: its files') and age in seconds."""

    path: str
    size: int
    age_s: float


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex, size) of a local file, read in 4 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def write_local_atomically(target: pathlib.Path, content: bytes) -> None:
    """Write a local file whole or not at all: a temporary file beside it (its parents created), renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ArtifactRef:
    """What tasks exchange instead of data: where the object is, what it hashes to, its size and kind."""

    uri: str
    sha256: str
    size: int
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ArtifactRef:
        """Parse and validate a ref (e.g. from a lineage record); raises MalformedRecordError."""
        if not isinstance(data, dict) or set(data) != {"uri", "sha256", "size", "kind"}:
            raise MalformedRecordError(f"an artifact ref needs exactly uri, sha256, size, kind; got {data!r:.200}")
        uri, sha, size, kind = data["uri"], data["sha256"], data["size"], data["kind"]
        if not isinstance(uri, str) or not uri:
            raise MalformedRecordError(f"artifact ref has a bad uri: {uri!r:.200}")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise MalformedRecordError(f"artifact ref {uri} has a bad sha256: {sha!r:.80}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MalformedRecordError(f"artifact ref {uri} has a bad size: {size!r:.40}")
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise MalformedRecordError(f"artifact ref {uri} has a bad kind: {kind!r:.80}")
        return cls(uri, sha, size, kind)


def _translate(exc: BaseException, what: str) -> StorageError:
    """Map filesystem/botocore errors to our one-line errors."""
    if isinstance(exc, StorageError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        return StoreUnavailableError(f"bucket does not exist for {what}")
    if isinstance(exc, FileNotFoundError):
        return ArtifactNotFoundError(f"not found: {what}")
    if isinstance(exc, PermissionError):
        return StoreUnavailableError(f"access denied to {what}")
    lowered = text.lower()
    if any(s in lowered for s in ("connect", "timeout", "timed out", "endpoint", "name or service")):
        return StoreUnavailableError(f"cannot reach the store for {what} ({type(exc).__name__})", transient=True)
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return StoreUnavailableError(f"bucket does not exist for {what}")
    return StorageError(f"storage error on {what}: {type(exc).__name__}")


class ArtifactStore:
    """A content-addressed artifact store rooted at an fsspec URL.

    ``url``: a local path or ``file://`` URL (default ``./skmm-store``), ``s3://bucket/prefix``,
    ``memory://name``, or anything fsspec speaks; ``storage_options`` go to the filesystem (e.g.
    ``endpoint_url``, ``key``, ``secret`` for S3) and are never logged.
    """

    def __init__(self, url: str | os.PathLike = "./skmm-store", storage_options: dict[str, Any] | None = None):
        text = os.fspath(url)
        if "://" not in text or text.startswith("file://"):
            local = text[len("file://"):] if text.startswith("file://") else text
            text = "file://" + str(pathlib.Path(local).expanduser().resolve())
        self.url = text.rstrip("/")
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreUnavailableError(f"cannot open store {self.url}: {exc}") from None
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._scheme = self.url.split("://", 1)[0]

    # ------------------------------------------------------------------ addressing
    def __repr__(self) -> str:
        return f"ArtifactStore({redact(self.url)!r})"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def uri(self, rel: str) -> str:
        """The full URL of a path relative to the store root."""
        return f"{self._scheme}://{self._path(rel)}" if self._scheme != "file" else f"file://{self._path(rel)}"

    def _rel_from_uri(self, uri: str) -> str:
        prefix = self.uri("")
        if not uri.startswith(prefix):
            raise ArtifactNotFoundError(f"artifact {uri} is not in store {self.url}")
        return uri[len(prefix):]

    @staticmethod
    def _check_kind(kind: str, suffix: str) -> None:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"artifact kind must match {_KIND.pattern}; got {kind!r}")
        if not _SUFFIX.match(suffix):
            raise ValueError(f"artifact suffix must look like '.parquet' or '.tar.gz'; got {suffix!r}")

    # ------------------------------------------------------------------ writing
    def check(self, create: bool = True) -> None:
        """Fail fast with StoreUnavailableError if the store cannot be reached (bucket missing, endpoint down).

        A local root is created unless ``create`` is False (a reader: a missing folder simply holds nothing)."""
        try:
            if self.is_local:
                if create:
                    os.makedirs(self.root, exist_ok=True)
            else:
                self.fs.ls(self.root.split("/", 1)[0], detail=False)
        except Exception as exc:
            raise _translate(exc, self.url) from None

    # ------------------------------------------------------------------ staging
    def staging_dir(self) -> str | None:
        """Where writes are staged: ``<root>/tmp`` for a local store (same filesystem, so publishing is a
        rename), this user's ``<system temp>/skmm-staging-<uid>`` for remote ones (None: the temp dir itself)."""
        return self._path("tmp") if self.is_local else _remote_staging_dir()

    def _staging(self) -> str | None:
        """The staging folder, created if needed."""
        folder = self.staging_dir()
        if self.is_local:
            os.makedirs(folder, exist_ok=True)
        return folder

    def clean_staging(self, older_than_s: float | None = None, dry_run: bool = False) -> list[StagingEntry]:
        """Remove staging leftovers (files or folders named ``.<uuid>-…``, left by killed writers and readers)
        last modified more than ``older_than_s`` seconds ago (None: :func:`staging_max_age_s`, 24 h unless
        ``$SKMM_STAGING_MAX_AGE_HOURS`` says otherwise); younger ones may be in use and are kept. Only the
        staging folder is looked at, so nothing published (nothing a ref or record can name) is ever touched.
        A remote store's staging folder is this machine's and user's, shared by every remote store they use.
        Returns what was (``dry_run``: would be) removed."""
        if older_than_s is None:
            older_than_s = staging_max_age_s()
        if isinstance(older_than_s, bool) or not isinstance(older_than_s, int | float) or not older_than_s >= 0:
            raise ValueError(f"older_than_s must be a non-negative number of seconds; got {older_than_s!r}")
        folder = self.staging_dir()
        if folder is None or not os.path.isdir(folder):
            return []
        now, removed = time.time(), []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    found = self._stale(entry, now, older_than_s)
                    if found is not None and (dry_run or _remove(entry)):
                        removed.append(found)
        except OSError as exc:
            raise StorageError(f"cannot clean the staging folder {folder}: {type(exc).__name__}: "
                               f"{exc.strerror or exc}") from None
        return removed

    @staticmethod
    def _stale(entry: os.DirEntry, now: float, older_than_s: float) -> StagingEntry | None:
        if not _STAGED.match(entry.name) or entry.is_symlink():
            return None
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed meanwhile (its writer finished, or another cleaner)
            return None
        size, newest = info.st_size, info.st_mtime
        if entry.is_dir(follow_symlinks=False):  # a reader's folder: as young as the newest file in it
            size, newest = _tree_stats(entry.path, newest)
        age = now - newest
        if age <= older_than_s:  # a future mtime (clock skew) is young too
            return None
        return StagingEntry(entry.path, size, age)

    @contextlib.contextmanager
    def writer(self, kind: str, suffix: str = "") -> Iterator[IO[bytes]]:
        """Write an artifact through a file object; it is published when the block exits cleanly.

        On any exception the staged bytes are deleted and nothing becomes visible. The ref is available as
        ``handle.ref`` after the block.
        """
        self._check_kind(kind, suffix)
        fd, tmp = tempfile.mkstemp(prefix=_staging_name(), dir=self._staging())
        handle = _HashingWriter(os.fdopen(fd, "wb"))
        try:
            yield handle
            handle.close()
            handle.ref = self._publish(tmp, handle.sha256, handle.size, kind, suffix)
        finally:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_bytes(self, data: bytes, kind: str, suffix: str = "") -> ArtifactRef:
        """Store ``data``; returns its ref (the same ref for the same bytes, kind and suffix)."""
        with self.writer(kind, suffix) as fh:
            fh.write(data)
        return fh.ref

    def put_file(self, path: str | os.PathLike, kind: str, suffix: str = "") -> ArtifactRef:
        """Store a local file's bytes (streamed, never loaded whole)."""
        with self.writer(kind, suffix) as out, open(path, "rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        return out.ref

    def _publish(self, tmp: str, sha: str, size: int, kind: str, suffix: str) -> ArtifactRef:
        rel = f"objects/{kind}/{sha}{suffix}"
        ref = ArtifactRef(self.uri(rel), sha, size, kind)
        target = self._path(rel)
        try:
            if self.fs.exists(target):
                existing = self.fs.size(target)
                if existing == size:
                    return ref  # same address, same bytes: immutable, nothing to do
                # the name is the sha256 of `size` bytes, so that copy is damaged (truncated, say); the bytes in
                # hand hash to the name: they repair it (atomically, as any publish)
                _log.warning("artifact %s had %d bytes instead of %d (damaged): replaced by a good copy", ref.uri,
                             existing, size)
            if self.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)  # atomic on one filesystem
            else:
                self.fs.put_file(tmp, target)  # one PUT (or one completed multipart upload): atomic on S3
                self.fs.invalidate_cache(os.path.dirname(target))
        except Exception as exc:
            raise _translate(exc, ref.uri) from None
        return ref

    def put_immutable(self, rel: str, data: bytes) -> str:
        """Write ``data`` at a fixed relative path that must not exist yet (e.g. a lineage event); return its URI."""
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"bad relative path {rel!r}")
        target = self._path(rel)
        uri = self.uri(rel)
        try:
            if self.fs.exists(target):
                raise StorageError(f"refusing to overwrite {uri}")
            if self.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=_staging_name(), dir=self._staging())
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.link(tmp, target)  # fails if target appeared meanwhile: never overwrites
                finally:
                    os.unlink(tmp)
            else:
                self.fs.pipe_file(target, data)
        except FileExistsError:
            raise StorageError(f"refusing to overwrite {uri}") from None
        except Exception as exc:
            raise _translate(exc, uri) from None
        return uri

    # ------------------------------------------------------------------ reading
    def get_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's bytes, verified against its sha256 and size."""
        try:
            data = self.fs.cat_file(self._path(self._rel_from_uri(ref.uri)))
        except Exception as exc:
            raise _translate(exc, f"artifact {ref.uri}") from None
        self._verify(ref, hashlib.sha256(data).hexdigest(), len(data))
        return data

    @contextlib.contextmanager
    def local_path(self, ref: ArtifactRef) -> Iterator[pathlib.Path]:
        """A verified local file holding the artifact (the object itself on a local store, else a temp copy)."""
        target = self._path(self._rel_from_uri(ref.uri))
        if self.is_local:
            if not os.path.exists(target):
                raise ArtifactNotFoundError(f"not found: artifact {ref.uri}")
            self._verify(ref, *sha256_file(target))
            yield pathlib.Path(target)
            return
        with tempfile.TemporaryDirectory(prefix=_staging_name(), dir=self._staging()) as tmpdir:
            local = os.path.join(tmpdir, os.path.basename(target))
            try:
                self.fs.get_file(target, local)
            except Exception as exc:
                raise _translate(exc, f"artifact {ref.uri}") from None
            self._verify(ref, *sha256_file(local))
            yield pathlib.Path(local)

    def verify(self, ref: ArtifactRef) -> None:
        """Raise unless the artifact exists and hashes to its ref."""
        with self.local_path(ref):
            pass

    def exists(self, ref: ArtifactRef) -> bool:
        try:
            return bool(self.fs.exists(self._path(self._rel_from_uri(ref.uri))))
        except ArtifactNotFoundError:
            return False
        except Exception as exc:
            raise _translate(exc, f"artifact {ref.uri}") from None

    def list_paths(self, rel_prefix: str, pattern: str = "**") -> list[str]:
        """Relative paths under ``rel_prefix`` (fresh listing: caches are invalidated first)."""
        try:
            self.fs.invalidate_cache()
            base = self._path(rel_prefix.rstrip("/"))
            if not self.fs.exists(base):
                return []
            found = self.fs.glob(f"{base}/{pattern}")
        except Exception as exc:
            raise _translate(exc, self.uri(rel_prefix)) from None
        start = len(self.root) + 1
        return sorted(p[start:] for p in found if not os.path.basename(p).startswith(".")
                      and not self.fs.isdir(p))

    def read_rel(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(rel))
        except Exception as exc:
            raise _translate(exc, self.uri(rel)) from None

    def remove_rel(self, rel: str) -> bool:
        """Delete a file at a relative path written by :meth:`put_immutable` (a superseded record, never an
        artifact a ref names); False if it was already gone."""
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"bad relative path {rel!r}")
        try:
            self.fs.rm_file(self._path(rel))
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise _translate(exc, self.uri(rel)) from None
        return True

    def read_many(self, rels: Sequence[str], max_workers: int = 16) -> dict[str, bytes | StorageError]:
        """The bytes of many small objects (e.g. lineage events) by path relative to the root, with at most
        ``max_workers`` reads in flight. Unverified (such records carry no ref; see :meth:`local_copies` for
        artifacts). A failed read maps to its StorageError instead of raising, so one bad object never hides
        the others; an unreachable store raises StoreUnavailableError."""
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1; got {max_workers!r}")

        def read(rel: str) -> bytes | StorageError:
            try:
                return self.read_rel(rel)
            except StoreUnavailableError:
                raise
            except StorageError as exc:
                return exc

        unique = list(dict.fromkeys(rels))
        with concurrent.futures.ThreadPoolExecutor(min(max_workers, max(1, len(unique)))) as pool:
            return dict(zip(unique, pool.map(read, unique), strict=True))

    def local_copies(self, refs: Sequence[ArtifactRef], folder: str | os.PathLike, max_workers: int = 8,
                     ) -> dict[str, pathlib.Path | StorageError]:
        """uri → a local file holding each ref's verified bytes (the object itself in a local store, else one
        download into ``folder``, which the caller owns and removes), with at most ``max_workers`` transfers in
        flight. A missing or corrupt artifact maps to its ArtifactNotFoundError / ArtifactCorruptedError; an
        unreachable store raises StoreUnavailableError."""
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1; got {max_workers!r}")

        def copy(ref: ArtifactRef) -> pathlib.Path | StorageError:
            try:
                target = self._path(self._rel_from_uri(ref.uri))
                if self.is_local:
                    local = target
                else:
                    local = os.path.join(folder, f"{ref.sha256}-{os.path.basename(target)}")
                    try:
                        self.fs.get_file(target, local)
                    except Exception as exc:
                        raise _translate(exc, f"artifact {ref.uri}") from None
                try:
                    self._verify(ref, *sha256_file(local))
                except FileNotFoundError:
                    raise ArtifactNotFoundError(f"not found: artifact {ref.uri}") from None
                return pathlib.Path(local)
            except StoreUnavailableError:
                raise
            except StorageError as exc:
                return exc

        unique = list({r.uri: r for r in refs}.values())
        with concurrent.futures.ThreadPoolExecutor(min(max_workers, max(1, len(unique)))) as pool:
            return dict(zip((r.uri for r in unique), pool.map(copy, unique), strict=True))

    @staticmethod
    def _verify(ref: ArtifactRef, sha: str, size: int) -> None:
        if size != ref.size or sha != ref.sha256:
            raise ArtifactCorruptedError(f"artifact {ref.uri} is corrupted: expected sha256 {ref.sha256[:12]}… "
                                         f"({ref.size} bytes), found {sha[:12]}… ({size} bytes)")


def _tree_stats(path: str, newest: float) -> tuple[int, float]:
    """(total size of the files under ``path``, the newest mtime among them and ``newest``)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                total += info.st_size
                newest = max(newest, info.st_mtime)
    return total, newest


def _remove(entry: os.DirEntry) -> bool:
    """Delete a staging file or folder; False if it was already gone."""
    try:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    except FileNotFoundError:
        return False
    return True


class _HashingWriter:
    """A write-only binary file that hashes what passes through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self.size = 0
        self.ref: ArtifactRef | None = None

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    @property
    def closed(self) -> bool:
        return self._fh.closed

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()
