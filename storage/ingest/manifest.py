"""Ingest the images a manifest lists (CSV, TSV — optionally compressed — or Parquet; local path or fsspec URL).

Streaming: the manifest is read row by row (Parquet: batch by batch, only the columns used), each listed file
or object is read once, on a bounded thread pool (:func:`~storage.ingest.reading.ordered_map`; at most
2·workers files in flight), hashed and decode-checked there, and handed to the
:class:`~storage.ingest.writer.DatasetWriter` in manifest order. :func:`manifest_records` and
:func:`manifest_entries` are also what the cache fingerprint reads, so both resolve entries the same way.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pathlib
import posixpath
import stat
from collections.abc import Iterator, Mapping
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import ArtifactStore
from storage.datasets import sample_id
from storage.errors import redact
from storage.ingest.checked import CheckedImages
from storage.ingest.common import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SHARD_ROWS,
    IngestResult,
    SourceError,
    SourceNotFoundError,
    absolute,
    check_common,
    decode_problem,
    is_url,
    local_path,
    norm_label,
    norm_split,
    one_line,
    raise_if_transient,
)
from storage.ingest.folder import read_file_uri
from storage.ingest.reading import CredentialsMissingError, SourceFiles, ordered_map
from storage.ingest.reuse import BaseSamples, SourceHashes, source_key
from storage.ingest.writer import DatasetWriter

__all__ = ["fetch_and_check", "ingest_manifest", "manifest_base", "manifest_entries", "manifest_records",
           "resolve_entry", "source_uri"]

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_PARQUET_BATCH = 8192


def _format(url: str) -> tuple[str, str | None]:
    """(``csv`` | ``tsv`` | ``parquet``, compression codec or None) from the manifest's name."""
    name = url.split("?", 1)[0].lower()
    codec = None
    for ext in _COMPRESSED:
        if name.endswith(ext):
            codec = fsspec.utils.infer_compression(name)
            name = name.removesuffix(ext)
    if name.endswith((".parquet", ".pq")):
        return "parquet", codec
    if name.endswith((".csv", ".tsv")):
        return name[-3:], codec
    raise SourceError(f"manifest {redact(url)}: unsupported format; expected .csv, .tsv or .parquet")


class _Hashing(io.RawIOBase):
    """A raw reader that hashes every byte read through it (the fingerprint hashes a CSV while parsing it)."""

    def __init__(self, fh: IO[bytes], digest: Any) -> None:
        self._fh, self._digest = fh, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._fh.read(len(buffer))
        buffer[: len(data)] = data
        self._digest.update(data)
        return len(data)


def _records(fh: IO[bytes], fmt: str, codec: str | None,
             digest: Any) -> tuple[list[str], Iterator[dict[str, Any]], IO[bytes]]:
    if fmt == "parquet":
        if digest is not None:
            while chunk := fh.read(4 * 2**20):
                digest.update(chunk)
            fh.seek(0)
        parquet = pq.ParquetFile(fh)
        columns = list(parquet.schema_arrow.names)
        wanted = [c for c in ("path", "url", "label", "split") if c in columns]
        batches = parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=wanted) if wanted else iter(())
        return columns, (rec for batch in batches for rec in batch.to_pylist()), fh
    raw: IO[bytes] = io.BufferedReader(_Hashing(fh, digest)) if digest is not None else fh
    stream = fsspec.compression.compr[codec](raw, mode="rb") if codec else raw
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text, delimiter="\t" if fmt == "tsv" else ",")
    columns = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = columns
    return columns, iter(reader), raw


@contextlib.contextmanager
def manifest_records(url: str, files: SourceFiles,
                     digest: Any = None) -> Iterator[tuple[list[str], Iterator[dict[str, Any]]]]:
    """(column names, streamed rows as dicts) of a manifest; CSV/TSV values are strings. ``digest`` (a hashlib
    object), if given, is fed the manifest's raw bytes — all of them, by the time the block exits cleanly.

    Raises SourceNotFoundError (no such manifest) or SourceError (unsupported format, unreadable, no
    credentials for a private bucket), naming the manifest — also for errors while the rows are iterated."""
    shown = redact(url)
    fmt, codec = _format(url)
    target = url if is_url(url) else str(absolute(url))
    try:
        fh = files.open(target)
    except FileNotFoundError:
        raise SourceNotFoundError(f"manifest {shown} does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"manifest {shown} is a directory, not a table") from None
    except Exception as exc:
        raise SourceError(f"cannot read manifest {shown}: {read_problem(exc)}") from None
    with fh:
        try:
            columns, records, raw = _records(fh, fmt, codec, digest)
        except Exception as exc:
            raise SourceError(f"cannot read manifest {shown}: {read_problem(exc)}") from None
        yield columns, _guarded(records, shown)
        if digest is not None and fmt != "parquet":
            while raw.read(4 * 2**20):  # whatever the parser left (e.g. a compressed stream's trailer)
                pass


def read_problem(exc: BaseException) -> str:
    """Why a source or input could not be read: the missing-credentials hint as written, else the error on one line."""
    return str(exc) if isinstance(exc, CredentialsMissingError) else one_line(exc)


def _guarded(records: Iterator[dict[str, Any]], shown: str) -> Iterator[dict[str, Any]]:
    try:
        yield from records
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"cannot read manifest {shown}: {read_problem(exc)}") from None


def manifest_base(url: str, base_dir: str | os.PathLike | None) -> str:
    """What relative entries are resolved against: ``base_dir`` if given, else the manifest's own folder."""
    if base_dir is not None:
        base = os.fspath(base_dir)
        return base.rstrip("/") if is_url(base) else str(absolute(base))
    if is_url(url):
        return url.split("?", 1)[0].rsplit("/", 1)[0]
    return str(absolute(url).parent)


def resolve_entry(entry: str, base: str) -> str:
    """An absolute local path or a URL for a manifest entry (relative entries are joined to ``base``)."""
    if is_url(entry):
        return entry
    entry = local_path(entry)
    if os.path.isabs(entry) or entry.startswith("~"):
        return str(pathlib.Path(entry).expanduser())
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
    return os.path.normpath(os.path.join(base, entry))


def manifest_entries(columns: list[str], records: Iterator[dict[str, Any]], shown: str,
                     base: str) -> Iterator[tuple[str, str, str | None]]:
    """(resolved target, label, explicit split or None) per row, streamed; SourceError naming the column or the
    1-based data row (header not counted): no path/url or label column, no rows, an empty path or label, a bad
    split."""
    path_col = next((c for c in ("path", "url") if c in columns), None)
    if path_col is None:
        raise SourceError(f"manifest {shown} has no 'path' (or 'url') column; its columns are {columns}")
    if "label" not in columns:
        raise SourceError(f"manifest {shown} has no 'label' column (labels are required); its columns are {columns}")
    n = 0
    for n, rec in enumerate(records, start=1):
        where = f"manifest {shown} row {n}"
        raw = rec.get(path_col)
        if not isinstance(raw, str) or not raw.strip():
            raise SourceError(f"{where} has an empty {path_col}")
        label = norm_label(rec.get("label"), where)
        split = norm_split(rec.get("split"), where) if "split" in columns else None
        yield resolve_entry(raw.strip(), base), label, split
    if n == 0:
        raise SourceError(f"manifest {shown} has no rows")


def source_uri(target: str) -> str:
    """A listed file's ``source_uri``: the redacted URL, or the local path's ``file://`` URI."""
    return redact(target) if is_url(target) else pathlib.Path(target).as_uri()


def _read_local(target: str) -> bytes:
    st = os.stat(target)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(target)
    if not stat.S_ISREG(st.st_mode):
        raise _NotRegular(target)
    with open(target, "rb") as fh:
        return fh.read()


class _NotRegular(OSError):
    pass


def fetch_and_check(target: str, files: SourceFiles, max_pixels: int = DEFAULT_MAX_PIXELS,
                    checked: CheckedImages | None = None) -> tuple[str | None, bytes | None, str | None]:
    """(sample id, bytes, None) for a good image, else (None, None, quarantine reason); one read per target.
    ``checked``: the store's record of images that already passed the check (not decoded again)."""
    try:
        data = files.cat(target) if is_url(target) else _read_local(target)
    except FileNotFoundError:
        return None, None, "missing file"
    except IsADirectoryError:
        return None, None, "not a file (a directory)"
    except _NotRegular:
        return None, None, "not a regular file"
    except Exception as exc:  # permissions, credentials: one line per file, the run goes on
        raise_if_transient(exc, redact(target))  # timeouts, resets, 5xx: retried, never cached as quarantine
        return None, None, f"cannot read file: {read_problem(exc)}"
    if checked is not None:
        sid, problem = checked.check(data)
        return (None, None, problem) if sid is None else (sid, data, None)
    problem = decode_problem(data, max_pixels)
    return (None, None, problem) if problem else (sample_id(data), data, None)


def ingest_manifest(store: ArtifactStore, manifest_path_or_url: str | os.PathLike, *,
                    base_dir: str | os.PathLike | None = None, val_fraction: float = 0.15,
                    test_fraction: float = 0.15, seed: int = 0, shard_rows: int = DEFAULT_SHARD_ROWS,
                    storage_options: Mapping[str, Any] | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, reuse: bool = True) -> IngestResult:
    """Ingest the images listed in a manifest table (CSV, TSV or Parquet; local path or fsspec URL).

    Columns: ``path`` (or ``url``) — a local path, or any fsspec URL; relative entries are resolved against
    ``base_dir`` (local or URL), else the manifest's own folder —, ``label`` (required; strings or integers),
    optional ``split`` (train/val/test, also valid/validation; an empty cell gets :func:`assign_split`). Other
    columns are ignored. ``storage_options`` (e.g. S3 endpoint and keys) are used for every remote URL; without
    them, credentials come from the environment, and a public bucket is read anonymously. Every listed file is
    read once and decoded whatever its extension; missing, empty, unreadable, undecodable and oversized files
    are quarantined ("missing file", "empty file", "cannot read file: …", "cannot decode image: …",
    "image too large: …").

    With ``reuse`` (the default), entries unchanged since this store's last ingest of the manifest are not read:
    a local file with the same path, size, mtime, ctime and inode, or an object with the same URL, size and
    content tag (ETag, version) — one metadata request instead of a download; their bytes come from that
    dataset's shards (:mod:`storage.ingest.reuse`), and the dataset is the same either way. URLs that carry
    credentials (redacted in ``source_uri``) are always read.

    Raises SourceNotFoundError (manifest missing) or SourceError naming the manifest, the column or the 1-based
    data row (header not counted): no path/url or label column, no rows, an empty path or label, a bad split,
    the same image with two labels, fewer than 2 classes, no credentials for a private bucket.
    """
    check_common(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, shard_rows=shard_rows,
                 max_pixels=max_pixels)
    files = SourceFiles(storage_options)
    url = os.fspath(manifest_path_or_url)
    shown = redact(url)
    base = manifest_base(url, base_dir)
    checked = CheckedImages(store, max_pixels)
    where = url if is_url(url) else str(absolute(url))
    hashes = SourceHashes(store, {"kind": "manifest", "manifest": where}, checked.policy) if reuse else None
    previous = hashes.load() if hashes is not None else None

    def check(entry: tuple[str, str, str | None]) -> tuple[tuple[str, str, str | None], bytes | None,
                                                             int | None, Any]:
        key, size = source_key(entry[0], files) if hashes is not None else (None, None)
        sid = hashes.reusable(key, entry[0]) if hashes is not None else None
        if sid is not None:
            return entry, key, size, (sid, None, None)
        return entry, key, None, fetch_and_check(entry[0], files, max_pixels, checked)

    def fetch(uri: str) -> bytes:
        return files.cat(uri) if is_url(uri) else read_file_uri(uri)

    with manifest_records(url, files) as (columns, records), \
            DatasetWriter(store, source_name=f"manifest {shown}", shard_rows=shard_rows, seed=seed,
                          val_fraction=val_fraction, test_fraction=test_fraction,
                          base=BaseSamples(store, previous, fetch, hashes.lost_shards) if previous is not None
                          else None) as writer:
        for (target, label, split), key, size, (sid, data, problem) in ordered_map(check, manifest_entries(
                columns, records, shown, base)):
            if sid is None or (data is None and size is None):
                writer.quarantine(source_uri(target), problem or "unreadable")
                continue
            writer.add(sid, source_uri(target), label, split, data, reused=size)
            if hashes is not None and key is not None:
                hashes.record(key, sid)
        if hashes is not None:
            hashes.release()
        result = writer.finish(source=shown if is_url(url) else absolute(url).as_uri())
    checked.commit()  # only once the dataset is published
    if hashes is not None:
        hashes.commit(result.dataset, writer.new_rows)
    return result

