"""What every source kind shares: errors, the result, splits, labels, the decode check, pool checks, paths.

- **Sample ids are content hashes** (:func:`storage.datasets.sample_id` of a file's raw bytes, or
  :func:`storage.datasets.vector_sample_id` of an embedding), so the same image is the same sample wherever it
  sits.
- **Splits** not given by the source are :func:`assign_split` of (sample id, seed): a hash, not a position, so
  re-ordering, renaming, moving or re-sharding the pool never moves a sample between splits.
- **Bad inputs do not stop the run**: empty, missing, unreadable, undecodable or oversized images
  (:func:`decode_problem`) and non-finite vectors go to a quarantine table (:data:`QUARANTINE_SCHEMA`).
- **Bad pools do** stop it, with a one-line :class:`SourceError` naming the path, row, column, tar or key.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import numbers
import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import SPLITS, DatasetRef, VectorTableRef
from storage.errors import StorageError, redact

__all__ = [
    "CONTENT_TAGS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SHARD_ROWS",
    "IMAGE_EXTENSIONS",
    "QUARANTINE_SCHEMA",
    "IngestResult",
    "SourceError",
    "SourceNotFoundError",
    "assign_split",
    "check_common",
    "decode_problem",
    "is_url",
    "local_path",
    "norm_label",
    "norm_split",
    "one_line",
    "read_record",
    "shown_path",
]

_log = logging.getLogger("storage.ingest")

#: what an object store says about an object's content (S3 ETag and version, GCS generation and hashes, Azure etag
#: and version): the fingerprint's and the source-hash record's identity of a remote object
CONTENT_TAGS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "crc32c", "content_md5")

#: File extensions (lower case) treated as images by folder listings and WebDataset members.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: The quarantine table: one row per rejected input, sorted by (source_uri, reason).
QUARANTINE_SCHEMA = pa.schema(
    [pa.field("source_uri", pa.string(), nullable=False), pa.field("reason", pa.string(), nullable=False)],
    metadata={"skmm.table": "quarantine", "skmm.schema_version": "1"},
)

DEFAULT_SHARD_ROWS = 2048  # rows carry image bytes: a shard (built in memory) stays small
#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (1024·1024·1024 // 4 // 3), fixed here so that a process
#: that changed Pillow's global does not change which images a pool keeps.
DEFAULT_MAX_PIXELS = 89_478_485

_SPLIT_HEADER = b"skmm-split/1\0"
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# ---------------------------------------------------------------------------------------------- errors
class SourceError(ValueError):
    """A pool that cannot become a dataset (bad layout, labels, columns, conflicts); one line, redacted."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(" ".join(str(message).split())))


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The folder, manifest, shard or table to ingest does not exist."""


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class IngestResult:
    """What the ingest stage hands on: the dataset ref plus what happened to the pool on the way in.

    ``classes`` is sorted; ``split_counts`` counts unique samples per split (all of train/val/test, zeros
    included); ``quarantine`` is None when nothing was rejected; ``vectors`` is set for embedding sources only;
    ``source`` is the (redacted) URI of what was ingested.
    """

    dataset: DatasetRef
    quarantine: ArtifactRef | None
    n_samples: int
    n_duplicates_collapsed: int
    n_quarantined: int
    classes: tuple[str, ...]
    split_counts: dict[str, int] = field(hash=False)
    vectors: VectorTableRef | None = None
    source: str = ""
    #: samples whose file (or tar) was unchanged since this store's last ingest of the source, so not read again
    #: (how the dataset was written, not what it is: results that differ only here compare equal)
    n_reused: int = field(default=0, compare=False)
    #: samples in shards of that previous dataset kept as they are (not written again: a grown dataset's runs)
    n_kept: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (refs as dicts, classes as a list)."""
        return {"dataset": self.dataset.to_dict(),
                "quarantine": self.quarantine.to_dict() if self.quarantine else None,
                "n_samples": self.n_samples, "n_duplicates_collapsed": self.n_duplicates_collapsed,
                "n_quarantined": self.n_quarantined, "classes": list(self.classes),
                "split_counts": dict(self.split_counts),
                "vectors": self.vectors.to_dict() if self.vectors else None, "source": self.source,
                "n_reused": self.n_reused, "n_kept": self.n_kept}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IngestResult:
        """Inverse of :meth:`to_dict` (refs are validated by their own ``from_dict``)."""
        return cls(dataset=DatasetRef.from_dict(data["dataset"]),
                   quarantine=ArtifactRef.from_dict(data["quarantine"]) if data.get("quarantine") else None,
                   n_samples=int(data["n_samples"]), n_duplicates_collapsed=int(data["n_duplicates_collapsed"]),
                   n_quarantined=int(data["n_quarantined"]), classes=tuple(data["classes"]),
                   split_counts={str(k): int(v) for k, v in data["split_counts"].items()},
                   vectors=VectorTableRef.from_dict(data["vectors"]) if data.get("vectors") else None,
                   source=str(data.get("source", "")), n_reused=int(data.get("n_reused", 0)),
                   n_kept=int(data.get("n_kept", 0)))


# ---------------------------------------------------------------------------------------------- arguments
def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (train needs samples); "
                         f"got {val_fraction} + {test_fraction}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer; got {seed!r}")


def check_common(*, val_fraction: float, test_fraction: float, seed: int, shard_rows: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The arguments every ingest takes, checked before any work: ValueError naming the argument."""
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)
    _check_positive_int("shard_rows", shard_rows)
    _check_positive_int("max_pixels", max_pixels)


# ---------------------------------------------------------------------------------------------- splits
def split_of(sample_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """:func:`assign_split` without the argument checks (the streaming writer calls it once per sample)."""
    digest = hashlib.sha256(_SPLIT_HEADER + f"{int(seed)}\0{sample_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_codes(digests: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """:func:`split_of` of many samples at once, given as raw 32-byte ids (``S32``): 1 train, 2 val, 3 test
    (uint8). The hash of the common prefix is taken once and copied per sample (~0.7 µs a sample, against ~1.3 µs
    for :func:`split_of` on each id's hex)."""
    hexed = digests.tobytes().hex().encode("ascii")
    prefix = hashlib.sha256(_SPLIT_HEADER + f"{int(seed)}\0".encode())
    heads = bytearray()
    for lo in range(0, len(hexed), 64):
        h = prefix.copy()
        h.update(hexed[lo:lo + 64])
        heads += h.digest()[:8]
    u = np.frombuffer(bytes(heads), ">u8") / 2.0**64  # as split_of: the same float64 for each int
    return np.where(u < test_fraction, 3, np.where(u < test_fraction + val_fraction, 2, 1)).astype(np.uint8)


def assign_split(sample_id: str, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15) -> Literal["train", "val", "test"]:
    """The split of a sample as a pure function of (sample id, seed): never of its position in the pool.

    u = the first 8 bytes (big-endian) of sha256(b"skmm-split/1\\0" + f"{seed}\\0{sample_id}") / 2**64, uniform
    in [0, 1); ``test`` if u < test_fraction, ``val`` if u < test_fraction + val_fraction, else ``train``. So a
    re-listed, re-ordered or re-sharded pool keeps every sample in its split, and growing a fraction only moves
    samples out of train. Not stratified: small classes may miss a split.
    """
    _check_seed(seed)
    _check_fractions(val_fraction, test_fraction)
    if not isinstance(sample_id, str) or not sample_id:
        raise ValueError(f"sample_id must be a non-empty string; got {sample_id!r:.80}")
    return split_of(sample_id, seed, val_fraction, test_fraction)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- labels
def norm_label(value: Any, where: str) -> str:
    """A label as a string: text stripped, integers (and integral floats) in decimal, other finite numbers
    (regression targets) as their shortest round-trip decimal text; empty → SourceError naming ``where``."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        text = str(int(value))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and float(value).is_integer():
        text = str(int(value))  # a pandas int column with gaps arrives as float
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        text = repr(float(value))
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        text = ""
    else:
        raise SourceError(f"{where} has a label of type {type(value).__name__} ({value!r:.40}); "
                          "labels must be strings or numbers")
    if not text:
        raise SourceError(f"{where} has an empty label (every sample needs one)")
    return text


def norm_split(value: Any, where: str) -> str | None:
    """An explicit split (train/val/test; also valid/validation), or None for an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise SourceError(f"{where} has a split of type {type(value).__name__}; expected one of {SPLITS}")
    text = value.strip().lower()
    if not text:
        return None
    if text not in _SPLIT_ALIASES:
        raise SourceError(f"{where} has split {value!r:.40}; expected one of {SPLITS} (or empty)")
    return _SPLIT_ALIASES[text]


# ---------------------------------------------------------------------------------------------- decode check
def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most ~160 characters, without object addresses or credentials (it goes
    into quarantine tables and logs, and I/O errors quote URLs)."""
    text = " ".join(redact(str(exc)).split())
    text = _ADDRESS.sub("<data>", text)
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


# A dead host (refused, unreachable, unknown name) is not transient: web-scraped manifests list many dead links,
# and those are quarantined like missing files.
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EAGAIN}
_TRANSIENT_NAMES = ("Timeout", "ServerDisconnected", "ClientPayloadError", "ResponseStreamingError",
                    "IncompleteRead", "SlowDown", "ServiceUnavailable", "InternalError")


def transient_read_error(exc: BaseException) -> bool:
    """Whether a failed read may succeed if tried again (a timeout, a reset connection, EIO, a throttled or failing
    object store), rather than say something about the file itself (missing, unreadable, not an image)."""
    for err in (exc, exc.__cause__, exc.__context__):
        if err is None:
            continue
        if isinstance(err, ConnectionResetError | ConnectionAbortedError | BrokenPipeError | TimeoutError):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if any(name in type(err).__name__ or name in str(err)[:300] for name in _TRANSIENT_NAMES):
            return True
    return False


def raise_if_transient(exc: BaseException, what: str) -> None:
    """Re-raise a transient read failure of ``what`` as a transient StorageError (so the task retries and nothing
    is cached: the cache key is the source's metadata, which a failed read does not change); return otherwise,
    for the caller to quarantine the input."""
    if transient_read_error(exc):
        raise StorageError(f"cannot read {what} ({one_line(exc)}); nothing was ingested or cached: rerun when it "
                           "is reachable", transient=True) from None


def decode_problem(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """None if ``data`` is a fully decodable image of at most ``max_pixels`` pixels, else the quarantine reason.

    The size is checked on the header (``Image.open`` reads only that) *before* any pixel is decoded, so a
    decompression bomb costs nothing; then every frame is decoded (``load()``), which catches truncated and corrupt
    files that the header alone accepts. Pillow's global ``Image.MAX_IMAGE_PIXELS`` is never changed (other
    threads decode too): it still applies on top of ``max_pixels`` — Pillow refuses images above twice its limit,
    and those are quarantined as too large as well. Note: if some code sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES
    = True`` process-wide, Pillow pads truncated files instead of failing and they pass.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                return f"image too large: {width}×{height} = {width * height} pixels > max_pixels {max_pixels}"
            for frame in range(getattr(im, "n_frames", 1) or 1):
                im.seek(frame)
                im.load()
    except Image.DecompressionBombError as exc:
        return f"image too large: {one_line(exc)}"
    except UnidentifiedImageError:
        return "cannot decode image: not a recognised image format"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        return f"cannot decode image: {one_line(exc)}"
    return None


# ---------------------------------------------------------------------------------------------- paths
def is_url(text: str) -> bool:
    """A remote fsspec URL (``s3://``, ``gs://``, ``https://``...), not a local path or ``file://`` URL."""
    return "://" in text and not text.startswith("file://")


def local_path(text: str) -> str:
    """A local path from a path or ``file://`` URL."""
    return text[len("file://"):] if text.startswith("file://") else text


def shown_path(path: str | os.PathLike) -> str:
    """A local path as printable text: bytes that are not UTF-8 (kept by Python as surrogates) shown escaped,
    e.g. ``/pool/caf\\xe9`` — so an error message about such a path can always be printed."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def absolute(text: str) -> pathlib.Path:
    """A local path (or ``file://`` URL) made absolute, ``~`` expanded, links resolved."""
    return pathlib.Path(local_path(text)).expanduser().resolve()


def read_record(store: ArtifactStore, rel: str, what: str, otherwise: str,
                logger: logging.Logger | None = None) -> bytes | None:
    """The bytes of a store record that only saves work (the decode-check and source-hash records, a tar's
    member list); None, with a warning ``"<what> <uri> unreadable (<error>): <otherwise>"``, when it cannot be
    read — the work is then done again. A transient error (the store unreachable) is raised: it may pass."""
    try:
        return store.read_rel(rel)
    except StorageError as exc:
        if exc.transient:
            raise
        (logger or _log).warning("%s %s unreadable (%s): %s", what, store.uri(rel), exc, otherwise)
        return None
