"""The embed stage's feature spec carries precision and block size (issue 12): features computed at another
precision or block shape are never reused for, or mixed with, the default ones; the default spec, and so its
tables and keys, are unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from helpers import random_png

from skmm.models.clip import ClipSpec, default_block_rows
from storage.datasets import VectorTableRef, read_vectors, write_samples
from tasks.embed import embed_model, feature_spec, run_embed
from tasks.store import open_store, store_spec

MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}


POOL = sorted(({"data": random_png(i), "label": str(i % 2), "source_uri": f"mem://pool/{i}.png"} for i in range(20)),
              key=lambda r: hashlib.sha256(r["data"]).hexdigest())



def vectors(store: dict, ref: dict) -> tuple[VectorTableRef, np.ndarray]:
    table = VectorTableRef.from_dict(ref)
    return table, read_vectors(open_store(store), table)[1]


def test_feature_spec_and_task_model(tmp_path):
    assert embed_model(MODEL, "cpu") is MODEL  # the default CPU config: the same cache keys as before
    assert feature_spec(MODEL) == ClipSpec("skmm-tiny-vit")
    assert feature_spec(MODEL).to_dict() == ClipSpec("skmm-tiny-vit").to_dict()  # no block_rows key
    spec = feature_spec({**MODEL, "precision": "bf16", "block_rows": 8})
    assert (spec.precision, spec.block_rows) == ("bf16", 8)
    assert embed_model({**MODEL, "block_rows": 8}, "cpu") == {**MODEL, "block_rows": 8}
    if torch.cuda.is_available():  # the machine's device picks the block; the task only follows the config
        assert embed_model(MODEL, "cuda") == {**MODEL, "block_rows": default_block_rows("cuda")}
    with pytest.raises(ValueError, match="precision"):
        feature_spec({**MODEL, "precision": "fp16"})
    store = store_spec(tmp_path / "store")
    dataset = write_samples(open_store(store), POOL[:3], shard_rows=8).to_dict()
    with pytest.raises(ValueError, match="'tf32' needs a CUDA device"):
        run_embed(dataset, {**MODEL, "precision": "tf32"}, store, device="cpu")


def test_other_precisions_and_blocks_are_never_mixed_with_the_default(tmp_path, embedded_rows):
    store = store_spec(tmp_path / "store")
    dataset = write_samples(open_store(store), POOL, shard_rows=8).to_dict()
    default, X = vectors(store, run_embed(dataset, MODEL, store, device="cpu"))
    assert default.producer == ClipSpec("skmm-tiny-vit").to_dict()
    assert sum(embedded_rows) == len(POOL)
    for other, key, value in (({**MODEL, "precision": "bf16"}, "precision", "bf16"),
                              ({**MODEL, "block_rows": 8}, "block_rows", 8)):
        embedded_rows.clear()
        table, Y = vectors(store, run_embed(dataset, other, store, device="cpu"))
        assert sum(embedded_rows) == len(POOL), key  # nothing reused from the default's catalog
        assert table.producer[key] == value and table.producer_digest != default.producer_digest
        np.testing.assert_allclose(Y, X, atol=0.05)
    embedded_rows.clear()
    again, Z = vectors(store, run_embed(dataset, MODEL, store, device="cpu"))
    assert embedded_rows == [] and again.artifact.sha256 == default.artifact.sha256 and np.array_equal(Z, X)
