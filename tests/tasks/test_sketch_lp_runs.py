"""The LP sketch run by run (issue 8): a grown dataset's kept runs keep their sketch tables (task cache hits), the
new run's is the only one written, and the linked sketch is bitwise the sketch of the same pool written at once."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import random_png

from skmm.sketch import GaussianProjector
from storage.datasets import (
    DatasetManifest,
    DatasetRef,
    VectorTableRef,
    dataset_version,
    load_manifest,
    read_vectors,
    sample_id,
    write_samples,
    write_vectors,
)
from storage.linked_vectors import is_linked, link_vectors, linked_parts
from tasks.sketch import LP_BLOCK, lp_sketch_parts, project_padded, run_lp_sketch, run_sketch
from tasks.store import open_store, store_spec

SPLITS = ["train", "train", "val", "test", "train"]
DIM = 24
MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}
SHARD_ROWS = 8


def images(n: int) -> list[dict]:
    """n random 16 × 16 PNGs in two class folders."""
    return [{"data": random_png(i), "label": str(i % 2)} for i in range(n)]


def records(n: int) -> list[dict]:
    return [{"source_uri": f"mem://{i}", "label": str(i % 3), "split": SPLITS[i % 5], "data": f"img-{i}".encode()}
            for i in range(n)]


def features(rows: list[dict]) -> tuple[list[str], np.ndarray]:
    """(sorted ids, one float32 row each): a row is a function of its sample alone, as the embed stage's are."""
    ids = sorted(sample_id(r["data"]) for r in rows)
    mat = np.stack([np.random.default_rng(int(i[:8], 16)).standard_normal(DIM) * (1 + int(i[8:10], 16))
                    for i in ids]).astype(np.float32)
    return ids, mat


def grown(store: dict, parts: list[list[dict]]) -> tuple[DatasetRef, VectorTableRef]:
    """A dataset of one run per part (as growths leave it) and its features as the embed stage leaves them: one
    table per run, linked (one run: the table)."""
    st = open_store(store)
    shards, runs, tables = [], [], []
    for part in parts:
        run = load_manifest(st, write_samples(st, part, shard_rows=7)).shards
        shards += run
        runs.append(len(run))
        tables.append(write_vectors(st, *features(part), {"model": "synthetic"}, kind="embeddings"))
    every = [r for part in parts for r in part]
    version = dataset_version((sample_id(r["data"]), r["label"], r["split"]) for r in every)
    manifest = DatasetManifest(version, len(every), tuple(shards), runs=tuple(runs) if len(runs) > 1 else ())
    dataset = DatasetRef(st.put_bytes(manifest.to_json(), "dataset", ".json"), version, len(every))
    return dataset, link_vectors(st, tables)


def test_a_padded_projection_gives_a_row_the_same_bits_in_any_block():
    """The property the per-run sketch rests on: in a product of LP_BLOCK rows a row's bits are its own, wherever
    it sits and whatever the other rows are (an unpadded one-row product takes another BLAS path)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((LP_BLOCK, 96)).astype(np.float32)
    proj = GaussianProjector(96, 32, 1).fit()
    whole = project_padded(proj, X)
    for lo, length in ((0, 1), (1, 1), (5, 3), (100, 17), (4000, 700), (LP_BLOCK - 9, 9)):
        np.testing.assert_array_equal(project_padded(proj, X[lo:lo + length]), whole[lo:lo + length])
        shuffled = rng.standard_normal((LP_BLOCK, 96)).astype(np.float32)  # other neighbours around the rows
        shuffled[3000:3000 + length] = X[lo:lo + length]
        np.testing.assert_array_equal(proj.project(shuffled)[3000:3000 + length], whole[lo:lo + length])


@pytest.mark.parametrize("sketch_dim", [8, None])
def test_a_grown_datasets_lp_sketch_is_one_table_per_run_bitwise_the_sketch_written_at_once(tmp_path, sketch_dim):
    """Three runs (the last with no train rows): two sketch tables, linked; read as one table they hold the train
    rows in id order, bitwise those of the same pool written at once (one run, one table)."""
    pool = records(90)
    shuffled = random.Random(0).sample(pool, len(pool))
    tests_only = [r for r in pool if r["split"] == "test"][:5]
    rest = [r for r in shuffled if r not in tests_only]
    store = store_spec(tmp_path / "store")
    st = open_store(store)
    dataset, emb = grown(store, [rest[:60], rest[60:], tests_only])
    assert is_linked(emb) and len(lp_sketch_parts(st, emb, dataset)) == 3

    sk = VectorTableRef.from_dict(run_lp_sketch(emb.to_dict(), dataset.to_dict(), store, sketch_dim, seed=4))
    assert is_linked(sk) and len(linked_parts(st, sk)) == 2
    at_once, at_once_emb = grown(store_spec(tmp_path / "once"), [pool])
    want = VectorTableRef.from_dict(run_lp_sketch(at_once_emb.to_dict(), at_once.to_dict(),
                                                  store_spec(tmp_path / "once"), sketch_dim, seed=4))
    assert not is_linked(want) and sk.producer == want.producer
    ids, rows = read_vectors(st, sk)
    want_ids, want_rows = read_vectors(open_store(store_spec(tmp_path / "once")), want)
    assert ids == want_ids and len(ids) == sum(r["split"] == "train" for r in pool)
    assert np.array_equal(rows, want_rows)


def test_features_that_are_not_per_run_are_sketched_in_one_pass_with_the_same_rows(tmp_path):
    """One feature table over a dataset of several runs (precomputed embeddings): no run's part to key on, so the
    split is sketched in one pass — the same rows as per run."""
    pool = records(40)
    store = store_spec(tmp_path / "store")
    st = open_store(store)
    dataset, linked = grown(store, [pool[:25], pool[25:]])
    one = write_vectors(st, *features(pool), {"model": "synthetic"}, kind="embeddings")
    assert lp_sketch_parts(st, one, dataset) is None
    whole = VectorTableRef.from_dict(run_sketch(one.to_dict(), dataset.to_dict(), store, sketch_dim=6, seed=2))
    per_run = VectorTableRef.from_dict(run_sketch(linked.to_dict(), dataset.to_dict(), store, sketch_dim=6, seed=2))
    assert not is_linked(whole) and is_linked(per_run)
    a, b = read_vectors(st, whole), read_vectors(st, per_run)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


def test_in_a_flow_a_growth_sketches_only_its_new_run(prefect_api, tmp_path, monkeypatch):
    """The real pipeline stages on a growing image folder (tiny tower): after a growth the kept run's LP sketch
    task is a cache hit and the sketch rows written are the new run's train rows only, not the pool's again;
    the sketch read back is bitwise the one of the same pool ingested from scratch."""
    import pyarrow.parquet as pq
    from flow_helpers import task_states
    from prefect import flow

    import storage.ingest.reuse as reuse_mod
    from storage.ingest import ingest_image_folder
    from tasks.embed import embed_with_counts
    from tasks.sketch import gradients_sketch
    from tasks.store import result_storage

    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)  # the files are milliseconds old
    pool = tmp_path / "pool"
    late = (5, 17, 33, 40)
    for i, record in enumerate(images(43)):
        (pool / record["label"]).mkdir(parents=True, exist_ok=True)
        if i not in late:
            (pool / record["label"] / f"{i:02d}.png").write_bytes(record["data"])

    def stages(store: dict):
        @flow(name="embed-sketch-growth")
        def embed_sketch(dataset: dict) -> dict:
            emb, _ = embed_with_counts(dataset, MODEL, store, {"result_storage": result_storage(store)})
            return gradients_sketch(emb, dataset, store, {"result_storage": result_storage(store)}, sketch_dim=8,
                                    seed=0, mode="lp", model=MODEL)
        return embed_sketch

    store = store_spec(tmp_path / "store")
    st = open_store(store)
    run = stages(store)
    first = run(ingest_image_folder(st, pool, shard_rows=SHARD_ROWS, val_fraction=0.2,
                                    test_fraction=0.2).dataset.to_dict())
    assert not is_linked(VectorTableRef.from_dict(first))
    sketches = tmp_path / "store" / "objects" / "sketch"
    before = set(sketches.iterdir())
    for i in late:
        record = images(43)[i]
        (pool / record["label"] / f"{i:02d}.png").write_bytes(record["data"])
    grown_ds = ingest_image_folder(st, pool, shard_rows=SHARD_ROWS, val_fraction=0.2, test_fraction=0.2).dataset
    state = run(grown_ds.to_dict(), return_state=True)
    sk = VectorTableRef.from_dict(state.result())

    assert is_linked(sk)
    assert sorted(task_states(state)["gradients-sketch-lp-run"]) == ["Cached", "Completed"]
    written = [p for p in set(sketches.iterdir()) - before if p.suffix == ".parquet"]
    new_train = sk.num_rows - VectorTableRef.from_dict(first).num_rows
    assert 0 < new_train <= len(late)
    assert sum(pq.read_metadata(p).num_rows for p in written) == new_train, written  # before: every train row
    fresh = store_spec(tmp_path / "fresh")
    scratch = ingest_image_folder(open_store(fresh), pool, shard_rows=SHARD_ROWS, val_fraction=0.2, test_fraction=0.2)
    want = VectorTableRef.from_dict(stages(fresh)(scratch.dataset.to_dict()))
    got_ids, got = read_vectors(st, sk)
    want_ids, want_rows = read_vectors(open_store(fresh), want)
    assert got_ids == want_ids and np.array_equal(got, want_rows)
