"""FT gradients + sketch shard by shard: one shard's images in memory at a time, rows bitwise those of one pass
over the pool, and train rows only."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from skmm.gradients.clip_ft import ft_gradient_sketch
from skmm.models.clip import ClipSpec
from storage.datasets import VectorTableRef, load_manifest, read_samples, read_vectors, write_samples
from tasks.sketch import run_ft_sketch, run_ft_sketch_shard
from tasks.store import open_store, store_spec

MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}


@pytest.fixture
def pool(tmp_path):
    from storage.ingest import render_digit_png

    digits = load_digits()
    splits = ["train", "train", "val", "test", "train"]
    records = [{"source_uri": f"mem://{i}", "label": str(int(digits.target[i])), "split": splits[i % 5],
                "data": render_digit_png(digits.images[i])} for i in range(60)]
    store = store_spec(tmp_path / "store")
    dataset = write_samples(open_store(store), records, shard_rows=16)
    return store, dataset


def test_sharded_ft_sketch_equals_one_pass_over_the_train_rows(pool):
    store, dataset = pool
    st = open_store(store)
    assert len(load_manifest(st, dataset).shards) == 4
    ref = VectorTableRef.from_dict(run_ft_sketch(dataset.to_dict(), store, MODEL, sketch_dim=8, seed=1))
    ids, rows = read_vectors(st, ref)

    table = read_samples(st, dataset)
    train = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "train"]
    train_ids = [table.column("sample_id")[i].as_py() for i in train]
    assert ids == train_ids  # train rows only, in sample-id order
    whole, producer = ft_gradient_sketch([table.column("data")[i].as_py() for i in train], train_ids,
                                         ClipSpec("skmm-tiny-vit"), k=1, num_classes=10, sketch_dim=8, seed=1)
    assert ref.producer == producer
    assert np.array_equal(rows, whole)  # bitwise: one batch size, every batch zero-padded to it


def test_a_shard_without_train_rows_gives_no_table(tmp_path):
    from storage.ingest import render_digit_png

    digits = load_digits()
    store = store_spec(tmp_path / "store")
    records = [{"source_uri": f"mem://{i}", "label": str(i % 2), "split": "test",
                "data": render_digit_png(digits.images[i])} for i in range(4)]
    dataset = write_samples(open_store(store), records)
    shard = load_manifest(open_store(store), dataset).shards[0].to_dict()
    assert run_ft_sketch_shard(shard, store, MODEL, num_classes=2, sketch_dim=4) is None
    with pytest.raises(ValueError, match="no train split"):
        run_ft_sketch(dataset.to_dict(), store, MODEL, sketch_dim=4)


def test_a_grown_datasets_ft_sketch_links_one_table_per_run(tmp_path):
    """A dataset of runs (a grown one) gets one combined sketch per run with train rows, linked: read as one table
    it holds the train rows in sample-id order, as the same samples written at once give (up to the rounding
    of other batches); a run without train rows adds no table."""
    import random

    from storage.datasets import DatasetManifest, DatasetRef, dataset_version, sample_id
    from storage.ingest import render_digit_png
    from storage.linked_vectors import is_linked, linked_parts

    digits = load_digits()
    splits = ["train", "train", "val", "test", "train"]
    records = [{"source_uri": f"mem://{i}", "label": str(int(digits.target[i])), "split": splits[i % 5],
                "data": render_digit_png(digits.images[i])} for i in range(60)]
    shuffled = random.Random(0).sample(records, 60)
    tests_only = [r for r in records if r["split"] == "test"][:4]
    rest = [r for r in shuffled if r not in tests_only]
    parts = [rest[:30], rest[30:], tests_only]
    store = store_spec(tmp_path / "store")
    st = open_store(store)
    shards, runs = [], []
    for part in parts:
        run = load_manifest(st, write_samples(st, part, shard_rows=8)).shards
        shards += run
        runs.append(len(run))
    version = dataset_version((sample_id(r["data"]), r["label"], r["split"]) for r in records)
    manifest = DatasetManifest(version, 60, tuple(shards), runs=tuple(runs))
    grown = DatasetRef(st.put_bytes(manifest.to_json(), "dataset", ".json"), version, 60)

    ref = VectorTableRef.from_dict(run_ft_sketch(grown.to_dict(), store, MODEL, sketch_dim=8, seed=1,
                                                 num_classes=10))
    assert is_linked(ref) and len(linked_parts(st, ref)) == 2  # the test-only run has no train rows
    at_once = write_samples(st, records, shard_rows=8)
    ids, rows = read_vectors(st, ref)
    want_ids, want = read_vectors(st, VectorTableRef.from_dict(
        run_ft_sketch(at_once.to_dict(), store, MODEL, sketch_dim=8, seed=1, num_classes=10)))
    assert ids == want_ids
    np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-6)
