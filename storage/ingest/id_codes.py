"""The ingest's per-sample bookkeeping in ~45 bytes a sample (36 stored, plus the recent-id dicts): raw sample id
(32 bytes) → a small code.

Why: pass 1 of the streaming writer must recognise a sample it has seen (duplicates across the whole pool, and
conflicting labels or splits) while holding nothing else of it. A Python dict of 32-byte keys costs ~105 bytes a
sample (the bytes object, its hash slot and the int), ~1 GB at 10^7 samples. Here ids live in 256 buckets by their
first byte, each a sorted numpy array of raw ids (``S32``: every value is exactly 32 bytes, so numpy's NUL padding
never merges two) and a parallel ``uint32`` array of codes, plus a small dict of recent inserts that is merged into
the sorted arrays once it holds :data:`MERGE_EVERY` ids. A merge copies one bucket (1/256 of the ids), so the
transient peak stays small; a lookup is one dict probe and one binary search.

``setdefault_many`` (a replayed tar: 10^5 ids a call) does not insert into the buckets' sorted arrays, which copied
every bucket, i.e. the whole map (~360 MB at 10^7 ids), on each call: a call's new ids become one sorted *part*
(all buckets), each id with its *rank*, bucket · 2^32 + its insertion position in its bucket's arrays (which do not
change while parts are pending: a bucket's recent ids then go to a part too), and each bucket notes which of its
gaps hold part ids (a byte a gap). Parts are merged pairwise while the older one is not larger (at most log2 of
them; each id copied O(log) times), and into the buckets once they hold an eighth of the ids there (the map is
copied O(log) times in all: each id ~9 times). A lookup searches the parts only for an id whose gap holds some
(integer binary searches on ranks; ids compared where a part has ids of the same rank), and merging needs no search
of the buckets. Measured at 10^7 ids in calls of 10^5: about as fast as a copy per call (~8 s), ~65 MB more at the
peak (pending ranks and gaps); in calls of 10^4 (5·10^6 ids), 7.0 s instead of 11.8.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from storage.datasets import sample_id_array

__all__ = ["DIGEST", "MERGE_EVERY", "IdCodes", "digests_of_hex"]

DIGEST = np.dtype("S32")
_Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # sorted ids (S32), their codes (uint32), their ranks (int64)
MERGE_EVERY = 256  # recent ids per bucket before they are merged into its sorted arrays (≤ 65 536 in dicts)
_BUCKETS = 256


class IdCodes:
    """A map from raw sha256 digests (32 bytes) to non-negative codes below 2^32, compact for millions of ids."""

    def __init__(self, merge_every: int = MERGE_EVERY) -> None:
        self._merge_every = merge_every
        self._keys = [np.empty(0, DIGEST) for _ in range(_BUCKETS)]
        self._codes = [np.empty(0, np.uint32) for _ in range(_BUCKETS)]
        self._recent: list[dict[bytes, int]] = [{} for _ in range(_BUCKETS)]
        self._parts: list[_Part] = []  # setdefault_many's inserts not yet in the buckets: disjoint, sizes decreasing
        # per bucket while parts hold some of its ids: which gaps of its sorted arrays they fall in (a byte a gap)
        self._gaps: list[np.ndarray | None] = [None] * _BUCKETS
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _locate(self, bucket: int, key: bytes) -> tuple[int | None, np.ndarray | None, int]:
        """(code of ``key`` or None, the codes array holding it and its position there — None, -1 when it is
        recent or absent), looked up in the recent ids, the bucket's sorted arrays, then the parts."""
        code = self._recent[bucket].get(key)
        if code is not None:
            return code, None, -1
        probe = np.array(key, DIGEST)
        keys = self._keys[bucket]
        pos = int(np.searchsorted(keys, probe))
        if pos < len(keys) and bool(keys[pos:pos + 1] == probe):
            return int(self._codes[bucket][pos]), self._codes[bucket], pos
        gaps = self._gaps[bucket]
        if gaps is None or not gaps[pos]:
            return None, None, -1
        for keys, codes, _ in self._parts:
            pos = int(np.searchsorted(keys, probe))
            if pos < len(keys) and bool(keys[pos:pos + 1] == probe):
                return int(codes[pos]), codes, pos
        return None, None, -1

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
        found = self._locate(key[0], key)[0]
        if found is None:
            self._insert(key[0], key, code)
        return found

    def setdefault_many(self, keys: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """:meth:`setdefault` of each of ``keys`` (``S32``) in order, at once: each key's code before it (-1 for
        a key not seen before, which is then set to its code; a key repeated in ``keys`` sees its first
        occurrence's code). A binary search per bucket and part instead of one and a dict insert per key (a growth
        replays a tar of 100 000 known samples); the new keys become a part (see the module docstring)."""
        if len(keys) != len(codes):
            raise ValueError("setdefault_many needs one code per key")
        codes = np.asarray(codes, np.int64)
        if len(codes) and (codes.min() < 0 or codes.max() >= 2**32):
            raise ValueError("codes must fit 32 bits")
        keys = np.asarray(keys, DIGEST)
        out = np.full(len(keys), -1, np.int64)
        if not len(keys):
            return out
        self._park_recent()  # the recent ids of every bucket become a part: the buckets' arrays stay as they are
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        before = np.full(len(uniq), -1, np.int64)  # each unique key's code before this call
        ranks = np.empty(len(uniq), np.int64)
        maybe = np.zeros(len(uniq), bool)  # not in its bucket's arrays, but some part has ids in its gap
        firsts = uniq.view(np.uint8).reshape(-1, 32)[:, 0]
        edges = np.searchsorted(firsts, np.arange(_BUCKETS + 1))  # uniq is sorted: each bucket is one slice
        for bucket in np.flatnonzero(np.diff(edges)).tolist():
            lo, hi = int(edges[bucket]), int(edges[bucket + 1])
            stored = self._keys[bucket]
            pos = np.searchsorted(stored, uniq[lo:hi])
            ranks[lo:hi] = pos + (bucket << 32)
            found = pos < len(stored)
            found[found] = stored[pos[found]] == uniq[lo:hi][found]
            before[lo:hi][found] = self._codes[bucket][pos[found]]
            if self._gaps[bucket] is not None:
                maybe[lo:hi] = self._gaps[bucket][pos] & ~found
        maybe = np.flatnonzero(maybe)
        for part in self._parts if len(maybe) else ():
            at, hit = _place(part, uniq[maybe], ranks[maybe])
            before[maybe[hit]] = part[1][at[hit]]
        new = before < 0
        if new.any():  # uniq is sorted: so is the new part
            self._n += int(new.sum())
            self._add_part((uniq[new], codes[first[new]].astype(np.uint32), ranks[new]))
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
        found, holder, pos = self._locate(bucket, key)
        if found is None:
            self._insert(bucket, key, code)
        elif holder is None:
            self._recent[bucket][key] = code
        else:
            holder[pos] = code

    def _merge(self, bucket: int) -> None:
        """Merge the bucket's recent ids into its sorted arrays — or, while parts are pending (whose ranks are
        positions in those arrays), into a part."""
        recent = self._recent[bucket]
        if not recent:
            return
        if self._parts:
            self._park_recent([bucket])
            return
        new_keys, new_codes = self._recent_sorted(bucket)
        at = np.searchsorted(self._keys[bucket], new_keys)
        self._keys[bucket] = np.insert(self._keys[bucket], at, new_keys)
        self._codes[bucket] = np.insert(self._codes[bucket], at, new_codes)

    def _recent_sorted(self, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """The bucket's recent ids, sorted, and their codes, taken out of its dict."""
        recent = self._recent[bucket]
        new_keys = np.array(list(recent), DIGEST)
        new_codes = np.fromiter(recent.values(), np.uint32, len(recent))
        recent.clear()
        order = np.argsort(new_keys, kind="stable")
        return new_keys[order], new_codes[order]

    def _park_recent(self, buckets: list[int] | None = None) -> None:
        """Move the recent ids of ``buckets`` (default: all) into one part, ranked in their buckets' arrays."""
        parts = []
        for bucket in range(_BUCKETS) if buckets is None else buckets:
            if self._recent[bucket]:
                keys, codes = self._recent_sorted(bucket)
                parts.append((keys, codes, np.searchsorted(self._keys[bucket], keys) + (bucket << 32)))
        if parts:
            self._add_part(tuple(np.concatenate(columns) for columns in zip(*parts, strict=True)))

    def _add_part(self, part: _Part) -> None:
        """A new part (sorted ids, codes, ranks): merged with the newest part while that one is not larger (so
        sizes decrease: at most log2 parts, each id copied O(log) times), and all into the buckets once the parts
        hold an eighth of the ids there (each id copied ~9 times in all) — not the whole map copied once a call.
        Marks the gaps of each bucket the part's ids fall in."""
        parts = self._parts
        parts.append(part)
        ranks = part[2]
        edges = np.searchsorted(ranks >> 32, np.arange(_BUCKETS + 1))
        for bucket in np.flatnonzero(np.diff(edges)).tolist():
            if self._gaps[bucket] is None:
                self._gaps[bucket] = np.zeros(len(self._keys[bucket]) + 1, bool)
            self._gaps[bucket][ranks[edges[bucket]:edges[bucket + 1]] - (bucket << 32)] = True
        while len(parts) > 1 and len(parts[-2][0]) <= len(parts[-1][0]):
            parts.append(_merged(*parts.pop(-2), *parts.pop()))  # (parts[-2], then the newest)
        pending = sum(len(p[0]) for p in parts)
        if pending >= max(self._merge_every, (self._n - pending) >> 3):
            self._merge_parts()

    def _merge_parts(self) -> None:
        """Insert every part into the buckets' sorted arrays (one copy of the map): ranks are positions there."""
        if not self._parts:
            return
        while len(self._parts) > 1:
            self._parts.append(_merged(*self._parts.pop(-2), *self._parts.pop()))
        keys, codes, ranks = self._parts.pop()
        self._gaps = [None] * _BUCKETS
        edges = np.searchsorted(ranks >> 32, np.arange(_BUCKETS + 1))
        for bucket in np.flatnonzero(np.diff(edges)).tolist():
            lo, hi = int(edges[bucket]), int(edges[bucket + 1])
            at = ranks[lo:hi] - (bucket << 32)
            self._keys[bucket] = np.insert(self._keys[bucket], at, keys[lo:hi])
            self._codes[bucket] = np.insert(self._codes[bucket], at, codes[lo:hi])

    def freeze(self) -> None:
        """Merge every recent insert and part (then :meth:`codes_of` and :meth:`buckets` see sorted arrays only)."""
        if self._parts:
            self._park_recent()
            self._merge_parts()
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


def _place(part: _Part, keys: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where sorted ``keys`` (with their ``ranks``) go in ``part``, and whether each is there: integer binary searches
    on the part's ranks (a key can only meet part ids of the same rank: the same gap of its bucket), the ids
    compared only where the part has some of the same rank."""
    lo = np.searchsorted(part[2], ranks)
    same_gap = np.flatnonzero(part[2][np.minimum(lo, len(part[2]) - 1)] == ranks)
    found = np.zeros(len(keys), bool)
    if len(same_gap):
        where = np.searchsorted(part[0], keys[same_gap])
        lo[same_gap] = where
        hit = where < len(part[0])
        found[same_gap[hit]] = part[0][where[hit]] == keys[same_gap[hit]]
    return lo, found


def _merged(keys: np.ndarray, codes: np.ndarray, ranks: np.ndarray, new_keys: np.ndarray, new_codes: np.ndarray,
            new_ranks: np.ndarray) -> _Part:
    """Two disjoint parts as one (the first's arrays with the second's inserted where they sort)."""
    at = _place((keys, codes, ranks), new_keys, new_ranks)[0]
    return np.insert(keys, at, new_keys), np.insert(codes, at, new_codes), np.insert(ranks, at, new_ranks)


def _check(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError(f"sample id digests are 32 raw bytes; got {key!r:.80}")


def digests_of_hex(hex_ids: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-character hex ids (str, or an Arrow string array: no Python str per id) as an ``S32`` array of raw
    digests (one conversion, no per-id objects kept)."""
    text = sample_id_array(hex_ids).tobytes().decode("ascii") if isinstance(hex_ids, pa.Array | pa.ChunkedArray) \
        else "".join(hex_ids)
    return np.frombuffer(bytes.fromhex(text), DIGEST) if text else np.empty(0, DIGEST)
