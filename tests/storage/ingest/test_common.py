"""Splits as a pure function of (sample id, seed)."""

from __future__ import annotations

import hashlib

import pytest

from storage.ingest import (
    assign_split,
)


def test_assign_split_is_a_pure_function_of_id_and_seed():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6000)]
    splits = [assign_split(s, 0, 0.2, 0.1) for s in ids]
    assert splits == [assign_split(s, 0, 0.2, 0.1) for s in reversed(ids)][::-1]
    counts = {k: splits.count(k) / len(ids) for k in ("train", "val", "test")}
    assert abs(counts["train"] - 0.7) < 0.03 and abs(counts["val"] - 0.2) < 0.03 and abs(counts["test"] - 0.1) < 0.03
    other = [assign_split(s, 1, 0.2, 0.1) for s in ids]
    assert other != splits  # the seed reshuffles
    # growing val only moves samples out of train
    wider = [assign_split(s, 0, 0.3, 0.1) for s in ids]
    assert all(a == b or (a == "train" and b == "val") for a, b in zip(splits, wider, strict=True))
    assert {assign_split(s, 0, 0.0, 0.0) for s in ids[:100]} == {"train"}


@pytest.mark.parametrize("kwargs", [dict(val_fraction=-0.1), dict(test_fraction=1.0),
                                    dict(val_fraction=0.5, test_fraction=0.5), dict(seed=1.5), dict(seed=True)])
def test_assign_split_rejects_bad_arguments(kwargs):
    args = dict(seed=0, val_fraction=0.15, test_fraction=0.15) | kwargs
    with pytest.raises(ValueError):
        assign_split("ab" * 32, **args)


def test_split_codes_are_split_of_for_every_id():
    """The writer's batched split assignment gives every sample the split ``assign_split`` gives it — ids with
    leading and trailing zero bytes included (a numpy ``S32`` scalar drops trailing NULs; the array must not)."""
    import numpy as np

    from storage.ingest.common import split_codes, split_of

    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (4000, 32), dtype=np.uint8)
    raw[:50, -3:] = 0
    raw[50:100, :3] = 0
    digests = raw.view("S32").ravel()
    for seed, val, test in ((0, 0.15, 0.15), (7, 0.0, 0.3), (3, 0.5, 0.0), (1, 0.0, 0.0)):
        got = split_codes(digests, seed, val, test)
        want = [split_of(row.tobytes().hex(), seed, val, test) for row in raw]
        assert [("train", "val", "test")[c - 1] for c in got.tolist()] == want
    assert split_codes(digests[:0], 0, 0.1, 0.1).shape == (0,)
