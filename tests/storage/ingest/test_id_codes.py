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


def _stored_arrays(codes: IdCodes) -> list[np.ndarray]:
    """Every array the map holds (its sorted buckets and any pending parts)."""
    return [*codes._keys, *codes._codes, *(a for part in getattr(codes, "_parts", []) for a in part)]


def test_setdefault_many_copies_the_map_an_amortised_few_times_not_once_a_call():
    """A growth replays ~100 tars of 10^5 members, one call each: inserting each call's new ids into the sorted
    buckets copied every bucket (the whole map, ~360 MB at 10^7 samples) once a tar. Counted: the bytes of the
    arrays each call leaves in the map that were not there before it — a few times the map, not once a call."""
    codes, rng = IdCodes(), np.random.default_rng(0)
    copied, calls = 0, 100
    for _ in range(calls):
        before = _stored_arrays(codes)  # held: their ids are not reused
        seen = {id(a) for a in before}
        keys = np.frombuffer(rng.bytes(32 * 2000), DIGEST)
        assert (codes.setdefault_many(keys, np.arange(2000)) == -1).all()
        copied += sum(a.nbytes for a in _stored_arrays(codes) if id(a) not in seen)
    final = sum(a.nbytes for a in _stored_arrays(codes))
    assert len(codes) == calls * 2000 and copied < 16 * final, copied / final


@pytest.mark.parametrize("seed", range(20))
def test_interleaved_calls_match_a_dict(seed: int) -> None:
    """Many setdefault_many calls (their parts pending, merged pairwise and into the buckets) interleaved with the
    one-key calls (recent ids, updates of ids in parts) and the bulk readers, against a plain dict."""
    rng = random.Random(seed)
    codes, plain = IdCodes(merge_every=rng.choice([1, 3, 256])), {}
    pool = [digest(rng.randrange(3000)) for _ in range(1500)]
    for _ in range(60):
        op = rng.random()
        if op < 0.5:
            batch = rng.sample(pool, rng.randrange(1, 80))
            values = np.array([rng.randrange(2**32) for _ in batch])
            expected = []
            for key, value in zip(batch, values.tolist(), strict=True):
                expected.append(plain.setdefault(key, value) if key in plain else -1)
                plain.setdefault(key, value)
            assert codes.setdefault_many(np.array(batch, DIGEST), values).tolist() == expected
        elif op < 0.8:
            for key in rng.sample(pool, 10):
                value = rng.randrange(2**32)
                found = codes.setdefault(key, value)
                assert found == plain.get(key)
                plain.setdefault(key, value)
        elif op < 0.95:
            for key in rng.sample(pool, 5):
                value = rng.randrange(2**32)
                codes.set(key, value)
                plain[key] = value
        else:
            assert codes.codes_of(np.array(sorted(plain), DIGEST)).tolist() == [plain[k] for k in sorted(plain)]
        assert len(codes) == len(plain)
    assert all(codes.get(k) == v for k, v in plain.items())
    keys = np.concatenate([k for k, _ in codes.buckets()])
    assert [k.ljust(32, b"\0") for k in keys.tolist()] == sorted(plain)
