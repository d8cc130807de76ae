"""Turning a user's pool into a dataset in the store: the pure logic behind the pipeline's "ingest" stage.

Four sources, one result (:class:`IngestResult`):

- :func:`ingest_image_folder` — ``folder/<label>/**/<image>`` on the local disk;
- :func:`ingest_manifest` — a CSV/TSV/Parquet table of (path or url, label[, split]); files are read with fsspec,
  so ``s3://`` (and any other fsspec URL) works for the manifest and for the files it lists;
- :func:`ingest_embeddings` — a Parquet table of precomputed embeddings (one list column or several float
  columns); writes a sample table *and* a vector table;
- :func:`ingest_digits` — the bundled default pool: scikit-learn's 1797 real handwritten digits rendered as PNGs.

Shared rules:

- **Sample ids are content hashes** (:func:`storage.datasets.sample_id` of a file's raw bytes, or
  :func:`storage.datasets.vector_sample_id` of an embedding), so the same image is the same sample wherever it
  sits. Identical samples collapse to one (``n_duplicates_collapsed`` counts the rows dropped); the same content
  under two labels (or two explicit splits) is a :class:`SourceError` naming both places.
- **Splits** not given by the source are :func:`assign_split` of (sample id, seed): a hash, not a position, so
  re-ordering, renaming, moving or re-sharding the pool never moves a sample between splits.
- **Bad inputs do not stop the run**: empty, missing, unreadable or undecodable files and non-finite vectors go
  to a *quarantine* table (Parquet, columns ``source_uri, reason``, kind ``"quarantine"``) and are counted.
- **Bad pools do** stop it, with a one-line :class:`SourceError` (a ValueError) or :class:`SourceNotFoundError`
  (also a FileNotFoundError) naming the path, row or column: a missing folder or manifest, no class
  subfolders, a missing label column or an empty label, fewer than 2 classes (in the pool or in its train split).
- **Nothing is written before validation passes**: every check runs on the in-memory rows first; only then are
  the quarantine table, the sample shards and the manifest (and, for embeddings, the vector table) written. If
  the store itself fails half-way, shard objects already written stay behind unreferenced — harmless, since
  objects are content-addressed and immutable (a retry reuses them).

Scale: a pool's rows (image bytes included) are held in memory while validated and written, as
:func:`storage.datasets.write_samples` builds its table in memory; keep ``shard_rows`` small for large images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import numbers
import os
import pathlib
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import (
    SPLITS,
    DatasetRef,
    VectorTableRef,
    sample_id,
    vector_sample_id,
    write_samples,
    write_vectors,
)
from storage.errors import redact

__all__ = [
    "IMAGE_EXTENSIONS",
    "QUARANTINE_SCHEMA",
    "IngestResult",
    "SourceError",
    "SourceNotFoundError",
    "assign_split",
    "ingest_digits",
    "ingest_embeddings",
    "ingest_image_folder",
    "ingest_manifest",
    "render_digit_png",
]

log = logging.getLogger(__name__)

#: File extensions (lower case) that :func:`ingest_image_folder` treats as images; anything else is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: The quarantine table: one row per rejected input, sorted by (source_uri, reason).
QUARANTINE_SCHEMA = pa.schema(
    [pa.field("source_uri", pa.string(), nullable=False), pa.field("reason", pa.string(), nullable=False)],
    metadata={"skmm.table": "quarantine", "skmm.schema_version": "1"},
)

DEFAULT_SHARD_ROWS = 2048  # rows carry image bytes: keep shards (built in memory) small
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}  # pinned: same rows → same bytes
_SPLIT_HEADER = b"skmm-split/1\0"
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_READ_WORKERS = 8
_DIGITS_URI = "sklearn://datasets/load_digits"


# ---------------------------------------------------------------------------------------------- errors
class SourceError(ValueError):
    """A pool that cannot become a dataset (bad layout, labels, columns, conflicts); one line, redacted."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(" ".join(str(message).split())))


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The folder, manifest or table to ingest does not exist."""


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (refs as dicts, classes as a list)."""
        return {"dataset": self.dataset.to_dict(),
                "quarantine": self.quarantine.to_dict() if self.quarantine else None,
                "n_samples": self.n_samples, "n_duplicates_collapsed": self.n_duplicates_collapsed,
                "n_quarantined": self.n_quarantined, "classes": list(self.classes),
                "split_counts": dict(self.split_counts),
                "vectors": self.vectors.to_dict() if self.vectors else None, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IngestResult:
        """Inverse of :meth:`to_dict` (refs are validated by their own ``from_dict``)."""
        return cls(dataset=DatasetRef.from_dict(data["dataset"]),
                   quarantine=ArtifactRef.from_dict(data["quarantine"]) if data.get("quarantine") else None,
                   n_samples=int(data["n_samples"]), n_duplicates_collapsed=int(data["n_duplicates_collapsed"]),
                   n_quarantined=int(data["n_quarantined"]), classes=tuple(data["classes"]),
                   split_counts={str(k): int(v) for k, v in data["split_counts"].items()},
                   vectors=VectorTableRef.from_dict(data["vectors"]) if data.get("vectors") else None,
                   source=str(data.get("source", "")))


# ---------------------------------------------------------------------------------------------- splits
def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (train needs samples); "
                         f"got {val_fraction} + {test_fraction}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer; got {seed!r}")


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
    digest = hashlib.sha256(_SPLIT_HEADER + f"{int(seed)}\0{sample_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# ---------------------------------------------------------------------------------------------- shared core
@dataclass
class _Row:
    sid: str
    source_uri: str
    label: str
    split: str | None  # None: assigned by hash
    data: bytes | None = None
    index: int = -1  # position in the source (embeddings: the vector's row)


@dataclass
class _Prepared:
    records: list[dict[str, Any]]
    kept: list[_Row]
    n_duplicates: int
    classes: tuple[str, ...]
    split_counts: dict[str, int]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = _ADDRESS.sub("<data>", text)
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _decode_problem(data: bytes) -> str | None:
    """None if ``data`` is a fully decodable image, else the quarantine reason.

    Every frame is decoded (``load()``), which catches truncated and corrupt files that ``Image.open`` alone
    (header only) accepts. Note: if some code sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` process-wide,
    Pillow pads truncated files instead of failing and they pass.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            for frame in range(getattr(im, "n_frames", 1) or 1):
                im.seek(frame)
                im.load()
    except UnidentifiedImageError:
        return "cannot decode image: not a recognised image format"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        return f"cannot decode image: {_one_line(exc)}"
    return None


def _norm_label(value: Any, where: str) -> str:
    """A label as a string: text stripped, integers (and integral floats) in decimal, other finite numbers (regression
    targets) as their shortest round-trip decimal text; empty → SourceError."""
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


def _norm_split(value: Any, where: str) -> str | None:
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


def _prepare(rows: Iterable[_Row], quarantined: Sequence[tuple[str, str]], *, source: str, seed: int,
             val_fraction: float, test_fraction: float,
             same_content: Callable[[_Row, _Row], bool] | None = None) -> _Prepared:
    """Collapse duplicates, assign splits and check the pool; raises SourceError before anything is written."""
    first: dict[str, _Row] = {}
    n_dup = 0
    for row in rows:
        prev = first.get(row.sid)
        if prev is None:
            first[row.sid] = row
            continue
        if same_content is not None and not same_content(prev, row):
            raise SourceError(f"sample id {row.sid} is given to different vectors at {prev.source_uri} and "
                              f"{row.source_uri}")
        if prev.label != row.label:
            raise SourceError(f"the same sample ({row.sid[:12]}…) has conflicting labels {prev.label!r} at "
                              f"{prev.source_uri} and {row.label!r} at {row.source_uri}")
        if prev.split and row.split and prev.split != row.split:
            raise SourceError(f"the same sample ({row.sid[:12]}…) has conflicting splits {prev.split!r} at "
                              f"{prev.source_uri} and {row.split!r} at {row.source_uri}")
        if prev.split is None and row.split is not None:
            prev.split = row.split  # an explicit split wins over a hashed one, whichever row came first
        n_dup += 1
    kept = [first[sid] for sid in sorted(first)]
    bad = (f"; {len(quarantined)} input(s) quarantined, e.g. {quarantined[0][0]}: {quarantined[0][1]}"
           if quarantined else "")
    if not kept:
        raise SourceError(f"{source} has no usable samples{bad}")
    classes = tuple(sorted({r.label for r in kept}))
    if len(classes) < 2:
        raise SourceError(f"{source} needs at least 2 classes with usable samples; found {len(classes)} "
                          f"({', '.join(map(repr, classes))}){bad}")
    splits = [r.split or assign_split(r.sid, seed, val_fraction, test_fraction) for r in kept]
    train_classes = {r.label for r, s in zip(kept, splits, strict=True) if s == "train"}
    if len(train_classes) < 2:
        raise SourceError(f"{source}: the train split holds {len(train_classes)} class(es) "
                          f"({', '.join(map(repr, sorted(train_classes)))}); it needs at least 2 — add samples, "
                          "lower val_fraction/test_fraction, or try another seed")
    counts = Counter(splits)
    split_counts = {s: counts.get(s, 0) for s in SPLITS}
    for s in ("val", "test"):
        if split_counts[s] == 0:
            log.warning("%s: the %s split is empty (%d samples)", redact(source), s, len(kept))
    records = [{"sample_id": r.sid, "source_uri": r.source_uri, "label": r.label, "split": s, "data": r.data}
               for r, s in zip(kept, splits, strict=True)]
    return _Prepared(records, kept, n_dup, classes, split_counts)


def _quarantine_bytes(quarantined: Sequence[tuple[str, str]]) -> bytes:
    rows = sorted(quarantined)
    table = pa.table({"source_uri": [r[0] for r in rows], "reason": [r[1] for r in rows]}, schema=QUARANTINE_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **_PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def _write(store: ArtifactStore, prepared: _Prepared, quarantined: Sequence[tuple[str, str]], *, shard_rows: int,
           source: str, vectors: Callable[[], VectorTableRef] | None = None) -> IngestResult:
    """Write quarantine, samples (and vectors) — only called once the pool has passed validation."""
    qref = store.put_bytes(_quarantine_bytes(quarantined), "quarantine", ".parquet") if quarantined else None
    dataset = write_samples(store, prepared.records, shard_rows=shard_rows)
    vref = vectors() if vectors is not None else None
    result = IngestResult(dataset=dataset, quarantine=qref, n_samples=dataset.num_rows,
                          n_duplicates_collapsed=prepared.n_duplicates, n_quarantined=len(quarantined),
                          classes=prepared.classes, split_counts=prepared.split_counts, vectors=vref,
                          source=redact(source))
    log.info("ingested %s: %d samples, %d classes, splits %s, %d duplicates collapsed, %d quarantined",
             result.source, result.n_samples, len(result.classes), result.split_counts,
             result.n_duplicates_collapsed, result.n_quarantined)
    return result


def _check_shard_rows(shard_rows: int) -> None:
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows <= 0:
        raise ValueError(f"shard_rows must be a positive integer; got {shard_rows!r}")


# ---------------------------------------------------------------------------------------------- image folder
def _local_dir(folder: str | os.PathLike, what: str) -> pathlib.Path:
    text = os.fspath(folder)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise SourceError(f"{what} must be a local folder, got {redact(text)}; list remote files in a manifest "
                          "and use ingest_manifest")
    path = pathlib.Path(text).expanduser().resolve()
    if not path.exists():
        raise SourceNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise SourceError(f"{what} {path} is not a directory")
    return path


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _read_and_check(path: pathlib.Path) -> tuple[bytes | None, str | None]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read file: {_one_line(exc)}"
    problem = _decode_problem(data)
    return (None, problem) if problem else (data, None)


def _collect(entries: Iterable[tuple[str, str, str | None]], checked: Sequence[tuple[bytes | None, str | None]],
             ) -> tuple[list[_Row], list[tuple[str, str]]]:
    """Pair (uri, label, split) entries with their read results: readable ones become rows, the rest quarantine."""
    rows: list[_Row] = []
    quarantined: list[tuple[str, str]] = []
    for (uri, label, split), (data, problem) in zip(entries, checked, strict=True):
        if data is None:
            quarantined.append((uri, problem or "unreadable"))
        else:
            rows.append(_Row(sample_id(data), uri, label, split, data))
    return rows, quarantined


def ingest_image_folder(store: ArtifactStore, folder: str | os.PathLike, *, val_fraction: float = 0.15,
                        test_fraction: float = 0.15, seed: int = 0,
                        shard_rows: int = DEFAULT_SHARD_ROWS) -> IngestResult:
    """Ingest ``folder/<label>/**/<image>`` (a local folder) into a dataset on ``store``.

    Each first-level subfolder is a class (its name is the label); images are found recursively inside it by
    extension (:data:`IMAGE_EXTENSIONS`, case-insensitive). Ignored, on purpose: other files (``.txt``,
    ``.csv``, ...), files directly in ``folder``, and hidden names (starting with ``.``, e.g. ``.DS_Store``,
    ``.ipynb_checkpoints``). Every image is read and fully decoded with Pillow; empty, unreadable and undecodable
    files are quarantined. A row keeps the raw file bytes in ``data`` (sample id = their sha256, so renaming or
    moving a file changes nothing) and the absolute ``file://`` URI in ``source_uri`` (informational: not part
    of the dataset version). Splits: :func:`assign_split`.

    Raises SourceNotFoundError (folder missing) or SourceError (not a directory, empty, no class subfolders,
    the same image under two classes, fewer than 2 classes with usable images, fewer than 2 in train).
    """
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)
    _check_shard_rows(shard_rows)
    root = _local_dir(folder, "image folder")
    entries = sorted(p for p in root.iterdir() if _visible(p.name))
    if not entries:
        raise SourceError(f"image folder {root} is empty; expected class subfolders {root}/<label>/<images>")
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        raise SourceError(f"image folder {root} has no class subfolders; expected {root}/<label>/<images>")
    files: list[tuple[pathlib.Path, str]] = []
    n_ignored = 0
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for name in sorted(filenames):
                if not _visible(name):
                    continue
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    files.append((pathlib.Path(dirpath, name), class_dir.name))
                else:
                    n_ignored += 1
    if n_ignored:
        log.info("image folder %s: ignored %d non-image file(s)", root, n_ignored)
    with ThreadPoolExecutor(max_workers=_READ_WORKERS) as pool:
        checked = list(pool.map(_read_and_check, (p for p, _ in files)))
    rows, quarantined = _collect(((path.as_uri(), label, None) for path, label in files), checked)
    prepared = _prepare(rows, quarantined, source=f"image folder {root}", seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction)
    return _write(store, prepared, quarantined, shard_rows=shard_rows, source=root.as_uri())


# ---------------------------------------------------------------------------------------------- manifest
def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _local_path(text: str) -> str:
    return text[len("file://"):] if text.startswith("file://") else text


def _read_manifest_rows(url: str, storage_options: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows as dicts) of a CSV/TSV (all values strings) or Parquet manifest."""
    name = url.split("?", 1)[0].lower()
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(ext)
    opts = dict(storage_options) if _is_url(url) else {}
    target = url if _is_url(url) else str(pathlib.Path(_local_path(url)).expanduser().resolve())
    try:
        if name.endswith((".parquet", ".pq")):
            with fsspec.open(target, "rb", **opts) as fh:
                table = pq.read_table(fh)
            return list(table.column_names), table.to_pylist()
        if name.endswith((".csv", ".tsv")):
            with fsspec.open(target, "rt", encoding="utf-8-sig", newline="", compression="infer", **opts) as fh:
                reader = csv.DictReader(fh, delimiter="\t" if name.endswith(".tsv") else ",")
                columns = [c.strip() for c in (reader.fieldnames or [])]
                reader.fieldnames = columns
                return columns, list(reader)
    except FileNotFoundError:
        raise SourceNotFoundError(f"manifest {redact(url)} does not exist") from None
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:
        raise SourceError(f"cannot read manifest {redact(url)}: {_one_line(exc)}") from None
    raise SourceError(f"manifest {redact(url)}: unsupported format; expected .csv, .tsv or .parquet")


def _manifest_base(url: str, base_dir: str | os.PathLike | None) -> str:
    if base_dir is not None:
        base = os.fspath(base_dir)
        return base.rstrip("/") if _is_url(base) else str(pathlib.Path(_local_path(base)).expanduser().resolve())
    if _is_url(url):
        return url.split("?", 1)[0].rsplit("/", 1)[0]
    return str(pathlib.Path(_local_path(url)).expanduser().resolve().parent)


def _resolve_entry(entry: str, base: str) -> str:
    """An absolute local path or a URL for a manifest entry (relative entries are joined to ``base``)."""
    if _is_url(entry):
        return entry
    entry = _local_path(entry)
    if os.path.isabs(entry) or entry.startswith("~"):
        return str(pathlib.Path(entry).expanduser())
    if _is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
    return os.path.normpath(os.path.join(base, entry))


def _fetch_and_check(target: str, storage_options: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
    try:
        if _is_url(target):
            fs, path = fsspec.core.url_to_fs(target, **storage_options)
            data = fs.cat_file(path)
        else:
            data = pathlib.Path(target).read_bytes()
    except FileNotFoundError:
        return None, "missing file"
    except IsADirectoryError:
        return None, "not a file (a directory)"
    except Exception as exc:  # permissions, network, botocore: one line per file, the run goes on
        return None, f"cannot read file: {_one_line(exc)}"
    problem = _decode_problem(data)
    return (None, problem) if problem else (data, None)


def _source_uri(target: str) -> str:
    return redact(target) if _is_url(target) else pathlib.Path(target).as_uri()


def manifest_targets(manifest_path_or_url: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files a manifest lists, resolved exactly as :func:`ingest_manifest` resolves them (for cache keys)."""
    url = os.fspath(manifest_path_or_url)
    columns, rows = _read_manifest_rows(url, dict(storage_options or {}))
    path_col = next((c for c in ("path", "url") if c in columns), None)
    base = _manifest_base(url, base_dir)
    return [_resolve_entry(str(row.get(path_col) or ""), base) for row in rows] if path_col else []


def ingest_manifest(store: ArtifactStore, manifest_path_or_url: str | os.PathLike, *,
                    base_dir: str | os.PathLike | None = None, val_fraction: float = 0.15,
                    test_fraction: float = 0.15, seed: int = 0, shard_rows: int = DEFAULT_SHARD_ROWS,
                    storage_options: Mapping[str, Any] | None = None) -> IngestResult:
    """Ingest the images listed in a manifest table (CSV, TSV or Parquet; local path or fsspec URL).

    Columns: ``path`` (or ``url``) — a local path, or any fsspec URL; relative entries are resolved against
    ``base_dir`` (local or URL), else the manifest's own folder —, ``label`` (required; strings or integers),
    optional ``split`` (train/val/test, also valid/validation; an empty cell gets :func:`assign_split`). Other
    columns are ignored. ``storage_options`` (e.g. S3 endpoint and keys) are used for every remote URL.
    Every listed file is read and decoded whatever its extension; missing, empty, unreadable and undecodable
    files are quarantined ("missing file", "empty file", "cannot read file: …", "cannot decode image: …").

    Raises SourceNotFoundError (manifest missing) or SourceError naming the column or the 1-based data row
    (header not counted): no path/url or label column, no rows, an empty path or label, a bad split, the same
    image with two labels, fewer than 2 classes.
    """
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)
    _check_shard_rows(shard_rows)
    opts = dict(storage_options or {})
    url = os.fspath(manifest_path_or_url)
    shown = redact(url)
    columns, table = _read_manifest_rows(url, opts)
    path_col = next((c for c in ("path", "url") if c in columns), None)
    if path_col is None:
        raise SourceError(f"manifest {shown} has no 'path' (or 'url') column; its columns are {columns}")
    if "label" not in columns:
        raise SourceError(f"manifest {shown} has no 'label' column (labels are required); its columns are {columns}")
    if not table:
        raise SourceError(f"manifest {shown} has no rows")
    base = _manifest_base(url, base_dir)
    entries: list[tuple[str, str, str | None]] = []
    for i, rec in enumerate(table, start=1):
        where = f"manifest {shown} row {i}"
        raw = rec.get(path_col)
        if not isinstance(raw, str) or not raw.strip():
            raise SourceError(f"{where} has an empty {path_col}")
        label = _norm_label(rec.get("label"), where)
        split = _norm_split(rec.get("split"), where) if "split" in columns else None
        entries.append((_resolve_entry(raw.strip(), base), label, split))
    with ThreadPoolExecutor(max_workers=_READ_WORKERS) as pool:
        checked = list(pool.map(lambda e: _fetch_and_check(e[0], opts), entries))
    rows, quarantined = _collect(((_source_uri(t), label, split) for t, label, split in entries), checked)
    prepared = _prepare(rows, quarantined, source=f"manifest {shown}", seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction)
    return _write(store, prepared, quarantined, shard_rows=shard_rows,
                  source=shown if _is_url(url) else pathlib.Path(_local_path(url)).expanduser().resolve().as_uri())


# ---------------------------------------------------------------------------------------------- embeddings
def _list_matrix(column: pa.ChunkedArray, name: str, shown: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 N×k matrix with NaN where values are null, mask of rows whose list is not null)."""
    arr = column.combine_chunks()
    n = len(arr)
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_fixed_size_list(arr.type):
        k = arr.type.list_size
    else:
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        sizes = sorted(set(lengths[present].tolist()))
        if len(sizes) > 1:
            first = int(np.flatnonzero(present)[0])
            row = int(np.flatnonzero(present & (lengths != lengths[first]))[0])
            raise SourceError(f"embeddings {shown}: column {name!r} has vectors of different lengths "
                              f"({lengths[first]} at row {first}, {lengths[row]} at row {row})")
        k = sizes[0] if sizes else 0
    if k == 0:
        raise SourceError(f"embeddings {shown}: column {name!r} holds no vector values")
    value_type = arr.type.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise SourceError(f"embeddings {shown}: column {name!r} holds {value_type} values, not numbers")
    flat = pc.list_flatten(arr).cast(pa.float64()).to_numpy(zero_copy_only=False)
    mat = np.full((n, k), np.nan, dtype=np.float32)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf → quarantined
        mat[present] = flat.reshape(-1, k).astype(np.float32)
    return mat, present


def _columns_matrix(table: pa.Table, names: Sequence[str], shown: str) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for name in names:
        col = table.column(name)
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise SourceError(f"embeddings {shown}: vector column {name!r} is {col.type}, not a number column")
        parts.append(col.cast(pa.float64()).to_numpy())
    with np.errstate(over="ignore"):
        mat = np.column_stack(parts).astype(np.float32)
    return mat, np.ones(len(mat), dtype=bool)


def _pick_vector_columns(table: pa.Table, vector_column: str | Sequence[str] | None, reserved: set[str],
                         shown: str) -> str | list[str]:
    names = table.column_names
    if vector_column is None:
        if "embedding" in names:
            return "embedding"
        floats = [c for c in names if c not in reserved and pa.types.is_floating(table.schema.field(c).type)]
        if not floats:
            raise SourceError(f"embeddings {shown}: no 'embedding' column and no float columns; "
                              f"its columns are {names}")
        return floats
    wanted = [vector_column] if isinstance(vector_column, str) else list(vector_column)
    missing = [c for c in wanted if c not in names]
    if not wanted or missing:
        raise SourceError(f"embeddings {shown} has no vector column(s) {missing or wanted}; its columns are {names}")
    return vector_column if isinstance(vector_column, str) else wanted


def _external_id(value: Any, where: str) -> str:
    """A sample id from an id column: 64 hex digits are used as is (lower-cased), anything else is hashed."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = str(int(value))
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where} has an empty or non-text id ({value!r:.40})")
    value = value.strip()
    return value.lower() if _HEX64.match(value) else sample_id(value.encode("utf-8"))


def ingest_embeddings(store: ArtifactStore, parquet_path_or_url: str | os.PathLike, *,
                      id_column: str | None = None, label_column: str = "label", split_column: str | None = None,
                      vector_column: str | Sequence[str] | None = None, val_fraction: float = 0.15,
                      test_fraction: float = 0.15, seed: int = 0, shard_rows: int = 65_536,
                      storage_options: Mapping[str, Any] | None = None) -> IngestResult:
    """Ingest a Parquet table of precomputed embeddings: a sample table (``data`` null) plus a vector table.

    Vectors: ``vector_column`` names one list / fixed-size-list column of numbers, or several number columns
    (one per dimension); by default the ``embedding`` column if there is one, else every float column other than
    the id/label/split columns. Sample id: :func:`storage.datasets.vector_sample_id` of the float32 vector, or,
    with ``id_column``, the column's value — used as is when it is 64 hex digits (e.g. ids from an image ingest,
    so the embeddings line up with that dataset), else the sha256 of its UTF-8 text. ``source_uri`` is
    ``<table uri>#row=<0-based row>``. Rows with a null vector or a NaN/inf value (also after the cast to
    float32) are quarantined. The vector table (kind ``"embeddings"``) has producer
    ``{"source": "precomputed", "uri": <redacted table uri>, "column": <column name or list>}``.

    Raises SourceNotFoundError (table missing) or SourceError naming the column or the 0-based row: a missing
    label/id/split/vector column, an empty label, vectors of different lengths, one id with two vectors, the
    same vector with two labels, fewer than 2 classes.
    """
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)
    _check_shard_rows(shard_rows)
    opts = dict(storage_options or {})
    url = os.fspath(parquet_path_or_url)
    source = redact(url) if _is_url(url) else pathlib.Path(_local_path(url)).expanduser().resolve().as_uri()
    shown = redact(url)
    try:
        if _is_url(url):
            with fsspec.open(url, "rb", **opts) as fh:
                table = pq.read_table(fh)
        else:
            table = pq.read_table(str(pathlib.Path(_local_path(url)).expanduser().resolve()))
    except FileNotFoundError:
        raise SourceNotFoundError(f"embeddings table {shown} does not exist") from None
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read embeddings table {shown}: {_one_line(exc)}") from None
    names = table.column_names
    for role, col in (("label", label_column), ("id", id_column), ("split", split_column)):
        if col is not None and col not in names:
            raise SourceError(f"embeddings {shown} has no {role} column {col!r}; its columns are {names}")
    if table.num_rows == 0:
        raise SourceError(f"embeddings {shown} has no rows")
    reserved = {c for c in (id_column, label_column, split_column) if c}
    chosen = _pick_vector_columns(table, vector_column, reserved, shown)
    if isinstance(chosen, str):
        if not (pa.types.is_list(table.schema.field(chosen).type) or pa.types.is_large_list(
                table.schema.field(chosen).type) or pa.types.is_fixed_size_list(table.schema.field(chosen).type)):
            raise SourceError(f"embeddings {shown}: vector column {chosen!r} is {table.schema.field(chosen).type}, "
                              "not a list of numbers (pass several number columns as a list)")
        mat, present = _list_matrix(table.column(chosen), chosen, shown)
    else:
        mat, present = _columns_matrix(table, chosen, shown)
    finite = np.isfinite(mat).all(axis=1)
    labels = table.column(label_column).to_pylist()
    splits = table.column(split_column).to_pylist() if split_column else [None] * table.num_rows
    ids = table.column(id_column).to_pylist() if id_column else None
    rows: list[_Row] = []
    quarantined: list[tuple[str, str]] = []
    for i in range(table.num_rows):
        where = f"embeddings {shown} row {i}"
        uri = f"{source}#row={i}"
        label = _norm_label(labels[i], where)
        split = _norm_split(splits[i], where)
        if not present[i]:
            quarantined.append((uri, "missing vector"))
            continue
        if not finite[i]:
            quarantined.append((uri, "non-finite vector (NaN or inf)"))
            continue
        sid = _external_id(ids[i], where) if ids is not None else vector_sample_id(mat[i])
        rows.append(_Row(sid, uri, label, split, None, i))
    prepared = _prepare(rows, quarantined, source=f"embeddings {shown}", seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction,
                        same_content=lambda a, b: bool(np.array_equal(mat[a.index], mat[b.index])))
    producer = {"source": "precomputed", "uri": source, "column": chosen}

    def vectors() -> VectorTableRef:
        order = [r.index for r in prepared.kept]
        return write_vectors(store, [r.sid for r in prepared.kept], mat[order], producer, "embeddings")

    return _write(store, prepared, quarantined, shard_rows=shard_rows, source=source, vectors=vectors)


# ---------------------------------------------------------------------------------------------- digits
def render_digit_png(pixels: np.ndarray, image_size: int = 32,
                     resample: Literal["nearest", "bilinear"] = "nearest") -> bytes:
    """One 8×8 digits image (values 0..16) as RGB PNG bytes, the same bytes on every run.

    Values map to 0..255 (round(v·255/16): background black, ink white), are upscaled to ``image_size`` and
    encoded with fixed parameters and *no* compression (deflate level 0, stored blocks): compressed deflate
    streams differ between zlib and zlib-ng builds of Pillow, stored blocks do not, so the sample ids of the
    bundled pool do not depend on how Pillow was built.
    """
    from PIL import Image

    if resample not in ("nearest", "bilinear"):
        raise ValueError(f"resample must be 'nearest' or 'bilinear'; got {resample!r}")
    arr = np.asarray(pixels, dtype=np.float64)
    if arr.shape != (8, 8):
        raise ValueError(f"a digits image is 8×8; got shape {arr.shape}")
    gray = np.rint(np.clip(arr, 0, 16) * (255.0 / 16.0)).astype(np.uint8)
    method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.BILINEAR
    img = Image.fromarray(gray)  # uint8 2-D → mode "L"
    if image_size != 8:
        img = img.resize((image_size, image_size), method)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=0, optimize=False)
    return buf.getvalue()


def ingest_digits(store: ArtifactStore, *, image_size: int = 32, seed: int = 0, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, resample: Literal["nearest", "bilinear"] = "nearest",
                  shard_rows: int = DEFAULT_SHARD_ROWS) -> IngestResult:
    """The bundled default pool: scikit-learn's ``load_digits()`` (1797 real 8×8 handwritten digits, 10 classes;
    nothing is downloaded) rendered by :func:`render_digit_png`, label = the digit as a string, splits by
    :func:`assign_split`, ``source_uri`` = ``sklearn://datasets/load_digits#index=<i>``.

    Identical images would collapse (``n_duplicates_collapsed``); with scikit-learn 1.9.1's copy all 1797 are
    distinct, so it is 0 and the dataset has 1797 samples. The same arguments give the same dataset version
    (and the same shard and manifest artifacts) on every run.
    """
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be an integer in [8, 1024]; got {image_size!r}")
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)
    _check_shard_rows(shard_rows)
    digits = load_digits()
    rows = []
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        data = render_digit_png(pixels, image_size, resample)
        rows.append(_Row(sample_id(data), f"{_DIGITS_URI}#index={i}", str(int(target)), None, data))
    prepared = _prepare(rows, [], source=_DIGITS_URI, seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction)
    return _write(store, prepared, [], shard_rows=shard_rows, source=_DIGITS_URI)
