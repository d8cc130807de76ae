"""Cache fingerprints of sources from metadata, the way DVC detects changes: never a read of an image.

The ingest stage's cache key must change whenever the dataset it would write could change, and must cost
seconds on an unchanged pool of 10^5 files — so it is built from what the filesystem or object store already
knows about each file, never from the bytes:

- **image folder**: every file of the *same* listing the ingest walks (:mod:`storage.ingest.listing`: links
  followed, hidden names and non-image extensions skipped), as (path relative to the root, class, size,
  ``mtime_ns``, ``st_mode``). The root's own location is left out, and so are inode and device numbers: moving
  the folder, or copying it with its timestamps (``cp -a``, ``rsync -a``, ``shutil.copytree``), keeps the key; a
  copy with fresh timestamps re-ingests — to the same dataset, since sample ids are content hashes, so every
  later stage still hits its cache.
- **manifest**: the manifest's own sha256 (it is small next to the images; it holds the entries, labels and
  splits) plus, per listed entry in order, local ``(size, mtime_ns, st_mode)`` or a remote object's identity.
- **WebDataset shards**: per tar, its path relative to the shards' common folder and its identity.
- **embeddings table**: its identity (the table is the whole source).

A remote object's identity is its size plus the content tags the store gives (S3 ``ETag`` and ``VersionId``;
GCS ``generation``/``md5Hash``/``crc32c``; Azure ``etag``/``version_id``), else its modification time; an object
with none of these gets a random nonce, so it is never served from the cache (always re-ingested) rather than
served stale. Remote entries of a manifest cost one metadata request each (``info``, 16 in flight): for pools of
millions of objects, WebDataset shards (one request per tar) fingerprint far faster.

Caveat (DVC's too): a file rewritten in place with the same size *and* the same modification time — which needs
a tool that restores timestamps, or two writes within the filesystem's timestamp granularity — is not noticed.
Touch the file (or change the seed or the source path's contents otherwise) to force a re-ingest.

:func:`fingerprint` never raises: a source it cannot describe (missing, unreadable, no credentials) gets a
fingerprint with a nonce, and the ingest itself then reports the problem in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from storage.errors import redact
from storage.ingest.common import CONTENT_TAGS, SourceError, is_url, local_path, one_line
from storage.ingest.listing import open_image_folder
from storage.ingest.manifest import manifest_base, manifest_records, resolve_entry
from storage.ingest.reading import SourceFiles, ordered_map
from storage.ingest.webdataset import resolve_shards

__all__ = ["fingerprint", "folder_fingerprint", "manifest_fingerprint", "object_identity",
           "webdataset_fingerprint"]

log = logging.getLogger(__name__)

_CONTENT_TAGS = CONTENT_TAGS
_TIME_TAGS = ("LastModified", "last_modified", "mtime", "updated")
_INFO_WORKERS = 16


class _Listing:
    """A running sha256 over canonical JSON lines, and whether any line could not be identified."""

    def __init__(self, header: bytes) -> None:
        self._hash = hashlib.sha256(header)
        self.count = 0
        self.uncacheable = False

    def add(self, item: Any) -> None:
        self._hash.update(json.dumps(item, separators=(",", ":"), ensure_ascii=True, default=str).encode("ascii"))
        self._hash.update(b"\n")
        self.count += 1

    def result(self, **extra: Any) -> dict[str, Any]:
        out = {"n": self.count, "listing": self._hash.hexdigest(), **extra}
        if self.uncacheable:
            out["nonce"] = uuid.uuid4().hex
        return out


def _local_identity(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ["missing"]
    except OSError as exc:
        return ["unreadable", exc.errno]
    return [st.st_size, st.st_mtime_ns, st.st_mode]


def object_identity(info: Mapping[str, Any]) -> list[Any] | None:
    """A remote object's identity from fsspec ``info``: size + content tags, else size + modification time;
    None when the store gives neither (the object cannot be fingerprinted from metadata)."""
    tags = [[k, str(info[k])] for k in _CONTENT_TAGS if info.get(k) not in (None, "")]
    if not tags:
        tags = [[k, str(info[k])] for k in _TIME_TAGS if info.get(k) not in (None, "")]
    return [info.get("size"), *tags] if tags else None


def _identity(target: str, files: SourceFiles) -> tuple[list[Any], bool]:
    """(identity, identified?) of a local path or remote URL."""
    if not is_url(target):
        return _local_identity(os.path.expanduser(local_path(target))), True
    try:
        ident = object_identity(files.info(target))
    except FileNotFoundError:
        return ["missing"], True
    except Exception as exc:  # credentials, network: not identified, so never a cache hit
        return ["error", one_line(exc)], False
    return (ident, True) if ident is not None else (["unversioned"], False)


def folder_fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """(relative path, class, size, mtime_ns, st_mode) of every listed image file, hashed in listing order."""
    listing = _Listing(b"skmm-folder-listing/1\n")
    for item in open_image_folder(folder).files():
        try:
            st = item.stat()  # follows links, as the ingest's read does
            listing.add([item.rel, item.label, st.st_size, st.st_mtime_ns, st.st_mode])
        except OSError as exc:
            listing.add([item.rel, item.label, "unreadable", exc.errno])
    return listing.result()


def manifest_fingerprint(manifest: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                         storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's sha256 plus the identity of every entry it lists, in order (entries resolved exactly as
    the ingest resolves them)."""
    files = SourceFiles(storage_options)
    url = os.fspath(manifest)
    base = manifest_base(url, base_dir)
    digest = hashlib.sha256()
    listing = _Listing(b"skmm-manifest-files/1\n")
    with manifest_records(url, files, digest) as (columns, records):
        path_col = next((c for c in ("path", "url") if c in columns), None)

        def targets() -> Iterator[str]:
            for rec in records if path_col else ():
                raw = rec.get(path_col)
                yield resolve_entry(raw.strip(), base) if isinstance(raw, str) and raw.strip() else ""

        def identify(target: str) -> tuple[list[Any], bool]:
            return (["empty"], True) if not target else _identity(target, files)

        for ident, identified in ordered_map(identify, targets(), workers=_INFO_WORKERS, window=4 * _INFO_WORKERS):
            listing.add(ident)
            listing.uncacheable |= not identified
    return listing.result(sha256=digest.hexdigest())


def webdataset_fingerprint(shards: Any, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per tar shard (the same list the ingest reads): its path relative to the shards' common folder, and
    its identity."""
    files = SourceFiles(storage_options)
    tars = resolve_shards(shards, files)
    paths = [t.split("://", 1)[1] if is_url(t) else t for t in tars]
    common = posixpath.commonpath(paths) if all(is_url(t) for t in tars) else os.path.commonpath(paths)
    if len(tars) == 1:
        common = posixpath.dirname(paths[0]) if is_url(tars[0]) else os.path.dirname(paths[0])
    listing = _Listing(b"skmm-webdataset-shards/1\n")
    for tar, path, (ident, identified) in zip(tars, paths, ordered_map(lambda t: _identity(t, files), tars,
                                                                         workers=_INFO_WORKERS), strict=True):
        listing.add([posixpath.relpath(path, common) if is_url(tar) else os.path.relpath(path, common), ident])
        listing.uncacheable |= not identified
    return listing.result()


def fingerprint(kind: str, path: str | None, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata fingerprint of a source of ``kind`` (folder, manifest, webdataset, embeddings; digits has
    none). Never raises: what it cannot describe gets a nonce (never a cache hit), and the ingest reports it."""
    try:
        if kind == "folder":
            return folder_fingerprint(str(path))
        if kind == "manifest":
            return manifest_fingerprint(str(path), storage_options=storage_options)
        if kind == "webdataset":
            return webdataset_fingerprint(path, storage_options)
        if kind == "embeddings":
            ident, identified = _identity(str(path), SourceFiles(storage_options))
            return {"table": ident} if identified else {"table": ident, "nonce": uuid.uuid4().hex}
        return {}
    except SourceError as exc:  # the ingest raises the same error, in one line, and caches nothing
        return {"unusable": str(exc), "nonce": uuid.uuid4().hex}
    except Exception as exc:
        log.warning("cannot fingerprint %s source %s (%s); it will be ingested again", kind, redact(str(path)),
                    one_line(exc))
        return {"error": one_line(exc), "nonce": uuid.uuid4().hex}
