"""A growth keeps the previous dataset's unchanged shards and writes only the new samples, as a new run
(storage/ingest/writer.py): the rows and version are those of a from-scratch ingest, whatever happened to the
pool in between, and a dataset at its run limit writes its smallest run again with the new samples."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from ingest_pools import image_bytes, make_pool, same_dataset

import storage.ingest.reuse as reuse_mod
import storage.ingest.writer as writer_mod
import storage.sample_reader as reader_mod
from storage.artifacts import ArtifactStore
from storage.datasets import load_manifest
from storage.ingest import ingest_image_folder


@pytest.fixture(autouse=True)
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)


def from_scratch(pool: Path, tmp_path: Path, **kwargs):
    store = ArtifactStore(tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}")
    return store, ingest_image_folder(store, pool, reuse=False, **kwargs)


def test_a_growth_keeps_every_unchanged_shard_and_reads_none_of_their_images(tmp_path, monkeypatch):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=12)
    first = ingest_image_folder(store, pool, shard_rows=4)
    before = load_manifest(store, first.dataset)
    assert len(before.shards) == 9 and before.runs == ()
    (pool / "dog" / "new1.png").write_bytes(image_bytes(901))
    (pool / "cat" / "new2.png").write_bytes(image_bytes(902))

    image_reads = []
    real_open = reuse_mod._open_shard
    monkeypatch.setattr(reuse_mod, "_open_shard", lambda store, shard, columns: (
        image_reads.append(shard.artifact.uri) if "data" in columns else None) or real_open(store, shard, columns))
    objects = set(store.list_paths("objects"))
    grown = ingest_image_folder(store, pool, shard_rows=4)
    after = load_manifest(store, grown.dataset)
    assert after.runs == (9, 1) and after.shards[:9] == before.shards and after.shards[9].num_rows == 2
    assert image_reads == []  # the kept shards' images are never read, and nothing else needed reading
    new_samples = [p for p in set(store.list_paths("objects")) - objects if "/samples/" in p]
    assert len(new_samples) == 1  # one shard written: the two new samples
    fresh_store, fresh = from_scratch(pool, tmp_path, shard_rows=4)
    same_dataset(store, grown.dataset, fresh_store, fresh.dataset)


def test_a_changed_shard_is_rewritten_into_the_new_run_with_the_new_samples(tmp_path):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=8)
    first = ingest_image_folder(store, pool, shard_rows=4)
    before = load_manifest(store, first.dataset)
    victim = sorted(pool.rglob("*.*"))[5]
    victim.unlink()  # its shard loses a row: rewritten, its other rows go to the new run
    (pool / "fox" / "new.png").write_bytes(image_bytes(903))
    grown = ingest_image_folder(store, pool, shard_rows=4)
    after = load_manifest(store, grown.dataset)
    kept = [sh for sh in after.shards if sh in before.shards]
    assert len(kept) == len(before.shards) - 1 and after.runs == (len(kept), len(after.shards) - len(kept))
    fresh_store, fresh = from_scratch(pool, tmp_path, shard_rows=4)
    same_dataset(store, grown.dataset, fresh_store, fresh.dataset)


def _mutate(pool: Path, rng: random.Random, step: int) -> None:
    files = sorted(p for p in pool.rglob("*.*") if p.is_file())
    for k in range(rng.randint(0, 4)):  # new files
        cls = rng.choice(["cat", "dog", "fox"])
        (pool / cls / f"s{step}-{k}.png").write_bytes(image_bytes(10_000 + 100 * step + k))
    for path in rng.sample(files, min(len(files) - 9, rng.randint(0, 2))):  # removed
        path.unlink()
        files.remove(path)
    if rng.random() < 0.4:  # moved to another class: its label changes (a file whose content is nowhere else)
        contents = [p.read_bytes() for p in files]
        path = rng.choice([p for p, c in zip(files, contents, strict=True) if contents.count(c) == 1])
        other = next(c for c in ("cat", "dog", "fox") if c != path.parent.name)
        path.rename(pool / other / f"moved{step}-{path.name}")
        files.remove(path)
    if rng.random() < 0.4:  # a duplicate that sorts before its original: the row's source_uri changes
        path = rng.choice(files)
        shutil.copyfile(path, path.parent / f"0dup{step}-{path.name}")
    if rng.random() < 0.3:  # rewritten in place
        rng.choice(files).write_bytes(image_bytes(20_000 + step))


@pytest.mark.parametrize("seed", range(6))
def test_random_growths_match_from_scratch_ingests_and_runs_stay_bounded(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(writer_mod, "MAX_RUNS", 3)
    rng = random.Random(seed)
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=5)
    result = ingest_image_folder(store, pool, shard_rows=3)
    kept_any, compacted = False, 0
    for step in range(8):
        previous = load_manifest(store, result.dataset)
        _mutate(pool, rng, step)
        result = ingest_image_folder(store, pool, shard_rows=3)
        manifest = load_manifest(store, result.dataset)
        assert len(manifest.shard_runs()) <= 3
        if len(previous.shard_runs()) == 3:  # compaction: the smallest previous run is written again
            runs = previous.shard_runs()
            smallest = runs[min(range(3), key=lambda r: (sum(sh.num_rows for sh in runs[r]), -r))]  # newest of equals
            kept = {sh for run in manifest.shard_runs()[:-1] for sh in run}  # (the new run may cut a shard
            assert not set(smallest) & kept  # of the same rows again: the same bytes)
            compacted += 1
        kept_any |= bool(set(manifest.shards) & set(previous.shards))
        fresh_store, fresh = from_scratch(pool, tmp_path, shard_rows=3)
        same_dataset(store, result.dataset, fresh_store, fresh.dataset)
        assert reader_mod.read_split_ids(store, result.dataset, "train")[0].tolist() == \
            reader_mod.read_split_ids(fresh_store, fresh.dataset, "train")[0].tolist()
    assert kept_any and compacted


def test_a_growth_reads_the_previous_shards_metadata_several_at_a_time(tmp_path, monkeypatch):
    """On an object store each shard's metadata costs round trips: they are read METADATA_READERS at a time (in
    order), not one after the other."""
    import contextlib
    import threading
    import time

    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=8)
    ingest_image_folder(store, pool, shard_rows=2)  # 12 shards
    (pool / "dog" / "new.png").write_bytes(image_bytes(904))
    lock, active, most = threading.Lock(), [0], [0]
    real_open = reuse_mod._open_shard

    @contextlib.contextmanager
    def slow_open(store_, shard, columns):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)  # a round trip
            with real_open(store_, shard, columns) as parquet:
                yield parquet
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(reuse_mod, "_open_shard", slow_open)
    grown = ingest_image_folder(store, pool, shard_rows=2)
    assert most[0] > 1 and grown.n_kept == 24
    fresh_store, fresh = from_scratch(pool, tmp_path, shard_rows=2)
    same_dataset(store, grown.dataset, fresh_store, fresh.dataset)


def test_the_previous_shards_are_joined_with_the_spill_without_its_image_bytes(tmp_path):
    """_kept_shards reads the spill's ids and URIs a bucket at a time; the bytes of the images read now, spilled
    beside them, must not stay in memory with them (a bucket may be far larger than BUCKET_BYTES)."""
    store = ArtifactStore(tmp_path / "store")
    with writer_mod.DatasetWriter(store, source_name="pool", shard_rows=4, seed=0, val_fraction=0.2,
                                  test_fraction=0.2, buffer_bytes=2**20) as writer:
        for i in range(40):  # one bucket (ids "00…"), 40 MiB of images read now
            writer.add(f"00{i:062x}", f"file:///pool/{i}.png", "ab"[i % 2], None, os.urandom(2**20))
        before = pa.total_allocated_bytes()
        tables = writer._spilled_metadata()
        bucket, table = next(tables)
        held = pa.total_allocated_bytes() - before
        tables.close()
    assert bucket == 0 and table.num_rows == 40 and table.column_names == ["sample_id", "source_uri", "reused"]
    assert held < 2**20


def test_shards_of_samples_read_again_unchanged_are_kept(tmp_path):
    """A tar with a quarantined member is read whole on every run: its samples, read now but unchanged (an id is
    its bytes' sha256), must not cost the shards they are in — here a quarter of the pool, in most shards."""
    from helpers import tar_bytes

    from storage.ingest import ingest_webdataset

    def tar(path: Path, start: int, n: int, broken: bool = False) -> None:
        members = []
        for i in range(start, start + n):
            members += [(f"s{i:04d}.png", image_bytes(i, size=8)), (f"s{i:04d}.cls", str(i % 3).encode())]
        if broken:
            members += [("zbad.png", b"not an image"), ("zbad.cls", b"1")]
        path.write_bytes(tar_bytes(members))

    shards, store = tmp_path / "shards", ArtifactStore(tmp_path / "store")
    shards.mkdir()
    for t in range(4):
        tar(shards / f"{t}.tar", 40 * t, 40, broken=t == 0)
    first = ingest_webdataset(store, shards, shard_rows=8)
    before = load_manifest(store, first.dataset)
    tar(shards / "9.tar", 1000, 2)
    grown = ingest_webdataset(store, shards, shard_rows=8)
    assert grown.n_kept == first.n_samples and load_manifest(store, grown.dataset).shards[:20] == before.shards
    fresh_store = ArtifactStore(tmp_path / "fresh")
    fresh = ingest_webdataset(fresh_store, shards, shard_rows=8, reuse=False)
    same_dataset(store, grown.dataset, fresh_store, fresh.dataset)


def test_a_growth_reads_each_kept_shard_once(tmp_path, monkeypatch):
    """The join of the previous shards' metadata with the spill already finds the rows of the kept shards: pass 2
    drops them by what it recorded (per bucket, on disk), without reading the kept shards' ids a second time."""
    from collections import Counter

    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=12)
    first = ingest_image_folder(store, pool, shard_rows=4)
    victim = sorted(pool.rglob("*.*"))[5]
    victim.write_bytes(image_bytes(905))  # its shard is written again, the others are kept
    (pool / "dog" / "new.png").write_bytes(image_bytes(904))
    opened: Counter[tuple[str, tuple[str, ...]]] = Counter()
    real_open = reuse_mod._open_shard
    monkeypatch.setattr(reuse_mod, "_open_shard", lambda store_, shard, columns: opened.update(
        [(shard.artifact.uri, tuple(columns))]) or real_open(store_, shard, columns))
    grown = ingest_image_folder(store, pool, shard_rows=4)
    kept = set(load_manifest(store, grown.dataset).shards) & set(load_manifest(store, first.dataset).shards)
    assert grown.n_kept == 32 and len(kept) == 8
    for shard in kept:
        assert [(cols, n) for (uri, cols), n in opened.items() if uri == shard.artifact.uri] == \
            [(("sample_id", "source_uri", "label", "split"), 1)]  # its metadata, once
    fresh_store, fresh = from_scratch(pool, tmp_path, shard_rows=4)
    same_dataset(store, grown.dataset, fresh_store, fresh.dataset)
