"""The ingest's compact id → code map (storage/ingest/id_codes.py) against a plain dict, across bucket merges."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from storage.ingest.id_codes import DIGEST, IdCodes, digests_of_hex


def digest(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def test_matches_a_dict_through_inserts_updates_and_merges():
    codes, plain = IdCodes(merge_every=3), {}  # tiny merges: most ids sit in the sorted arrays
    rng = np.random.default_rng(0)
    for step in range(3000):
        key = digest(int(rng.integers(1200)))
        if step % 5 == 0:
            assert codes.get(key) == plain.get(key)
        value = int(rng.integers(2**32))
        codes.set(key, value)
        plain[key] = value
    assert len(codes) == len(plain)
    assert all(codes.get(k) == v for k, v in plain.items())
    assert codes.get(digest(-1)) is None
    keys = np.concatenate([k for k, _ in codes.buckets()])
    assert [k.ljust(32, b"\0") for k in keys.tolist()] == sorted(plain)  # buckets in id order, each sorted
    assert codes.codes_of(keys).tolist() == [plain[k] for k in sorted(plain)]


def test_ids_ending_in_nul_bytes_stay_distinct():
    base = b"\x07" * 30
    a, b, c = base + b"\x00\x00", base + b"\x00\x01", base + b"\x01\x00"
    codes = IdCodes(merge_every=1)
    for i, key in enumerate((a, b, c)):
        codes.set(key, i)
    assert [codes.get(k) for k in (a, b, c)] == [0, 1, 2]
    assert codes.codes_of(np.array(sorted([a, b, c]), DIGEST)).tolist() == [0, 1, 2]


def test_bucket_lookups_and_hex_conversion():
    codes = IdCodes()
    ids = [hashlib.sha256(bytes([i])).hexdigest() for i in range(50)]
    for i, sid in enumerate(ids):
        codes.set(bytes.fromhex(sid), i)
    wanted = sorted(ids)
    assert codes.codes_of(digests_of_hex(wanted)).tolist() == [ids.index(s) for s in wanted]
    with pytest.raises(KeyError):
        codes.codes_of(np.array([digest(10**6)], DIGEST))
    with pytest.raises(ValueError, match="32 raw bytes"):
        codes.set(b"short", 1)
    with pytest.raises(ValueError, match="32 bits"):
        codes.set(digest(1), 2**32)


@pytest.mark.parametrize("merge_every", [1, 1000])  # ids in the sorted arrays, or still in the recent dicts
def test_setdefault_inserts_once_and_reports_the_first_code(merge_every):
    codes = IdCodes(merge_every=merge_every)
    assert codes.setdefault(digest(1), 5) is None and codes.setdefault(digest(2), 6) is None
    assert codes.setdefault(digest(1), 9) == 5 and codes.setdefault(digest(2), 9) == 6 and len(codes) == 2
    codes.set(digest(1), 7)
    assert codes.get(digest(1)) == 7


@pytest.mark.parametrize("seed", range(40))
def test_setdefault_many_is_setdefault_of_each_key_in_order(seed: int) -> None:
    """Against the one-key path: keys seen before, new keys, keys repeated within the call, any merge cadence."""
    rng = random.Random(seed)
    pool = [hashlib.sha256(str(rng.randrange(60 if seed % 2 else 5000)).encode()).digest()
            for _ in range(rng.randrange(1, 400))]
    one, many = IdCodes(merge_every=rng.choice([1, 3, 256])), IdCodes(merge_every=rng.choice([1, 3, 256]))
    for key in pool[: len(pool) // 3]:
        code = rng.randrange(100)
        one.setdefault(key, code)
        many.setdefault(key, code)
    batch = pool[len(pool) // 3:] + rng.sample(pool, min(10, len(pool)))
    codes = np.array([rng.randrange(100) for _ in batch])
    expected = [one.setdefault(key, int(code)) for key, code in zip(batch, codes, strict=True)]
    assert many.setdefault_many(np.array(batch, DIGEST), codes).tolist() == [-1 if e is None else e
                                                                             for e in expected]
    assert len(one) == len(many) and all(one.get(k) == many.get(k) for k in pool)
    for key in (hashlib.sha256(str(rng.randrange(9000)).encode()).digest() for _ in range(20)):
        code = rng.randrange(100)
        assert one.setdefault(key, code) == many.setdefault(key, code)  # still one map after the call
