"""Which artifacts this machine has already hashed, by the state the store reports for them, so a rerun hashes only
what changed (the way DVC and git trust a file's stat instead of reading it again).

Why: a Prefect cache hit must not hide a deleted or damaged artifact, so every artifact a hit names is checked
against its sha256 (:func:`tasks.cache.accept_cached`). At 10^7 samples a nightly run's hits name the kept runs'
feature and sketch tables (~30 GB): hashing them every night — downloading them, on an object store — is the
largest O(pool) cost left in a run that does only the new work.

An object's **state** is what the store says about it without reading it: on a local store its stat (size, mtime,
ctime, inode, device, mode; any write changes the ctime, which no user can set back); on S3, GCS and Azure its size
and content tags (S3's ETag is a digest of the bytes, GCS's generation and Azure's etag change with every write).
After an object hashed to its ref, its state is recorded here; while the store reports the same state, the object
is taken as verified without being read. Anything else is hashed as before: another state, an object changed less
than 2 s before its stat (timestamps are coarse: git's "racily clean" rule), a store that gives no content tag
(plain HTTP), or a memo that is off. The state is the 16-byte key the ingest gives a source file or object for the
same purpose (:func:`storage.ingest.reuse.file_key`, :func:`~storage.ingest.reuse.object_key`: one rule for both).

The memo is **machine-local** (``SKMM_CACHE_DIR``, default ``$XDG_CACHE_HOME/skmm`` or ``~/.cache/skmm``; ``off``
turns it off), never in the store: whoever can write a shared store could otherwise write a forged object and a
record vouching for it. One empty file per (store, object, ref, state), named by their digest and written
atomically; a lost or half-written memo costs a hash, never a wrong answer, so the folder may be deleted at any
time (entries are never pruned: an empty file per artifact state hashed). What it does not catch: a local
file whose bytes change while its stat does not (bit rot under an unchanged inode), as with DVC and git.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import stat
import time

from storage.artifacts import ArtifactRef, ArtifactStore, write_local_atomically
from storage.ingest.reuse import file_key, object_key

__all__ = ["VerifyMemo", "memo_dir", "object_state", "verify_remembered"]

_HEADER = b"skmm-verified/1\0"
_now_ns = time.time_ns  # the clock the settle rule reads (a test may move it)


def memo_dir() -> pathlib.Path | None:
    """The memo's folder on this machine (``SKMM_CACHE_DIR``/verified; XDG's cache folder by default), or None
    when ``SKMM_CACHE_DIR`` is ``off``."""
    root = os.environ.get("SKMM_CACHE_DIR", "").strip()
    if root.lower() == "off":
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "skmm")
    return pathlib.Path(root) / "verified"


def object_state(store: ArtifactStore, ref: ArtifactRef, now_ns: int | None = None) -> str | None:
    """What ``store`` says about ``ref``'s object without reading it (see the module docstring), or None when that
    cannot vouch for its bytes: changed too recently, not a regular file, no content tag, or any error."""
    try:
        target = store._path(store._rel_from_uri(ref.uri))
        if store.is_local:
            st = os.stat(target)
            key = file_key(target, st, _now_ns() if now_ns is None else now_ns) if stat.S_ISREG(st.st_mode) else None
        else:
            with contextlib.suppress(Exception):
                store.fs.invalidate_cache(target)  # a listing's cached info may predate a write
            key = object_key(ref.uri, store.fs.info(target))
        return key.hex() if key is not None else None
    except Exception:
        return None


class VerifyMemo:
    """The states in which objects hashed to their refs, as files under ``root``."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = pathlib.Path(root)

    def _entry(self, store: ArtifactStore, ref: ArtifactRef, state: str) -> pathlib.Path:
        key = "\0".join((store.url, ref.uri, ref.sha256, str(ref.size), state)).encode("utf-8")
        name = hashlib.sha256(_HEADER + key).hexdigest()
        return self.root / name[:2] / name

    def holds(self, store: ArtifactStore, ref: ArtifactRef, state: str) -> bool:
        """Whether ``ref``'s object hashed to it in ``state`` before."""
        return self._entry(store, ref, state).is_file()

    def add(self, store: ArtifactStore, ref: ArtifactRef, state: str) -> None:
        """Record that ``ref``'s object hashed to it in ``state`` (atomically; a failure to record is ignored)."""
        with contextlib.suppress(OSError):
            write_local_atomically(self._entry(store, ref, state), b"")


def verify_remembered(store: ArtifactStore, ref: ArtifactRef, memo: VerifyMemo | None = None) -> bool:
    """Raise (ArtifactNotFoundError, ArtifactCorruptedError, StoreUnavailableError) unless ``ref``'s object is in
    ``store`` with its size and sha256; hash it only when this machine has not already hashed it in the state the
    store reports now (``memo``: default :func:`memo_dir`'s). Returns whether it was hashed."""
    if memo is None:
        root = memo_dir()
        memo = VerifyMemo(root) if root is not None else None
    state = object_state(store, ref) if memo is not None else None
    if state is not None and memo.holds(store, ref, state):
        return False
    store.verify(ref)
    if state is not None and object_state(store, ref) == state:  # unchanged while it was hashed
        memo.add(store, ref, state)
    return True
