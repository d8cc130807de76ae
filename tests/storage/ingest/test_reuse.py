"""A grown folder reads only its new files: unchanged files' bytes come from the previous dataset's shards
(storage/ingest/reuse.py), and the dataset is byte-identical to a from-scratch ingest — also when files were
rewritten in place, removed, moved to another class or duplicated, when a shard of the previous dataset is
corrupted or gone, and never across decode-check policies or from a corrupted record."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import tar_bytes
from ingest_pools import image_bytes, make_pool, quarantine_of, rows_of, same_dataset

import storage.ingest.folder as folder_mod
import storage.ingest.reuse as reuse_mod
from storage.artifacts import ArtifactStore
from storage.datasets import load_manifest, read_shard
from storage.errors import ArtifactCorruptedError, StorageError
from storage.ingest import SourceError, ingest_image_folder
from storage.ingest.reuse import HASHES_PREFIX, BaseSamples, SourceHashes, file_key, uri_path


@pytest.fixture(autouse=True)
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The files these tests write are milliseconds old; outside the rule's own test, key them at once."""
    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)


class ReadCount:
    """Counts the files the folder ingest reads (wraps the real read; results unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real, self.paths, self._lock = folder_mod.read_and_check, [], threading.Lock()
        monkeypatch.setattr(folder_mod, "read_and_check", self)

    def __call__(self, path: str, *args, **kwargs):
        with self._lock:
            self.paths.append(path)
        return self.real(path, *args, **kwargs)

    def take(self) -> list[str]:
        paths, self.paths = sorted(self.paths), []
        return paths


def records(store: ArtifactStore) -> list[str]:
    return store.list_paths(HASHES_PREFIX, "**/*.hashes")


def same_as_from_scratch(store: ArtifactStore, result, pool: Path, tmp_path: Path, **kwargs) -> None:
    fresh = ArtifactStore(tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}")
    other = ingest_image_folder(fresh, pool, reuse=False, **kwargs)
    def what(r):  # everything but the store's location
        return (r.dataset.version, r.dataset.num_rows, r.n_samples, r.n_quarantined,
                r.n_duplicates_collapsed, r.classes, r.split_counts, r.quarantine and r.quarantine.sha256)

    assert what(result) == what(other)  # version, counts, classes, splits, the quarantine's bytes
    same_dataset(store, result.dataset, fresh, other.dataset)  # the same rows, source URIs and images included


def test_a_grown_folder_reads_only_its_new_files_and_matches_a_from_scratch_ingest(store, tmp_path, monkeypatch):
    """On a local store and on S3 (moto): the record and the previous shards are read through the store."""
    pool = tmp_path / "pool"
    make_pool(pool, per_class=6)
    (pool / "cat" / "broken.png").write_bytes(image_bytes(77)[:40])  # quarantined: read on every run
    reads = ReadCount(monkeypatch)
    first = ingest_image_folder(store, pool, shard_rows=5)
    assert len(reads.take()) == 19 and first.n_reused == 0 and len(records(store)) == 1

    new = [pool / "dog" / f"new{i}.png" for i in range(3)]
    for i, path in enumerate(new):
        path.write_bytes(image_bytes(900 + i))
    grown = ingest_image_folder(store, pool, shard_rows=5)
    assert reads.take() == sorted([str(p) for p in new] + [str(pool / "cat" / "broken.png")])
    assert grown.n_samples == 21 and grown.n_reused == 18 and grown.n_quarantined == 1
    assert quarantine_of(store, grown) == quarantine_of(store, first)
    assert len(records(store)) == 1  # the older record was superseded
    same_as_from_scratch(store, grown, pool, tmp_path, shard_rows=5)
    reads.take()

    again = ingest_image_folder(store, pool, shard_rows=5)
    assert reads.take() == [str(pool / "cat" / "broken.png")] and again == grown and again.n_reused == 21


def test_rewritten_removed_moved_and_duplicated_files(tmp_path, monkeypatch):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=6)
    reads = ReadCount(monkeypatch)
    ingest_image_folder(store, pool, shard_rows=4)
    reads.take()

    rewritten = pool / "cat" / "img0.png"
    st = rewritten.stat()
    data = bytearray(rewritten.read_bytes())
    data[-20:-12] = b"\x01" * 8  # same size, other bytes (a damaged PNG chunk: quarantined)
    rewritten.write_bytes(bytes(data))
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime restored: only ctime tells
    (pool / "dog" / "img1.jpg").unlink()  # removed
    (pool / "fox" / "img2.JPG").rename(pool / "cat" / "img2.JPG")  # moved to another class: a new path
    (pool / "dog" / "aaa.png").write_bytes((pool / "dog" / "img0.png").read_bytes())  # duplicate listed first

    grown = ingest_image_folder(store, pool, shard_rows=4)
    assert reads.take() == sorted(str(p) for p in (rewritten, pool / "cat" / "img2.JPG", pool / "dog" / "aaa.png"))
    assert grown.n_reused == 14 and grown.n_samples == 15 and grown.n_quarantined == 1
    same_as_from_scratch(store, grown, pool, tmp_path, shard_rows=4)


def test_a_missing_shard_of_the_previous_dataset_is_read_from_the_sources(tmp_path, monkeypatch, caplog):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=6)
    first = ingest_image_folder(store, pool, shard_rows=4)
    shards = load_manifest(store, first.dataset).shards
    Path(store._path(store._rel_from_uri(shards[1].artifact.uri))).unlink()
    (pool / "dog" / "new.png").write_bytes(image_bytes(901))

    reads = ReadCount(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="storage.ingest.reuse"):
        grown = ingest_image_folder(store, pool, shard_rows=4)
    assert "in shards that are gone or damaged" in caplog.text
    assert grown.n_reused == 14 and len(reads.take()) == 5  # the missing shard's 4 files and the new one
    kept = {sh.artifact.sha256 for sh in load_manifest(store, grown.dataset).shards} & {
        sh.artifact.sha256 for sh in shards}
    assert shards[1].artifact.sha256 not in kept and len(kept) >= 1
    same_as_from_scratch(store, grown, pool, tmp_path, shard_rows=4)


def test_a_damaged_shard_is_kept_by_size_and_its_images_are_checked_where_they_are_read(tmp_path, monkeypatch):
    """A kept shard is checked by its size and its metadata, not read whole (that is the point of keeping it):
    a flipped image byte stays in the grown dataset, and every reader of its images names it. Once a growth
    rewrites that shard (a file of it removed), the image that does not hash to its id is read from its source."""
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=6)
    first = ingest_image_folder(store, pool, shard_rows=4)
    shards = load_manifest(store, first.dataset).shards
    damaged = Path(store._path(store._rel_from_uri(shards[3].artifact.uri)))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the image bytes: the Parquet file still reads, one image does not hash
    damaged.write_bytes(bytes(data))
    (pool / "dog" / "new.png").write_bytes(image_bytes(901))
    grown = ingest_image_folder(store, pool, shard_rows=4)
    assert shards[3] in load_manifest(store, grown.dataset).shards
    with pytest.raises(ArtifactCorruptedError, match=shards[3].artifact.sha256[:12]):
        read_shard(store, shards[3])

    fetched = []
    real = folder_mod.read_file_uri
    monkeypatch.setattr(folder_mod, "read_file_uri", lambda uri: fetched.append(uri) or real(uri))
    rows = pq.read_table(damaged).to_pylist()
    bad = [r["source_uri"] for r in rows if hashlib.sha256(r["data"]).hexdigest() != r["sample_id"]]
    assert len(bad) == 1
    removed = next(r["source_uri"] for r in rows if r["source_uri"] not in bad)
    Path(uri_path(removed)).unlink()  # the shard changes: rewritten, its images read through BaseSamples
    again = ingest_image_folder(store, pool, shard_rows=4)
    assert shards[3] not in load_manifest(store, again.dataset).shards
    assert fetched == bad
    same_as_from_scratch(store, again, pool, tmp_path, shard_rows=4)


def test_a_file_that_changes_during_the_ingest_is_an_error_not_a_stale_sample(tmp_path):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=2)
    first = ingest_image_folder(store, pool)
    sid = rows_of(store, first)[0][0]
    path = next(p for p in pool.rglob("*.*") if hashlib.sha256(p.read_bytes()).hexdigest() == sid)
    base = BaseSamples(store, first.dataset, folder_mod.read_file_uri)
    base.skip |= {sh.artifact.uri for sh in base.manifest.shards}  # as if the store had lost every shard
    assert base.fill([sid], [path.as_uri()]).to_pylist() == [path.read_bytes()]
    path.write_bytes(image_bytes(4242))
    base = BaseSamples(store, first.dataset, folder_mod.read_file_uri)
    base.skip |= {sh.artifact.uri for sh in base.manifest.shards}
    with pytest.raises(SourceError, match="changed while the pool was being ingested"):
        base.fill([sid], [path.as_uri()])


def test_no_reuse_across_decode_check_policies_or_from_a_corrupted_record(tmp_path, monkeypatch, caplog):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=4)
    reads = ReadCount(monkeypatch)
    ingest_image_folder(store, pool)
    reads.take()
    other_policy = ingest_image_folder(store, pool, max_pixels=10**7)
    assert other_policy.n_reused == 0 and len(reads.take()) == 12
    assert ingest_image_folder(store, pool).n_reused == 0  # the record is the other policy's now
    assert len(reads.take()) == 12 and ingest_image_folder(store, pool).n_reused == 12
    reads.take()

    (rel,) = records(store)
    path = Path(store._path(rel))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="storage.ingest.reuse"):
        result = ingest_image_folder(store, pool)
    assert result.n_reused == 0 and len(reads.take()) == 12 and "is corrupted" in caplog.text
    same_as_from_scratch(store, result, pool, tmp_path)


def test_a_failed_ingest_records_nothing_and_reuse_false_reads_everything(tmp_path, monkeypatch):
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=4)
    reads = ReadCount(monkeypatch)
    ingest_image_folder(store, pool)
    before = records(store)
    reads.take()
    (pool / "fox" / "same-as-a-cat.png").write_bytes((pool / "cat" / "img0.png").read_bytes())
    with pytest.raises(SourceError, match="conflicting labels"):
        ingest_image_folder(store, pool)
    assert records(store) == before  # nothing recorded for an ingest that published nothing
    (pool / "fox" / "same-as-a-cat.png").unlink()
    reads.take()
    assert ingest_image_folder(store, pool, reuse=False).n_reused == 0 and len(reads.take()) == 12
    assert records(store) == before


def test_fill_keeps_the_asked_order_across_batches_shards_and_fetched_samples(tmp_path, monkeypatch):
    """One ``fill`` call spanning several base batches and shards, with samples the base lacks in between (they
    are fetched): every image comes back at its own place."""
    monkeypatch.setattr(reuse_mod, "BASE_BATCH_ROWS", 2)
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    files = make_pool(pool, per_class=6)
    first = ingest_image_folder(store, pool, shard_rows=5)
    in_base = {sid for sid, _, _ in rows_of(store, first)}
    extra = {hashlib.sha256(image_bytes(700 + i)).hexdigest(): image_bytes(700 + i) for i in range(5)}
    by_id = {hashlib.sha256(data).hexdigest(): data for data in files.values()} | extra
    asked = sorted(in_base - {min(in_base)}) + sorted(extra)  # the first base row skipped, extras anywhere
    asked.sort()
    fetched = []
    base = BaseSamples(store, first.dataset, lambda uri: fetched.append(uri) or extra[uri])
    try:
        got = base.fill(asked, asked)  # the "URI" of a sample is its id here: only extras are fetched
    finally:
        base.close()
    assert got.to_pylist() == [by_id[sid] for sid in asked]
    assert sorted(fetched) == sorted(extra)


def test_source_hashes_round_trip_and_file_keys(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    key = file_key(str(path), path.stat())
    assert len(key) == 16 and key == file_key(str(path), path.stat())
    assert key != file_key(str(tmp_path / "g.bin"), path.stat())
    path.write_bytes(b"y" * 10)  # same size; ctime (and mtime) move
    os.utime(path, ns=(0, 0))
    assert file_key(str(path), path.stat()) != key

    pool = tmp_path / "pool"
    make_pool(pool, per_class=2)
    result = ingest_image_folder(store, pool)
    hashes = SourceHashes(store, {"kind": "image-folder", "root": str(pool)}, _policy())
    assert hashes.load() == result.dataset
    for sid, *_ in rows_of(store, result):
        match = [p for p in pool.rglob("*.*") if hashlib.sha256(p.read_bytes()).hexdigest() == sid]
        assert hashes.lookup(file_key(str(match[0]), match[0].stat())) == sid
    assert hashes.lookup(b"\0" * 16) is None
    assert SourceHashes(store, {"kind": "image-folder", "root": str(pool) + "x"}, _policy()).load() is None


def test_remove_rel_deletes_only_what_it_names(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    store.put_immutable("catalog/x/a.bin", b"a")
    assert store.remove_rel("catalog/x/a.bin") and not store.remove_rel("catalog/x/a.bin")
    with pytest.raises(ValueError):
        store.remove_rel("../outside")
    with pytest.raises((StorageError, ValueError)):
        store.remove_rel("/abs")


def _policy() -> dict:
    from storage.ingest.checked import check_policy

    return check_policy()


def test_a_grown_s3_manifest_downloads_only_new_or_changed_objects(s3_bucket, tmp_path, monkeypatch):
    import fsspec

    import storage.ingest.manifest as manifest_mod
    from storage.ingest import ingest_manifest

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    files = make_pool(tmp_path / "local", per_class=3, classes=("a", "b"))
    for rel, data in files.items():
        fs.pipe_file(f"{bucket}/pool/images/{rel}", data)

    def write_manifest(rels):
        lines = ["path,label"] + [f"images/{rel},{rel.split('/')[0]}" for rel in rels]
        fs.pipe_file(f"{bucket}/pool/manifest.csv", ("\n".join(lines) + "\n").encode())

    write_manifest(sorted(files))
    store = ArtifactStore(f"s3://{bucket}/store", storage_options=options)
    url = f"s3://{bucket}/pool/manifest.csv"
    fetched = []
    real = manifest_mod.fetch_and_check
    monkeypatch.setattr(manifest_mod, "fetch_and_check", lambda target, *a, **k: fetched.append(target) or
                        real(target, *a, **k))
    first = ingest_manifest(store, url, storage_options=options)
    assert len(fetched) == 6 and first.n_reused == 0
    fetched.clear()

    fs.pipe_file(f"{bucket}/pool/images/b/new.png", image_bytes(990))  # a new object
    fs.pipe_file(f"{bucket}/pool/images/a/img0.png", image_bytes(991))  # an object overwritten: a new ETag
    write_manifest([*sorted(files), "b/new.png"])
    grown = ingest_manifest(store, url, storage_options=options)
    assert sorted(fetched) == [f"s3://{bucket}/pool/images/a/img0.png", f"s3://{bucket}/pool/images/b/new.png"]
    assert grown.n_reused == 5 and grown.n_samples == 7

    fresh = ArtifactStore(f"s3://{bucket}/fresh", storage_options=options)
    other = ingest_manifest(fresh, url, storage_options=options, reuse=False)
    assert (grown.dataset.version, grown.n_samples) == (other.dataset.version, other.n_samples)
    same_dataset(store, grown.dataset, fresh, other.dataset)


def _shard(path: Path, start: int, n: int, broken: bool = False) -> None:
    members = []
    for i in range(start, start + n):
        members += [(f"s{i:04d}.png", image_bytes(i)), (f"s{i:04d}.cls", str(i % 3).encode())]
    if broken:
        members += [("zbad.png", image_bytes(999)[:30]), ("zbad.cls", b"1")]
    path.write_bytes(tar_bytes(members))


def test_unchanged_webdataset_tars_are_not_read_again(store, tmp_path, monkeypatch):
    """Local tars into a local store and into S3 (moto); a tar with a quarantined member is always read."""
    import storage.ingest.webdataset as wds_mod
    from storage.ingest import ingest_webdataset

    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "a.tar", 0, 6)
    _shard(shards / "b.tar", 6, 6, broken=True)
    opened = []
    real = wds_mod._tar_items
    monkeypatch.setattr(wds_mod, "_tar_items", lambda shard, *a: opened.append(Path(shard).name) or real(shard, *a))
    first = ingest_webdataset(store, shards)
    assert opened == ["a.tar", "b.tar"] and first.n_reused == 0 and first.n_quarantined == 1
    opened.clear()

    _shard(shards / "c.tar", 12, 4)  # the night's new tar
    grown = ingest_webdataset(store, shards)
    assert opened == ["b.tar", "c.tar"] and grown.n_reused == 6 and grown.n_samples == 16
    assert quarantine_of(store, grown) == quarantine_of(store, first)
    opened.clear()
    fresh = ArtifactStore(tmp_path / "fresh")
    other = ingest_webdataset(fresh, shards, reuse=False)
    assert grown.dataset.version == other.dataset.version and grown.n_quarantined == other.n_quarantined
    same_dataset(store, grown.dataset, fresh, other.dataset)
    opened.clear()

    again = ingest_webdataset(store, shards)  # c.tar is known now; b.tar still has its broken member
    assert opened == ["b.tar"] and again.n_reused == 10
    opened.clear()
    lists = store.list_paths(reuse_mod.TAR_MEMBERS_PREFIX)
    assert len(lists) == 2  # a.tar's and c.tar's
    (shards / "c.tar").unlink()  # a tar gone: its member list goes with the next ingest's record
    assert ingest_webdataset(store, shards).n_reused == 6 and len(store.list_paths(reuse_mod.TAR_MEMBERS_PREFIX)) == 1
    opened.clear()
    assert ingest_webdataset(store, shards, label_from=("cls", "txt")).n_reused == 0  # labels may differ: no reuse
    assert opened == ["a.tar", "b.tar"]


def test_tars_whose_samples_the_store_lost_are_read_whole_not_member_by_member(tmp_path, monkeypatch):
    """A shard gone from the store: the tars holding its samples are read in the first pass, once each (a member
    can only be read back by scanning its tar: one scan per lost sample would read a tar per sample); tars whose
    samples are all still in the store are not opened."""
    import storage.ingest.webdataset as wds_mod
    from storage.ingest import ingest_webdataset

    shards = tmp_path / "shards"
    shards.mkdir()
    for t in range(6):
        _shard(shards / f"{t}.tar", 10 * t, 3)
    store = ArtifactStore(tmp_path / "store")
    first = ingest_webdataset(store, shards, shard_rows=2)
    lost = load_manifest(store, first.dataset).shards[0]
    lost_ids = set(read_shard(store, lost, ["sample_id"])["sample_id"].to_pylist())
    Path(store._path(store._rel_from_uri(lost.artifact.uri))).unlink()
    opened = []
    real_items = wds_mod._tar_items
    monkeypatch.setattr(wds_mod, "_tar_items", lambda shard, *a: opened.append(Path(shard).name) or
                        real_items(shard, *a))
    monkeypatch.setattr(wds_mod, "_read_member", lambda *a: pytest.fail("a member read back from its tar"))
    grown = ingest_webdataset(store, shards, shard_rows=2)
    holding = {f"{t}.tar" for t in range(6)
               if lost_ids & {hashlib.sha256(image_bytes(10 * t + i)).hexdigest() for i in range(3)}}
    assert sorted(opened) == sorted(holding) and 0 < len(holding) <= 2  # a 2-row shard lost
    assert grown.n_reused == 3 * (6 - len(holding)) and grown.dataset.version == first.dataset.version
    fresh_store = ArtifactStore(tmp_path / "fresh")
    fresh = ingest_webdataset(fresh_store, shards, shard_rows=2, reuse=False)
    same_dataset(store, grown.dataset, fresh_store, fresh.dataset)


def test_a_tar_member_read_again_from_its_tar(tmp_path):
    import storage.ingest.webdataset as wds_mod
    from storage.ingest.reading import SourceFiles

    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "a.tar", 0, 4)
    uri = (shards / "a.tar").as_uri() + "#s0002.png"
    tars = {(shards / "a.tar").as_uri(): str(shards / "a.tar")}
    assert wds_mod._read_member(uri, SourceFiles(), tars) == image_bytes(2)
    with pytest.raises(FileNotFoundError):
        wds_mod._read_member(uri.replace("s0002", "s9999"), SourceFiles(), tars)
    with pytest.raises(FileNotFoundError):
        wds_mod._read_member(uri.replace("a.tar", "z.tar"), SourceFiles(), tars)  # not one of the pool's tars


def test_a_file_changed_within_the_timestamp_granularity_is_read_until_it_settles(tmp_path, monkeypatch):
    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 2_000_000_000)
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    st = path.stat()
    assert file_key(str(path), st) is None  # just written: a same-size rewrite in this tick would keep its stat
    assert file_key(str(path), st, now_ns=max(st.st_mtime_ns, st.st_ctime_ns) + 2_000_000_000) is not None

    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=2)
    reads = ReadCount(monkeypatch)
    ingest_image_folder(store, pool)
    assert ingest_image_folder(store, pool).n_reused == 0 and len(reads.take()) == 12  # nothing had settled


def test_a_file_this_process_cannot_open_is_read_not_reused(tmp_path, monkeypatch):
    """A from-scratch ingest would quarantine a file it cannot read (another user's run, mode 0600), so reuse
    must not accept it. Root opens anything, so the gate is exercised with a stand-in for 'cannot open'."""
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=3)
    first = ingest_image_folder(store, pool)
    reads = ReadCount(monkeypatch)
    readable = reuse_mod.readable
    monkeypatch.setattr(reuse_mod, "readable", lambda path: not path.endswith("img1.jpg"))
    grown = ingest_image_folder(store, pool)
    assert grown.n_reused == first.n_samples - 3 and len(reads.take()) == 3  # the three img1.jpg were read
    assert readable(str(pool / "cat" / "img0.png")) and not readable(str(pool / "nothing"))


def test_non_utf8_file_names_and_hash_signs_round_trip_through_uris(tmp_path):
    import storage.ingest.webdataset as wds_mod
    from storage.ingest.reading import SourceFiles

    name = os.fsdecode(b"caf\xe9.png")  # not UTF-8: a surrogate-escaped str
    path = tmp_path / name
    path.write_bytes(b"abc")
    assert folder_mod.read_file_uri(path.as_uri()) == b"abc"
    tar = tmp_path / "a#b.tar"
    tar.write_bytes(tar_bytes([("s#0001.png", b"png bytes"), ("s#0001.cls", b"1")]))
    uri = tar.as_uri() + "#s#0001.png"
    assert wds_mod._read_member(uri, SourceFiles(), {tar.as_uri(): str(tar)}) == b"png bytes"


def test_object_keys_only_for_object_stores_and_strong_tags():
    from storage.ingest.reuse import object_key

    info = {"size": 3, "ETag": '"abc"'}
    assert object_key("s3://b/k.png", info) is not None and object_key("gs://b/k.png", info) is not None
    assert object_key("https://host/k.png", info) is None  # an HTTP ETag is often size + mtime
    assert object_key("s3://b/k.png", {"size": 3, "ETag": 'W/"abc"'}) is None
    assert object_key("s3://b/k.png", {"size": 3, "LastModified": "x"}) is None


def test_a_webdataset_spec_that_grows_keeps_its_record(tmp_path):
    """A list with one more tar, or a brace range that grows, is the same pool: the tars' folder names it."""
    from storage.ingest import ingest_webdataset

    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "p-0.tar", 0, 6)
    _shard(shards / "p-1.tar", 6, 6)
    store = ArtifactStore(tmp_path / "store")
    ingest_webdataset(store, [str(shards / "p-0.tar"), str(shards / "p-1.tar")])
    _shard(shards / "p-2.tar", 12, 6)
    assert ingest_webdataset(store, [str(shards / f"p-{i}.tar") for i in range(3)]).n_reused == 12
    _shard(shards / "p-3.tar", 18, 6)
    assert ingest_webdataset(store, str(shards / "p-{0..3}.tar")).n_reused == 18


def test_lost_ranges_cover_exactly_the_ids_of_the_shards_that_are_gone(tmp_path):
    from storage.datasets import write_samples
    from storage.ingest.reuse import lost_ranges

    store = ArtifactStore(tmp_path / "store")
    rows = [{"data": image_bytes(i), "label": "ab"[i % 2], "split": "train", "source_uri": f"file:///{i}.png"}
            for i in range(15)]
    shards = load_manifest(store, write_samples(store, rows, shard_rows=3)).shards
    ids = [read_shard(store, s, ["sample_id"])["sample_id"].to_pylist() for s in shards]
    assert lost_ranges(store, shards) == []
    for k in (0, 2, 3):  # the first shard, and two in a row
        Path(store._path(store._rel_from_uri(shards[k].artifact.uri))).unlink()
    last = Path(store._path(store._rel_from_uri(shards[4].artifact.uri)))
    last.write_bytes(last.read_bytes()[:-1])  # the last one truncated: another size
    ranges = lost_ranges(store, shards)
    assert ranges == [("", ids[1][0]), (ids[1][-1], "g")]  # shards 2, 3 and 4 (another size): one run to the end
    hashes = SourceHashes(store, {"kind": "test"}, {})
    hashes._lost, hashes._lost_lows = ranges, [lo for lo, _ in ranges]
    assert {sid for k in (0, 2, 3, 4) for sid in ids[k]} == {sid for s in ids for sid in s if hashes.lost(sid)}


def test_a_refused_size_check_on_a_gone_shard_reads_its_files_and_a_truncated_shard_is_repaired(tmp_path,
                                                                                                 monkeypatch, caplog):
    """S3 answers a HEAD on a missing key with 403 to a caller without ListBucket (s3fs: PermissionError): the
    shard is lost, not the ingest. A truncated shard that the grown dataset writes again, byte for byte, is
    replaced by the good copy (its name is the sha256 of the right bytes)."""
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    make_pool(pool, per_class=8)
    first = ingest_image_folder(store, pool, shard_rows=3)
    shards = load_manifest(store, first.dataset).shards
    gone = store._path(store._rel_from_uri(shards[2].artifact.uri))
    store.fs.rm(gone)
    cut = Path(store._path(store._rel_from_uri(shards[5].artifact.uri)))
    cut.write_bytes(cut.read_bytes()[:-7])
    real = type(store.fs).size

    def size(self, path, *args, **kwargs):
        if path == gone:
            raise PermissionError(13, "Forbidden")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(store.fs), "size", size)
    reads = ReadCount(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = ingest_image_folder(store, pool, shard_rows=3)
    assert again.dataset.version == first.dataset.version and len(reads.take()) == 6  # the two lost shards' files
    assert "replaced by a good copy" in caplog.text and "reusing" not in caplog.text  # lost shards: not tried
    assert cut.stat().st_size == shards[5].artifact.size
    monkeypatch.setattr(type(store.fs), "size", real)
    same_as_from_scratch(store, again, pool, tmp_path, shard_rows=3)


def test_one_present_row_between_two_lost_shards_is_not_lost(tmp_path):
    from storage.datasets import write_samples
    from storage.ingest.reuse import lost_ranges

    store = ArtifactStore(tmp_path / "store")
    rows = [{"data": image_bytes(i), "label": "ab"[i % 2], "split": "train", "source_uri": f"file:///{i}.png"}
            for i in range(3)]
    shards = load_manifest(store, write_samples(store, rows, shard_rows=1)).shards
    ids = [read_shard(store, s, ["sample_id"])["sample_id"].to_pylist()[0] for s in shards]
    for k in (0, 2):
        Path(store._path(store._rel_from_uri(shards[k].artifact.uri))).unlink()
    hashes = SourceHashes(store, {"kind": "test"}, {})
    hashes._lost = lost_ranges(store, shards)
    hashes._lost_lows = [lo for lo, _ in hashes._lost]
    assert hashes._lost == [("", ids[1]), (ids[1], "g")]
    assert [hashes.lost(sid) for sid in ids] == [True, False, True]
