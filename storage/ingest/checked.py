"""Which images the store has already seen pass the decode check, so a grown pool re-checks only its new files.

Why: the full decode check (:func:`~storage.ingest.common.decode_problem`, every frame decoded) is ~0.7 ms of the
~1 ms an ingest spends per ~56 KB JPEG; a nightly run on a pool grown by 1 % would otherwise decode the other
99 % again. A sample id is the sha256 of the file's bytes, so "this id passed the check" is a fact about the
bytes, not about a path or a timestamp: an unchanged file (same bytes) is skipped exactly, and a file rewritten
in place (new bytes, new id) is checked again, even when its size and modification time were kept. Nothing here
is a metadata heuristic, and the dataset an ingest writes is byte-identical with or without this record.

The record is kept per **check policy** — the check's version, ``max_pixels``, the Pillow version and the two
Pillow globals that change its verdict (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) — so a
Pillow upgrade or another ``max_pixels`` checks every image again.

Layout: ``catalog/decode-checked/<policy digest>/<sha256>.ids``, one immutable file per ingest that checked new
images: a header line then the new passing ids, sorted, 32 raw bytes each (10^6 ids: 32 MB). The file's name is
the sha256 of its bytes; a file that does not hash to its name (corrupted, or planted) is ignored with a warning,
and its images are simply checked again. Quarantined files are not recorded: they are checked again on each run
(they are few, and a transient read problem must not stick). Trust: whoever can write to the store can already
write its shards; this record lets them skip no more than the check of images whose bytes they name.

Memory: 32 bytes per recorded id, loaded once per ingest (twice that while the files are merged at load): 320 MB
for a pool of 10^7 images, beside the writer's ~45 bytes of bookkeeping per sample.

Not done: compaction (after many growth runs, one file per run is listed and read: 365 nightly files of 1 % each
cost one listing and ~4 reads of the pool's size in ids).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading

import numpy as np

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactStore
from storage.errors import StorageError
from storage.ingest.common import DEFAULT_MAX_PIXELS, decode_problem, read_record

__all__ = ["CHECKED_PREFIX", "CheckedImages", "check_policy"]

CHECKED_PREFIX = "catalog/decode-checked"
CHECK_VERSION = "decode_problem/1"  # bump when decode_problem's verdicts change
_HEADER = b"skmm-decode-checked/1\n"
_DIGEST = np.dtype("S32")  # raw sha256; every value is exactly 32 bytes, so numpy's NUL padding never merges two
_NAME = re.compile(r"^([0-9a-f]{64})\.ids$")
log = logging.getLogger(__name__)


def check_policy(max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Everything the decode check's verdict depends on besides the bytes (see the module docstring)."""
    import PIL
    from PIL import Image, ImageFile

    return {"check": CHECK_VERSION, "max_pixels": int(max_pixels), "pillow": PIL.__version__,
            "pillow_max_image_pixels": Image.MAX_IMAGE_PIXELS,
            "pillow_load_truncated_images": bool(ImageFile.LOAD_TRUNCATED_IMAGES)}


class CheckedImages:
    """The decode check with a memory: ``check(data)`` → (sample id, None) or (None, quarantine reason).

    Thread-safe (the sources call it from their read pools). The ids known to pass under this policy are read on
    first use, from one listing; ids that pass now are recorded by :meth:`commit`, which the sources call only
    after the dataset was published. ``n_checked`` / ``n_known``: images decoded here / skipped as known.
    """

    def __init__(self, store: ArtifactStore | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.store, self.max_pixels = store, max_pixels
        self.policy = check_policy(max_pixels)
        digest = hashlib.sha256(canonical_json(self.policy).encode()).hexdigest()
        self.prefix = f"{CHECKED_PREFIX}/{digest}"
        self._lock = threading.Lock()
        self._known: np.ndarray | None = None
        self._fresh = bytearray()  # raw digests of the images decoded and passed here, 32 bytes each
        self.n_checked = self.n_known = 0

    def __repr__(self) -> str:
        return f"CheckedImages({self.store!r}, max_pixels={self.max_pixels})"

    def _load(self) -> np.ndarray:
        known = self._known  # set once, then only read: no lock on the per-image path
        if known is not None:
            return known
        with self._lock:
            if self._known is not None:
                return self._known
            parts = [np.empty(0, _DIGEST)]
            if self.store is not None:
                rels = [r for r in self.store.list_paths(self.prefix, "*.ids") if _NAME.match(r.rsplit("/", 1)[-1])]
                for rel in rels:
                    parts.append(self._read(rel))
            known = np.concatenate(parts)
            known.sort()
            self._known = known
            return known

    def _read(self, rel: str) -> np.ndarray:
        """One file's ids, or none (with a warning) when it is unreadable or does not hash to its name."""
        where = self.store.uri(rel)
        data = read_record(self.store, rel, "decode-check record", "its images are checked again", log)
        if data is None:
            return np.empty(0, _DIGEST)
        name = _NAME.match(rel.rsplit("/", 1)[-1])
        body = data[len(_HEADER):]
        if (not data.startswith(_HEADER) or len(body) % 32 or name is None
                or hashlib.sha256(data).hexdigest() != name[1]):
            log.warning("decode-check record %s is corrupted (its bytes do not hash to its name): ignored, its "
                        "images are checked again", where)
            return np.empty(0, _DIGEST)
        return np.frombuffer(body, _DIGEST).copy()

    def known(self, digest: bytes) -> bool:
        """Whether the image whose raw sha256 is ``digest`` is recorded as passing under this policy."""
        known, key = self._load(), np.array(digest, _DIGEST)
        pos = int(np.searchsorted(known, key))
        return pos < len(known) and bool(known[pos] == key)  # as arrays: an item would lose trailing NUL bytes

    def check(self, data: bytes) -> tuple[str | None, str | None]:
        """(sample id, None) for a good image, (None, reason) for one to quarantine; decodes only unknown bytes."""
        digest = hashlib.sha256(data).digest() if data else b""
        if data and self.known(digest):
            with self._lock:
                self.n_known += 1
            return digest.hex(), None
        problem = decode_problem(data, self.max_pixels)
        with self._lock:
            self.n_checked += 1
            if problem is None:
                self._fresh += digest
        return (None, problem) if problem else (digest.hex(), None)

    def commit(self) -> str | None:
        """Record the ids that passed in this run and were not known (one immutable file); its URI, or None."""
        with self._lock:
            fresh, self._fresh = self._fresh, bytearray()
        if self.store is None or not fresh:
            return None
        ids = np.frombuffer(fresh, _DIGEST)  # a writable view: sorted in place, no copy of a pool's worth of ids
        ids.sort()
        repeated = ids[1:] == ids[:-1]
        if repeated.any():
            ids = ids[np.concatenate(([True], ~repeated))]
        del repeated
        data = b"".join((_HEADER, memoryview(ids).cast("B")))  # one copy: the record's bytes
        rel = f"{self.prefix}/{hashlib.sha256(data).hexdigest()}.ids"
        try:
            uri = self.store.put_immutable(rel, data)
        except StorageError as exc:
            if exc.transient or "refusing to overwrite" not in str(exc):
                raise
            return self.store.uri(rel)  # the same ids were recorded already (same name, same bytes)
        with self._lock:
            self._known = None  # a later check() lists the record again, this file included
        log.info("decode check: %d image(s) decoded, %d known and skipped; %d new id(s) recorded in %s",
                 self.n_checked, self.n_known, len(ids), uri)
        return uri
