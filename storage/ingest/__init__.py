"""Turning a user's pool into a dataset in the store: the pure logic behind the pipeline's "ingest" stage.

One module per source kind, one result (:class:`IngestResult`):

- :func:`ingest_image_folder` (:mod:`.folder`) — ``folder/<label>/**/<image>`` on the local disk, listed by
  :mod:`.listing` (the same listing the cache fingerprint walks);
- :func:`ingest_manifest` (:mod:`.manifest`) — a CSV/TSV/Parquet table of (path or url, label[, split]), files
  local or at any fsspec URL, read with bounded concurrency;
- :func:`ingest_webdataset` (:mod:`.webdataset`) — WebDataset tar shards (img2dataset / DataComp layout), local or
  remote, each tar streamed once;
- :func:`ingest_embeddings` (:mod:`.embeddings`) — a Parquet table of precomputed embeddings (held in memory:
  it is a table of vectors);
- :func:`ingest_digits` (:mod:`.digits`) — the bundled default pool, scikit-learn's 1797 handwritten digits.

Every image source streams through :class:`~storage.ingest.writer.DatasetWriter`: each file or object is read
once, memory stays O(shard) plus ~150 bytes of bookkeeping per sample (about 1 KB with the file listing,
measured), duplicates collapse across the whole pool, the pool-level checks run before anything is published,
and the shards and manifest are byte-identical to
:func:`storage.datasets.write_samples` of the same rows. :mod:`.checked` remembers which image bytes passed the
decode check, so a grown pool decodes only its new files; :mod:`.reuse` remembers which files (by path and stat, or
URL and ETag) held which sample, so a grown folder or manifest reads only its new or changed files and takes the
others' bytes from the previous dataset's shards. :mod:`.fingerprint` describes a source from metadata for
the cache key; :mod:`.common` holds the errors, splits, labels and the decode check shared by all.
"""

from storage.ingest.common import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SHARD_ROWS,
    IMAGE_EXTENSIONS,
    QUARANTINE_SCHEMA,
    IngestResult,
    SourceError,
    SourceNotFoundError,
    assign_split,
    decode_problem,
)
from storage.ingest.digits import ingest_digits, render_digit_png
from storage.ingest.embeddings import ingest_embeddings
from storage.ingest.fingerprint import fingerprint
from storage.ingest.folder import ingest_image_folder
from storage.ingest.listing import open_image_folder
from storage.ingest.manifest import ingest_manifest
from storage.ingest.webdataset import ingest_webdataset, resolve_shards

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SHARD_ROWS",
    "IMAGE_EXTENSIONS",
    "QUARANTINE_SCHEMA",
    "IngestResult",
    "SourceError",
    "SourceNotFoundError",
    "assign_split",
    "decode_problem",
    "fingerprint",
    "ingest_digits",
    "ingest_embeddings",
    "ingest_image_folder",
    "ingest_manifest",
    "ingest_webdataset",
    "open_image_folder",
    "render_digit_png",
    "resolve_shards",
]
