"""Incremental embedding: a grown pool embeds only its new samples, and its features stay bitwise those of a
from-scratch run (the tiny open_clip tower, real stores on local disk and moto's S3, a real Prefect flow)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import random_png

from skmm.models.clip import default_block_rows
from storage.datasets import VectorTableRef, read_vectors, write_samples
from tasks.embed import run_combine, run_embed, run_embed_shard, shards_of
from tasks.store import open_store, store_spec

MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}
SHARD_ROWS = 8


def records(n: int) -> list[dict]:
    return [{"data": random_png(i), "label": str(i % 2), "source_uri": f"mem://pool/{i}.png"} for i in range(n)]


POOL = sorted(records(43), key=lambda r: hashlib.sha256(r["data"]).hexdigest())
NEW = (20, 30, 41)  # positions in id order: the first two shards stay as they were, the four after them change
BASE = [r for i, r in enumerate(POOL) if i not in NEW]



@pytest.fixture(params=["local", "s3"])
def store_of(request, tmp_path):
    """A factory of fresh store specs (local folder or a prefix of a fresh moto bucket)."""
    def make(name: str) -> dict:
        if request.param == "local":
            return store_spec(tmp_path / name)
        bucket, options = request.getfixturevalue("s3_bucket")
        return store_spec(f"s3://{bucket}/{name}", options["endpoint_url"])
    return make


def table(store: dict, ref: dict) -> tuple[str, list[str], np.ndarray]:
    """(content digest, ids, vectors) of a feature table: the digest covers the producer, the ids and the vectors'
    bytes, so equal digests are bitwise-equal features — whether the table is one Parquet table or a grown
    dataset's per-run tables linked (storage.linked_vectors)."""
    vectors = VectorTableRef.from_dict(ref)
    ids, mat = read_vectors(open_store(store), vectors)
    digest = hashlib.sha256(f"{vectors.producer_digest}\n{vectors.dim}\n{chr(10).join(ids)}\n".encode())
    digest.update(np.ascontiguousarray(mat, np.float32).tobytes())
    return digest.hexdigest(), ids, mat


def test_a_grown_pool_embeds_only_its_new_samples_bitwise_as_from_scratch(store_of, embedded_rows):
    store = store_of("store")
    first = write_samples(open_store(store), BASE, shard_rows=SHARD_ROWS)
    run_embed(first.to_dict(), MODEL, store)
    assert sum(embedded_rows) == 40
    embedded_rows.clear()

    grown = write_samples(open_store(store), POOL, shard_rows=SHARD_ROWS)
    old = {sh["artifact"]["sha256"] for sh in shards_of(first.to_dict(), store)}
    changed = [sh for sh in shards_of(grown.to_dict(), store) if sh["artifact"]["sha256"] not in old]
    assert len(changed) == 4  # the new ids shifted the boundaries of several shards
    incremental = run_embed(grown.to_dict(), MODEL, store)
    assert embedded_rows == [3]  # only the new samples went through the tower, packed into one block
    embedded_rows.clear()

    # The counts say the same; a changed shard run again (no task cache here) now reuses every sample.
    again = [run_embed_shard(sh, MODEL, store) for sh in changed]
    assert [(r["embedded"], r["reused"]) for r in again] == [(0, sh["num_rows"]) for sh in changed]
    assert embedded_rows == []  # not even the tower was loaded for them
    assert run_combine(again, store) == run_combine([r["vectors"] for r in again], store)  # older result shape

    fresh = store_of("fresh")
    scratch_ds = write_samples(open_store(fresh), POOL, shard_rows=SHARD_ROWS)
    scratch = run_embed(scratch_ds.to_dict(), MODEL, fresh)
    sha, ids, mat = table(store, incremental)
    sha_s, ids_s, mat_s = table(fresh, scratch)
    assert ids == ids_s and np.array_equal(mat, mat_s)
    assert sha == sha_s  # the same bytes: the combined table is the from-scratch artifact


def test_in_a_flow_changed_shards_reuse_features_and_unchanged_ones_hit_the_cache(prefect_api, tmp_path,
                                                                                   embedded_rows):
    from flow_helpers import task_states
    from prefect import flow

    from tasks.embed import embed_with_counts
    from tasks.store import result_storage

    @flow(name="embed-incremental-test")
    def embed_flow(dataset: dict, store: dict) -> tuple[dict, dict]:
        return embed_with_counts(dataset, MODEL, store, {"result_storage": result_storage(store)})

    store = store_spec(tmp_path / "store")
    first = write_samples(open_store(store), BASE, shard_rows=SHARD_ROWS)
    embed_flow(first.to_dict(), store)
    assert sum(embedded_rows) == 40
    embedded_rows.clear()

    grown = write_samples(open_store(store), POOL, shard_rows=SHARD_ROWS)
    state = embed_flow(grown.to_dict(), store, return_state=True)
    combined, counts = state.result()
    assert task_states(state)["embed"] == ["Cached"] * 2 + ["Completed"] * 4  # unchanged shards hit the cache
    assert sum(embedded_rows) == 3, embedded_rows
    assert embedded_rows == [3]  # one pack: the 2 cached shards' pending samples are in the catalog already
    assert counts == {"shards": 6, "shards_cached": 2, "samples_cached": 16, "samples_embedded": 3,
                      "samples_reused": 24, "packs": 1, "tower_blocks": 1, "precision": "fp32",
                      "block_rows": default_block_rows()}
    assert task_states(state)["embed-pack"] == ["Completed"]

    fresh = store_spec(tmp_path / "fresh")
    scratch = run_embed(write_samples(open_store(fresh), POOL, shard_rows=SHARD_ROWS).to_dict(), MODEL, fresh)
    assert table(store, combined)[0] == table(fresh, scratch)[0]

    # A rerun is all cache hits and embeds nothing.
    embedded_rows.clear()
    rerun = embed_flow(grown.to_dict(), store, return_state=True)
    assert set(task_states(rerun)["embed"]) == {"Cached"} and embedded_rows == []
    assert rerun.result() == (combined, {**counts, "shards_cached": 6, "samples_cached": 43, "samples_embedded": 0,
                                         "samples_reused": 0, "packs": 0, "tower_blocks": 0})


def test_features_of_another_producer_are_never_reused(tmp_path, embedded_rows):
    store = store_spec(tmp_path / "store")
    dataset = write_samples(open_store(store), POOL, shard_rows=SHARD_ROWS).to_dict()
    run_embed(dataset, MODEL, store)
    embedded_rows.clear()
    other = run_embed(dataset, {**MODEL, "init_seed": 1}, store)  # another random init: other features
    assert sum(embedded_rows) == len(POOL)
    fresh = store_spec(tmp_path / "fresh")
    scratch = run_embed(write_samples(open_store(fresh), POOL, shard_rows=SHARD_ROWS).to_dict(),
                        {**MODEL, "init_seed": 1}, fresh)
    assert table(store, other)[0] == table(fresh, scratch)[0]


def test_packing_runs_the_new_samples_of_many_shards_in_one_block_bitwise_as_shard_by_shard(tmp_path, embedded_rows):
    """Without packing each changed shard pads its one new sample to a whole block; with it the three share one
    block, and every table is the same artifact."""
    tables = {}
    for pack in (False, True):
        store = store_spec(tmp_path / f"pack-{pack}")
        run_embed(write_samples(open_store(store), BASE, shard_rows=SHARD_ROWS).to_dict(), MODEL, store, pack=pack)
        embedded_rows.clear()
        grown = write_samples(open_store(store), POOL, shard_rows=SHARD_ROWS).to_dict()
        tables[pack] = table(store, run_embed(grown, MODEL, store, pack=pack))
        assert embedded_rows == ([3] if pack else [1, 1, 1])
        embedded_rows.clear()
    assert tables[True][0] == tables[False][0]


def test_a_pack_embeds_only_what_the_catalog_lacks_and_assembly_falls_back_when_the_catalog_lost_rows(
        tmp_path, embedded_rows):
    import shutil

    from storage.feature_catalog import CATALOG_PREFIX
    from tasks.embed import run_embed_assemble, run_embed_pack

    store = store_spec(tmp_path / "store")
    fresh = shards_of(write_samples(open_store(store), BASE, shard_rows=SHARD_ROWS).to_dict(), store)
    assert all("vectors" in run_embed_shard(sh, MODEL, store, pack_below=64) for sh in fresh)  # new shards embed
    assert embedded_rows == [8] * 5
    embedded_rows.clear()

    dataset = write_samples(open_store(store), POOL, shard_rows=SHARD_ROWS).to_dict()
    shards = shards_of(dataset, store)
    first = [run_embed_shard(sh, MODEL, store, pack_below=64) for sh in shards]
    pending = [i for i, r in enumerate(first) if "pending" in r]
    assert [first[i]["missing"] for i in pending] == [1, 1, 1] and embedded_rows == []
    pack = run_embed_pack([first[i]["pending"] for i in pending], MODEL, store)
    assert (pack["embedded"], pack["blocks"], embedded_rows) == (3, 1, [3])
    again = run_embed_pack([first[i]["pending"] for i in pending], MODEL, store)  # catalogued now
    assert again == {"delta": None, "embedded": 0, "blocks": 0} and embedded_rows == [3]
    parts = list(first)
    for i in pending:
        parts[i] = run_embed_assemble(shards[i], first[i]["pending"], pack["delta"], MODEL, store)
        assert (parts[i]["embedded"], parts[i]["reused"]) == (1, shards[i]["num_rows"] - 1)
    assert embedded_rows == [3]  # assembly read no shard and ran no tower

    # The catalog loses its tables: a shard whose pack result is also gone is embedded again, the same bytes.
    shutil.rmtree(tmp_path / "store" / CATALOG_PREFIX)
    i = pending[0]
    redone = run_embed_assemble(shards[i], first[i]["pending"], None, MODEL, store)
    assert embedded_rows == [3, shards[i]["num_rows"]] and redone["vectors"] == parts[i]["vectors"]
    scratch_store = store_spec(tmp_path / "scratch")
    scratch = run_embed(write_samples(open_store(scratch_store), POOL, shard_rows=SHARD_ROWS).to_dict(), MODEL,
                        scratch_store)
    assert table(store, run_combine(parts, store))[0] == table(scratch_store, scratch)[0]


def test_packs_on_a_two_worker_dask_cluster_give_the_from_scratch_table(prefect_api, tmp_path):
    """The pack and assemble tasks run in other processes than the shards that left them their samples: a pack
    registers its delta in its worker's catalog, and assembly reads the delta it is handed."""
    from prefect import flow

    from flows.runners import dask_task_runner
    from tasks.embed import embed_with_counts
    from tasks.store import result_storage

    store = store_spec(tmp_path / "store")

    @flow(name="embed-packs-on-dask", task_runner=dask_task_runner(workers=2))
    def embed_flow(dataset: dict) -> tuple[dict, dict]:
        return embed_with_counts(dataset, MODEL, store, {"result_storage": result_storage(store)})

    embed_flow(write_samples(open_store(store), BASE, shard_rows=SHARD_ROWS).to_dict())
    combined, counts = embed_flow(write_samples(open_store(store), POOL, shard_rows=SHARD_ROWS).to_dict())
    assert (counts["packs"], counts["samples_embedded"], counts["tower_blocks"]) == (1, 3, 1), counts
    fresh = store_spec(tmp_path / "fresh")
    scratch = run_embed(write_samples(open_store(fresh), POOL, shard_rows=SHARD_ROWS).to_dict(), MODEL, fresh)
    assert table(store, combined)[0] == table(fresh, scratch)[0]


def test_after_a_growth_ingest_changed_shards_take_their_new_images_from_the_ingests_new_rows(tmp_path,
                                                                                              monkeypatch,
                                                                                              embedded_rows):
    """The ingest (reuse on) leaves each written shard's new rows aside when it also holds rows read back from the
    previous dataset (a growth keeps unchanged shards; a changed one joins the new run with the new samples); the
    embed stage then reads only the id column of such a shard, never its images, and the features are the
    from-scratch ones."""
    import storage.ingest.reuse as reuse_mod
    import tasks.embed as embed_mod
    from storage.ingest import ingest_image_folder
    from storage.ingest.reuse import NEW_ROWS_PREFIX
    from tasks.embed import run_embed_counted

    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)  # the files are milliseconds old
    pool = tmp_path / "pool"
    for i, record in enumerate(records(43)):
        folder = pool / record["label"]
        folder.mkdir(parents=True, exist_ok=True)
        if i not in (5, 17, 33):
            (folder / f"{i:02d}.png").write_bytes(record["data"])
    store = store_spec(tmp_path / "store")
    st = open_store(store)
    first = ingest_image_folder(st, pool, shard_rows=SHARD_ROWS)
    run_embed_counted(first.dataset.to_dict(), MODEL, store)
    assert st.list_paths(NEW_ROWS_PREFIX) == []  # a first ingest leaves none: every row is new
    embedded_rows.clear()

    for i in (5, 17, 33):
        record = records(43)[i]
        (pool / record["label"] / f"{i:02d}.png").write_bytes(record["data"])
    gone = records(43)[10]
    (pool / gone["label"] / "10.png").unlink()  # its shard changes: its 7 other rows are written again
    grown = ingest_image_folder(st, pool, shard_rows=SHARD_ROWS)
    assert grown.n_reused == 39 and grown.n_kept == 32  # the four other shards are kept as they are
    assert 1 <= len(st.list_paths(NEW_ROWS_PREFIX)) <= 2  # per written shard with a new sample and a reused one

    reads = []
    real_iter, real_read = embed_mod.iter_shard, embed_mod.read_shard
    monkeypatch.setattr(embed_mod, "iter_shard", lambda st_, sh, cols, *a: reads.append(("iter", tuple(cols)))
                        or real_iter(st_, sh, cols, *a))
    monkeypatch.setattr(embed_mod, "read_shard", lambda *a, **k: reads.append(("read", None)) or real_read(*a, **k))
    combined, counts = run_embed_counted(grown.dataset.to_dict(), MODEL, store)
    assert embedded_rows == [3] and counts["samples_embedded"] == 3
    assert ("read", None) not in reads and all(cols == () for kind, cols in reads)  # ids only, never the images

    fresh = store_spec(tmp_path / "fresh")
    scratch = ingest_image_folder(open_store(fresh), pool, shard_rows=SHARD_ROWS)
    assert scratch.dataset.version == grown.dataset.version
    assert table(store, combined)[0] == table(fresh, run_embed(scratch.dataset.to_dict(), MODEL, fresh))[0]

    (pool / "0" / "extra.png").write_bytes(random_png(999))  # the next growth removes the last one's new rows
    ingest_image_folder(st, pool, shard_rows=SHARD_ROWS)
    assert len(st.list_paths(NEW_ROWS_PREFIX)) == 0  # (its new run is one new sample: nothing read back)


def test_a_grown_datasets_features_link_the_kept_runs_table_instead_of_writing_the_pool_again(prefect_api, tmp_path,
                                                                                               monkeypatch):
    """In a flow, a growth's embed stage combines each run of the dataset on its own — the kept run's combine is a
    cache hit — and links the runs' tables: it writes the new samples' features, not the pool's again, and the
    features read back are bitwise the from-scratch ones."""
    import pyarrow.parquet as pq
    from prefect import flow

    import storage.ingest.reuse as reuse_mod
    from storage.ingest import ingest_image_folder
    from storage.linked_vectors import is_linked
    from tasks.embed import embed_with_counts
    from tasks.store import result_storage

    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)  # the files are milliseconds old
    pool = tmp_path / "pool"
    for i, record in enumerate(records(43)):
        (pool / record["label"]).mkdir(parents=True, exist_ok=True)
        if i not in (5, 17, 33):
            (pool / record["label"] / f"{i:02d}.png").write_bytes(record["data"])
    store = store_spec(tmp_path / "store")
    st = open_store(store)
    tables_dir = tmp_path / "store" / "objects" / "embeddings"

    @flow(name="embed-growth-link")
    def embed_flow(dataset: dict) -> tuple[dict, dict]:
        return embed_with_counts(dataset, MODEL, store, {"result_storage": result_storage(store)})

    first, _ = embed_flow(ingest_image_folder(st, pool, shard_rows=SHARD_ROWS).dataset.to_dict())
    assert not is_linked(VectorTableRef.from_dict(first))
    before = set(tables_dir.iterdir())
    for i in (5, 17, 33):
        record = records(43)[i]
        (pool / record["label"] / f"{i:02d}.png").write_bytes(record["data"])
    grown = ingest_image_folder(st, pool, shard_rows=SHARD_ROWS)
    assert grown.n_kept == 40  # every previous shard kept: the new run is the 3 new samples
    combined, counts = embed_flow(grown.dataset.to_dict())

    assert is_linked(VectorTableRef.from_dict(combined)) and counts["samples_embedded"] == 3
    written = [p for p in set(tables_dir.iterdir()) - before if p.suffix == ".parquet"]
    assert sum(pq.read_metadata(p).num_rows for p in written) == 3, written  # before: the pool's 43 rows again
    fresh = store_spec(tmp_path / "fresh")
    scratch = ingest_image_folder(open_store(fresh), pool, shard_rows=SHARD_ROWS)
    assert table(store, combined)[0] == table(fresh, run_embed(scratch.dataset.to_dict(), MODEL, fresh))[0]
