"""Ingest ``folder/<label>/**/<image>`` from the local disk, streaming: every file is read once, on a bounded
thread pool, hashed and decode-checked there, and handed to the :class:`~storage.ingest.writer.DatasetWriter`
in listing order (:mod:`storage.ingest.listing`, the same listing the cache fingerprint walks)."""

from __future__ import annotations

import logging
import os
import pathlib

from storage.artifacts import ArtifactStore
from storage.datasets import sample_id
from storage.ingest.checked import CheckedImages
from storage.ingest.common import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SHARD_ROWS,
    IngestResult,
    check_common,
    decode_problem,
    one_line,
    raise_if_transient,
    shown_path,
)
from storage.ingest.listing import ListedFile, open_image_folder
from storage.ingest.reading import ordered_map
from storage.ingest.reuse import BaseSamples, SourceHashes, source_key, uri_path
from storage.ingest.writer import DatasetWriter

__all__ = ["ingest_image_folder", "read_and_check", "read_file_uri"]

log = logging.getLogger(__name__)

Checked = tuple[str | None, bytes | None, str | None]  # (sample id, bytes, quarantine reason)


def read_and_check(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, regular: bool = True,
                   checked: CheckedImages | None = None) -> tuple[str | None, bytes | None, str | None]:
    """(sample id, bytes, None) for a good image file, else (None, None, quarantine reason).

    ``checked``: the store's record of images that already passed the check (their bytes are not decoded again)."""
    if not regular:
        return None, None, ("missing file (a broken link)" if not os.path.exists(path)
                            else "not a regular file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, None, "missing file"
    except OSError as exc:
        raise_if_transient(exc, shown_path(path))
        return None, None, f"cannot read file: {one_line(exc)}"
    if checked is not None:
        sid, problem = checked.check(data)
        return (None, None, problem) if sid is None else (sid, data, None)
    problem = decode_problem(data, max_pixels)
    return (None, None, problem) if problem else (sample_id(data), data, None)


def read_file_uri(uri: str) -> bytes:
    """The bytes of a ``file://`` URI (a reused sample read from its source again)."""
    with open(uri_path(uri), "rb") as fh:
        return fh.read()


def ingest_image_folder(store: ArtifactStore, folder: str | os.PathLike, *, val_fraction: float = 0.15,
                        test_fraction: float = 0.15, seed: int = 0, shard_rows: int = DEFAULT_SHARD_ROWS,
                        max_pixels: int = DEFAULT_MAX_PIXELS, reuse: bool = True) -> IngestResult:
    """Ingest ``folder/<label>/**/<image>`` (a local folder) into a dataset on ``store``.

    Each first-level subfolder is a class (its name is the label); images are found recursively inside it by
    extension, following symbolic links (see :mod:`storage.ingest.listing` for every rule). Every image is read
    once and fully decoded with Pillow; empty, missing, unreadable, undecodable and oversized (more than
    ``max_pixels`` pixels) files are quarantined with the reason. A row keeps the raw file bytes in ``data``
    (sample id = their sha256, so renaming or moving a file changes nothing) and the absolute ``file://`` URI
    in ``source_uri`` (informational: not part of the dataset version). Splits: :func:`assign_split`. Images
    whose bytes passed the check in an earlier ingest into this store are not decoded again
    (:mod:`storage.ingest.checked`): a grown pool decodes only its new files. With ``reuse`` (the default), files
    unchanged since this store's last ingest of the folder (same path, size, mtime, ctime, inode) are not even
    read: their bytes come from that dataset's shards (:mod:`storage.ingest.reuse`); the dataset is the same
    either way, and ``n_reused`` in the result counts them.

    Raises SourceNotFoundError (folder missing) or SourceError (not a directory, empty, no class subfolders, a
    class name that is not UTF-8, the same image under two classes, fewer than 2 classes with usable images,
    fewer than 2 in train).
    """
    check_common(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, shard_rows=shard_rows,
                 max_pixels=max_pixels)
    pool = open_image_folder(folder)
    checked = CheckedImages(store, max_pixels)
    hashes = SourceHashes(store, {"kind": "image-folder", "root": str(pool.root)}, checked.policy) if reuse else None
    base = hashes.load() if hashes is not None else None

    def check(item: ListedFile) -> tuple[ListedFile, bytes | None, int | None, Checked]:
        key, size = source_key(item.path) if hashes is not None and item.is_regular() else (None, None)
        sid = hashes.reusable(key, item.path) if hashes is not None else None
        if sid is not None:
            return item, key, size, (sid, None, None)
        return item, key, None, read_and_check(item.path, max_pixels, item.is_regular(), checked)

    with DatasetWriter(store, source_name=f"image folder {shown_path(pool.root)}", shard_rows=shard_rows,
                       seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                       base=BaseSamples(store, base, read_file_uri, hashes.lost_shards) if base is not None
                       else None) as writer:
        for item, key, size, (sid, data, problem) in ordered_map(check, pool.files()):
            uri = pathlib.Path(item.path).as_uri()
            if sid is None or (data is None and size is None):
                writer.quarantine(uri, problem or "unreadable")
                continue
            writer.add(sid, uri, item.label, None, data, reused=size)
            if hashes is not None and key is not None:
                hashes.record(key, sid)
        if pool.n_ignored:
            log.info("image folder %s: ignored %d non-image file(s)", shown_path(pool.root), pool.n_ignored)
        if hashes is not None:
            hashes.release()
        result = writer.finish(source=pool.root.as_uri())
    checked.commit()  # only once the dataset is published
    if hashes is not None:
        hashes.commit(result.dataset, writer.new_rows)
    return result
