"""The ingest's per-sample bookkeeping in ~45 bytes a sample (36 stored, plus the recent-id dicts): raw sample id
(32 bytes) → a small code.

Why: pass 1 of the streaming writer must recognise a sample it has seen (duplicates across the whole pool, and
conflicting labels or splits) while holding nothing else of it. A Python dict of 32-byte keys costs ~105 bytes a
sample (the bytes object, its hash slot and the int), ~1 GB at 10^7 samples. Here ids live in 256 buckets by their
first byte, each a sorted numpy array of raw ids (``S32``: every value is exactly 32 bytes, so numpy's NUL padding
never merges two) and a parallel ``uint32`` array of codes, plus a small dict of recent inserts that is merged into
the sorted arrays once it holds :data:`MERGE_EVERY` ids. A merge copies one bucket (1/256 of the ids), so the
transient peak stays small; a lookup is one dict probe and one binary search.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from storage.datasets import sample_id_array

__all__ = ["DIGEST", "MERGE_EVERY", "IdCodes", "digests_of_hex"]

DIGEST = np.dtype("S32")
MERGE_EVERY = 256  # recent ids per bucket before they are merged into its sorted arrays (≤ 65 536 in dicts)
_BUCKETS = 256


class IdCodes:
    """A map from raw sha256 digests (32 bytes) to non-negative codes below 2^32, compact for millions of ids."""

    def __init__(self, merge_every: int = MERGE_EVERY) -> None:
        self._merge_every = merge_every
        self._keys = [np.empty(0, DIGEST) for _ in range(_BUCKETS)]
        self._codes = [np.empty(0, np.uint32) for _ in range(_BUCKETS)]
        self._recent: list[dict[bytes, int]] = [{} for _ in range(_BUCKETS)]
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _find(self, bucket: int, key: bytes) -> int:
        """Position of ``key`` in the bucket's sorted arrays, or -1."""
        keys = self._keys[bucket]
        probe = np.array(key, DIGEST)
        pos = int(np.searchsorted(keys, probe))
        return pos if pos < len(keys) and bool(keys[pos:pos + 1] == probe) else -1

    def _locate(self, bucket: int, key: bytes) -> tuple[int | None, int]:
        """(code of ``key`` or None, its position in the sorted arrays or -1 when it is recent or absent)."""
        code = self._recent[bucket].get(key)
        if code is not None:
            return code, -1
        pos = self._find(bucket, key)
        return (None, -1) if pos < 0 else (int(self._codes[bucket][pos]), pos)

    def _insert(self, bucket: int, key: bytes, code: int) -> None:
        """Add a new ``key`` to its bucket's recent ids, merging them into the sorted arrays when they are many."""
        if not 0 <= code < 2**32:
            raise ValueError(f"code {code} does not fit 32 bits")
        recent = self._recent[bucket]
        recent[key] = code
        self._n += 1
        if len(recent) >= self._merge_every:
            self._merge(bucket)

    def get(self, key: bytes) -> int | None:
        """The code of ``key``, or None if it was never set."""
        _check(key)
        return self._locate(key[0], key)[0]

    def setdefault(self, key: bytes, code: int) -> int | None:
        """The code of ``key`` if it was set (left as it is), else None after setting it to ``code``: the writer's
        one lookup per sample."""
        _check(key)
        found, _ = self._locate(key[0], key)
        if found is None:
            self._insert(key[0], key, code)
        return found

    def setdefault_many(self, keys: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """:meth:`setdefault` of each of ``keys`` (``S32``) in order, at once: each key's code before it (-1 for
        a key not seen before, which is then set to its code; a key repeated in ``keys`` sees its first
        occurrence's code). One sorted merge per bucket instead of a binary search and a dict insert per key: a
        growth replays a tar of 100 000 known samples."""
        if len(keys) != len(codes):
            raise ValueError("setdefault_many needs one code per key")
        codes = np.asarray(codes, np.int64)
        if len(codes) and (codes.min() < 0 or codes.max() >= 2**32):
            raise ValueError("codes must fit 32 bits")
        keys = np.asarray(keys, DIGEST)
        out = np.full(len(keys), -1, np.int64)
        if not len(keys):
            return out
        self.freeze()
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        before = np.full(len(uniq), -1, np.int64)  # each unique key's code before this call
        firsts = uniq.view(np.uint8).reshape(-1, 32)[:, 0]
        edges = np.searchsorted(firsts, np.arange(_BUCKETS + 1))  # uniq is sorted: each bucket is one slice
        for bucket in np.flatnonzero(np.diff(edges)):
            lo, hi = int(edges[bucket]), int(edges[bucket + 1])
            stored = self._keys[bucket]
            pos = np.searchsorted(stored, uniq[lo:hi])
            found = pos < len(stored)
            found[found] = stored[pos[found]] == uniq[lo:hi][found]
            before[lo:hi][found] = self._codes[bucket][pos[found]]
            new = ~found
            if new.any():  # uniq is sorted, so the new keys go in at their (ascending) positions
                self._keys[bucket] = np.insert(stored, pos[new], uniq[lo:hi][new])
                self._codes[bucket] = np.insert(self._codes[bucket], pos[new],
                                                codes[first[lo:hi][new]].astype(np.uint32))
                self._n += int(new.sum())
        out = before[inverse]
        repeat = (out < 0) & (np.arange(len(keys)) != first[inverse])  # a later copy of a key new in this call
        out[repeat] = codes[first[inverse[repeat]]]
        return out

    def set(self, key: bytes, code: int) -> None:
        """Set (insert or overwrite) the code of ``key``."""
        _check(key)
        if not 0 <= code < 2**32:
            raise ValueError(f"code {code} does not fit 32 bits")
        bucket = key[0]
        found, pos = self._locate(bucket, key)
        if found is None:
            self._insert(bucket, key, code)
        elif pos < 0:
            self._recent[bucket][key] = code
        else:
            self._codes[bucket][pos] = code

    def _merge(self, bucket: int) -> None:
        recent = self._recent[bucket]
        if not recent:
            return
        new_keys = np.array(list(recent), DIGEST)
        new_codes = np.fromiter(recent.values(), np.uint32, len(recent))
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_codes = new_keys[order], new_codes[order]
        at = np.searchsorted(self._keys[bucket], new_keys)
        self._keys[bucket] = np.insert(self._keys[bucket], at, new_keys)
        self._codes[bucket] = np.insert(self._codes[bucket], at, new_codes)
        recent.clear()

    def freeze(self) -> None:
        """Merge every recent insert (then :meth:`codes_of` and :meth:`buckets` see sorted arrays only)."""
        for bucket in range(_BUCKETS):
            self._merge(bucket)

    def buckets(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(sorted raw ids, their codes — a view to update in place) per non-empty bucket, in id order."""
        self.freeze()
        for keys, codes in zip(self._keys, self._codes, strict=True):
            if len(keys):
                yield keys, codes

    def codes_of(self, sorted_keys: np.ndarray) -> np.ndarray:
        """The codes of ``sorted_keys`` (an ``S32`` array, ascending), all of which must be present."""
        self.freeze()
        out = np.empty(len(sorted_keys), np.uint32)
        if not len(sorted_keys):
            return out
        firsts = sorted_keys.view(np.uint8).reshape(-1, 32)[:, 0]
        for bucket in np.unique(firsts):
            rows = np.flatnonzero(firsts == bucket)
            keys = self._keys[bucket]
            pos = np.searchsorted(keys, sorted_keys[rows])
            pos_ok = np.minimum(pos, max(len(keys) - 1, 0))
            if not len(keys) or not np.array_equal(keys[pos_ok], sorted_keys[rows]):
                raise KeyError("some sample ids were never recorded")
            out[rows] = self._codes[bucket][pos_ok]
        return out


def _check(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError(f"sample id digests are 32 raw bytes; got {key!r:.80}")


def digests_of_hex(hex_ids: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-character hex ids (str, or an Arrow string array: no Python str per id) as an ``S32`` array of raw
    digests (one conversion, no per-id objects kept)."""
    text = sample_id_array(hex_ids).tobytes().decode("ascii") if isinstance(hex_ids, pa.Array | pa.ChunkedArray) \
        else "".join(hex_ids)
    return np.frombuffer(bytes.fromhex(text), DIGEST) if text else np.empty(0, DIGEST)
