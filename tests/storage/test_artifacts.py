"""The artifact store on local disk and on a real S3 protocol server: round trips, immutability, verification,
crash safety and clear errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import free_port, s3_options

from storage.artifacts import ArtifactRef, ArtifactStore
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
