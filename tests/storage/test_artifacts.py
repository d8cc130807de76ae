"""The artifact store on local disk and on a real S3 protocol server: round trips, immutability, verification,
crash safety and clear errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest
from helpers import free_port, s3_options

from storage.artifacts import STAGING_MAX_AGE_S, ArtifactRef, ArtifactStore, staging_max_age_s
from storage.errors import (
    ArtifactCorruptedError,
    ArtifactNotFoundError,
    MalformedRecordError,
    StorageError,
    StoreUnavailableError,
)


def test_round_trip_and_content_address(store):
    ref = store.put_bytes(b"hello skmm", "blob", ".txt")
    assert ref.sha256 == hashlib.sha256(b"hello skmm").hexdigest()
    assert ref.size == 10 and ref.kind == "blob" and ref.uri.endswith(f"objects/blob/{ref.sha256}.txt")
    assert store.get_bytes(ref) == b"hello skmm"
    assert store.exists(ref)
    assert ArtifactRef.from_dict(ref.to_dict()) == ref
    with store.local_path(ref) as path:
        assert path.read_bytes() == b"hello skmm"


def test_same_bytes_same_ref_and_no_rewrite(store):
    first = store.put_bytes(b"x" * 1000, "blob")
    path = store._path(store._rel_from_uri(first.uri))
    before = store.fs.info(path)
    time.sleep(0.05)
    second = store.put_bytes(b"x" * 1000, "blob")
    assert second == first
    after = store.fs.info(path)
    assert after.get("mtime", after.get("LastModified")) == before.get("mtime", before.get("LastModified"))


def test_streamed_writer_and_put_file(store, tmp_path):
    src = tmp_path / "big.bin"
    payload = os.urandom(3 * 2**20 + 17)
    src.write_bytes(payload)
    ref = store.put_file(src, "blob", ".bin")
    assert ref.size == len(payload) and store.get_bytes(ref) == payload
    with store.writer("blob") as fh:
        for i in range(0, len(payload), 65536):
            fh.write(payload[i:i + 65536])
    assert fh.ref.sha256 == ref.sha256


def test_failed_write_leaves_nothing_visible(store):
    with pytest.raises(RuntimeError), store.writer("blob") as fh:
        fh.write(b"partial")
        raise RuntimeError("crash in the middle")
    assert store.list_paths("objects") == []


def test_corrupted_artifact_is_detected_and_named(store):
    ref = store.put_bytes(b"0123456789", "blob")
    path = store._path(store._rel_from_uri(ref.uri))
    data = bytearray(store.fs.cat_file(path))
    data[3] ^= 0x01  # one byte flipped
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(ArtifactCorruptedError, match=ref.sha256[:12]) as info:
        store.get_bytes(ref)
    assert ref.uri in str(info.value)
    with pytest.raises(ArtifactCorruptedError):
        store.verify(ref)


def test_missing_artifact_is_named(store):
    ref = store.put_bytes(b"gone soon", "blob")
    store.fs.rm(store._path(store._rel_from_uri(ref.uri)))
    store.fs.invalidate_cache()
    with pytest.raises(ArtifactNotFoundError, match="not found") as info:
        store.get_bytes(ref)
    assert ref.uri in str(info.value)
    assert not store.exists(ref)


def test_put_immutable_refuses_to_overwrite(store):
    uri = store.put_immutable("lineage/events/a.json", b"{}")
    assert uri.endswith("lineage/events/a.json")
    with pytest.raises(StorageError, match="refusing to overwrite"):
        store.put_immutable("lineage/events/a.json", b"{}")
    assert store.read_rel("lineage/events/a.json") == b"{}"
    assert store.list_paths("lineage") == ["lineage/events/a.json"]


@pytest.mark.parametrize("bad", [
    {"uri": "x", "sha256": "nothex", "size": 1, "kind": "blob"},
    {"uri": "x", "sha256": "0" * 64, "size": -1, "kind": "blob"},
    {"uri": "", "sha256": "0" * 64, "size": 1, "kind": "blob"},
    {"uri": "x", "sha256": "0" * 64, "size": 1, "kind": "Bad Kind"},
    {"uri": "x", "sha256": "0" * 64, "size": 1},
    "not a dict",
])
def test_malformed_ref(bad):
    with pytest.raises(MalformedRecordError):
        ArtifactRef.from_dict(bad)


def test_bad_kind_and_suffix(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        store.put_bytes(b"x", "Bad/Kind")
    with pytest.raises(ValueError, match="suffix"):
        store.put_bytes(b"x", "blob", "../x")


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    options = s3_options(s3_endpoint)
    options["secret"] = "sup3r-s3cret-value"
    store = ArtifactStore("s3://no-such-bucket-here/prefix", storage_options=options)
    with pytest.raises(StoreUnavailableError, match="bucket") as info:
        store.put_bytes(b"x", "blob")
    assert "sup3r-s3cret-value" not in str(info.value) and "Traceback" not in str(info.value)
    with pytest.raises(StoreUnavailableError):
        store.check()


def test_unreachable_endpoint_is_a_clear_error():
    options = s3_options(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    options["secret"] = "sup3r-s3cret-value"
    store = ArtifactStore("s3://bucket/prefix", storage_options=options)
    with pytest.raises(StoreUnavailableError, match="cannot reach the store") as info:
        store.put_bytes(b"x", "blob")
    assert "sup3r-s3cret-value" not in str(info.value)


def test_credentials_in_urls_are_redacted():
    from storage.errors import redact

    assert "hunter2" not in redact("s3://AKIA:hunter2@bucket/key")
    assert "hunter2" not in redact("https://host/obj?X-Amz-Signature=hunter2&x=1")
    assert "hunter2" not in repr(ArtifactStore("memory://user:hunter2@x"))


def test_writer_killed_mid_write_leaves_no_visible_artifact(tmp_path):
    """A real subprocess killed with SIGKILL while streaming: no partial object; the next write succeeds."""
    root = tmp_path / "store"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from storage.artifacts import ArtifactStore
        store = ArtifactStore({str(root)!r})
        with store.writer("blob") as fh:
            fh.write(b"a" * 1_000_000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    store = ArtifactStore(root)
    assert store.list_paths("objects") == []
    ref = store.put_bytes(b"a" * 1_000_000, "blob")
    assert store.get_bytes(ref) == b"a" * 1_000_000
    # The killed writer's staging file is debris: kept while it might still be written, removed once old.
    (leftover,) = (root / "tmp").iterdir()
    assert leftover.stat().st_size == 1_000_000 and store.clean_staging() == []
    _age(leftover, STAGING_MAX_AGE_S + 60)
    (gone,) = store.clean_staging()
    assert (gone.path, gone.size) == (str(leftover), 1_000_000) and not leftover.exists()
    assert store.get_bytes(ref) == b"a" * 1_000_000


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temp dir, for this test only (remote stores stage there, in a per-user folder)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_clean_staging_removes_only_old_staging_leftovers(store, private_tmp):
    ref = store.put_bytes(b"published", "blob")
    staging = store.staging_dir()
    assert staging == (store._path("tmp") if store.is_local else str(private_tmp / f"skmm-staging-{os.getuid()}"))
    os.makedirs(staging, exist_ok=True)
    old_file = os.path.join(staging, f".{uuid.uuid4().hex}-killed-writer")
    old_dir = os.path.join(staging, f".{uuid.uuid4().hex}-killed-reader")  # a remote read's local copy
    fresh = os.path.join(staging, f".{uuid.uuid4().hex}-live-writer")
    busy_dir = os.path.join(staging, f".{uuid.uuid4().hex}-live-reader")  # old folder, file still being written
    foreign = os.path.join(staging, "not-a-staging-name")
    os.mkdir(old_dir)
    os.mkdir(busy_dir)
    for path, size in ((old_file, 300), (os.path.join(old_dir, "copy"), 200), (fresh, 100),
                       (os.path.join(busy_dir, "copy"), 100), (foreign, 50)):
        with open(path, "wb") as fh:
            fh.write(b"x" * size)
    for path in (old_file, os.path.join(old_dir, "copy"), old_dir, busy_dir, foreign):
        _age(path, 2 * 3600)

    listed = store.clean_staging(3600, dry_run=True)
    assert sorted((e.path, e.size) for e in listed) == sorted([(old_file, 300), (old_dir, 200)])
    assert all(e.age_s > 3600 for e in listed) and os.path.exists(old_file) and os.path.exists(old_dir)
    assert store.clean_staging() == []  # the default age (24 h): nothing is old enough
    removed = store.clean_staging(3600)
    assert sorted(e.path for e in removed) == sorted([old_file, old_dir])
    assert not os.path.exists(old_file) and not os.path.exists(old_dir)
    assert os.path.exists(fresh) and os.path.exists(foreign) and os.path.exists(busy_dir)
    assert store.get_bytes(ref) == b"published"  # published objects are never staging
    assert store.clean_staging(3600) == []


def test_staging_age_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SKMM_STAGING_MAX_AGE_HOURS", raising=False)
    assert staging_max_age_s() == STAGING_MAX_AGE_S == 24 * 3600
    monkeypatch.setenv("SKMM_STAGING_MAX_AGE_HOURS", "2.5")
    assert staging_max_age_s() == 9000
    for bad in ("soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("SKMM_STAGING_MAX_AGE_HOURS", bad)
        with pytest.raises(ValueError, match="SKMM_STAGING_MAX_AGE_HOURS must be a positive number of hours"):
            staging_max_age_s()


def test_writes_stage_in_the_staging_folder_only(store, private_tmp):
    """Objects and fixed-path records (lineage events) stage in the one folder that clean_staging looks at,
    never beside their target; nothing stays there after a write."""
    store.put_bytes(b"object", "blob")
    store.put_immutable("lineage/events/run/a.json", b"{}")
    with store.local_path(store.put_bytes(b"read me", "blob")) as path:
        assert path.read_bytes() == b"read me"
    if store.is_local:
        files = [p for p in os.listdir(store.root) if p != "tmp"]
        assert sorted(files) == ["lineage", "objects"]
        assert not any(name.startswith(".") for _, _, names in os.walk(store.root) for name in names)
    assert os.listdir(store.staging_dir()) == []
