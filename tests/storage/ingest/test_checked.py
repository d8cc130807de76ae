"""The store's record of images that passed the decode check: a grown pool decodes only its new files, and the
dataset is byte-identical to a from-scratch ingest; changed bytes, another policy, a corrupted record or a
failed ingest never let an image skip its check."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest
from helpers import tar_bytes
from ingest_pools import image_bytes, make_pool, quarantine_of, rows_of

import storage.ingest.checked as checked_mod
from storage.artifacts import ArtifactStore
from storage.datasets import load_manifest
from storage.ingest import SourceError, ingest_image_folder, ingest_manifest, ingest_webdataset
from storage.ingest.checked import CHECKED_PREFIX, CheckedImages


class DecodeCount:
    """Counts the real decode checks the ingest runs (wraps the real function; verdicts unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real, self.n, self._lock = checked_mod.decode_problem, 0, threading.Lock()
        monkeypatch.setattr(checked_mod, "decode_problem", self)

    def __call__(self, data: bytes, max_pixels: int) -> str | None:
        with self._lock:
            self.n += 1
        return self.real(data, max_pixels)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def records(store: ArtifactStore) -> list[str]:
    return store.list_paths(CHECKED_PREFIX, "**/*.ids")


def same_dataset(a: ArtifactStore, ra, b: ArtifactStore, rb) -> None:
    assert ra.dataset.version == rb.dataset.version and ra.dataset.num_rows == rb.dataset.num_rows
    shards = [[(s.artifact.sha256, s.num_rows) for s in load_manifest(st, r.dataset).shards]
              for st, r in ((a, ra), (b, rb))]
    assert shards[0] == shards[1]  # the very same shard bytes
    assert rows_of(a, ra) == rows_of(b, rb)


def test_a_grown_folder_decodes_only_its_new_images_and_matches_a_from_scratch_ingest(store, tmp_path, monkeypatch):
    """On a local store and on S3 (moto): the record is listed and read through the store's filesystem."""
    pool = tmp_path / "pool"
    make_pool(pool, per_class=6)
    (pool / "cat" / "broken.png").write_bytes(image_bytes(77)[:40])  # quarantined: checked on every run
    count = DecodeCount(monkeypatch)
    first = ingest_image_folder(store, pool, shard_rows=5)
    assert count.take() == 19 and first.n_samples == 18 and first.n_quarantined == 1
    assert len(records(store)) == 1

    for i in range(3):  # the pool grows by three images; the old ones are unchanged
        (pool / "dog" / f"new{i}.png").write_bytes(image_bytes(900 + i))
    grown = ingest_image_folder(store, pool, shard_rows=5)
    assert count.take() == 3 + 1  # the new images and the quarantined one, nothing else
    assert grown.n_samples == 21 and grown.n_quarantined == 1
    assert quarantine_of(store, grown) == quarantine_of(store, first)
    assert len(records(store)) == 2

    fresh = ArtifactStore(tmp_path / "fresh")
    same_dataset(store, grown, fresh, ingest_image_folder(fresh, pool, shard_rows=5))
    assert count.take() == 22  # a store without the record checks everything

    again = ingest_image_folder(store, pool, shard_rows=5)  # unchanged: nothing decoded, nothing recorded
    assert count.take() == 1 and again == grown and len(records(store)) == 2


def test_bytes_rewritten_in_place_with_the_same_size_and_mtime_are_checked_again(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    files = make_pool(pool, per_class=4)
    store = ArtifactStore(tmp_path / "store")
    ingest_image_folder(store, pool)
    count = DecodeCount(monkeypatch)
    rel = next(r for r in files if r.endswith(".png"))
    path = pool / rel
    stat = path.stat()
    good = path.read_bytes()
    bad = good[:len(good) // 2] + bytes(len(good) - len(good) // 2)  # same size, corrupt body
    path.write_bytes(bad)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # metadata unchanged, as a restoring tool would
    result = ingest_image_folder(store, pool)
    assert count.take() == 1  # its new bytes have a new id: decoded, and refused
    assert [uri for uri, _ in quarantine_of(store, result)] == [path.as_uri()]
    assert result.n_samples == len(files) - 1


def test_another_policy_checks_every_image_again(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    make_pool(pool, per_class=3)
    store = ArtifactStore(tmp_path / "store")
    ingest_image_folder(store, pool)
    count = DecodeCount(monkeypatch)
    ingest_image_folder(store, pool, max_pixels=10_000)
    assert count.take() == 9
    with pytest.raises(SourceError):  # every image is 24 × 24: all too large now, none skips its check
        ingest_image_folder(store, pool, max_pixels=24 * 24 - 1)
    assert count.take() == 9
    assert len({r.split("/")[2] for r in records(store)}) == 2  # one record folder per policy that passed images


def test_a_corrupted_record_is_ignored_with_a_warning_and_its_images_are_checked(tmp_path, monkeypatch, caplog):
    pool = tmp_path / "pool"
    make_pool(pool, per_class=3)
    store = ArtifactStore(tmp_path / "store")
    first = ingest_image_folder(store, pool)
    (rel,) = records(store)
    target = Path(store.root) / rel
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # plant a different id under the record's name
    os.chmod(target, 0o644)
    target.write_bytes(bytes(data))
    count = DecodeCount(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="storage.ingest.checked"):
        again = ingest_image_folder(store, pool, reuse=False)  # read every file (unchanged ones are not, else)
    assert count.take() == 9 and again == first
    assert "corrupted" in caplog.text


def test_a_failed_ingest_records_nothing(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    make_pool(pool, per_class=3)
    (pool / "dog" / "twin.png").write_bytes((pool / "cat" / "img0.png").read_bytes())  # one image, two classes
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(SourceError, match="conflicting labels"):
        ingest_image_folder(store, pool)
    assert records(store) == []


def test_a_digest_ending_in_nul_bytes_is_found(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    checker = CheckedImages(store)
    ids = [bytes(31) + b"\x00", b"\x01" * 31 + b"\x00", hashlib.sha256(b"x").digest(), b"\xff" * 32]
    checker._fresh = bytearray(b"".join(ids))
    checker.commit()
    reader = CheckedImages(store)
    assert all(reader.known(d) for d in ids)
    assert not reader.known(b"\x01" * 30 + b"\x00\x01") and not reader.known(bytes(30) + b"\x01\x00")


def test_manifest_and_webdataset_sources_share_the_record(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    files = make_pool(pool, per_class=3)
    store = ArtifactStore(tmp_path / "store")
    ingest_image_folder(store, pool)
    count = DecodeCount(monkeypatch)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{pool / r},{r.split('/')[0]}\n" for r in files))
    assert ingest_manifest(store, manifest).n_samples == 9
    assert count.take() == 0
    members = []
    for i, (rel, data) in enumerate(files.items()):
        members += [(f"{i:05d}.{rel.rsplit('.', 1)[1].lower()}", data), (f"{i:05d}.txt", rel.split("/")[0].encode())]
    members += [("99999.png", image_bytes(4242)), ("99999.txt", b"cat")]
    (tmp_path / "pool-0.tar").write_bytes(tar_bytes(members))
    assert ingest_webdataset(store, str(tmp_path / "pool-0.tar")).n_samples == 10
    assert count.take() == 1  # only the image no source had brought before


def test_the_record_holds_each_digest_once_sorted(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    checker = CheckedImages(store)
    ids = [hashlib.sha256(bytes([i])).digest() for i in (3, 1, 2)]
    checker._fresh = bytearray(b"".join(ids + ids[:2]))  # two ingest threads passed the same bytes
    uri = checker.commit()
    body = (tmp_path / "store" / uri.split("/store/", 1)[1]).read_bytes()
    assert body == b"skmm-decode-checked/1\n" + b"".join(sorted(ids))
    assert all(CheckedImages(store).known(d) for d in ids)
