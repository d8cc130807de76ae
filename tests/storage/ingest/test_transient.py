"""A read that a retry may fix (a timeout, EIO, a reset connection) fails the ingest as a transient error instead
of quarantining the file: the ingest's cache key is the source's metadata, which a failed read leaves unchanged,
so a quarantined-by-accident file would stay out of the dataset on every later run. Problems of the file itself
(missing, unreadable by permission, not an image) are still quarantined."""

from __future__ import annotations

import builtins
import errno

import pytest
from ingest_pools import make_pool, quarantine_of

from storage.artifacts import ArtifactStore
from storage.errors import StorageError
from storage.ingest import ingest_image_folder, ingest_manifest
from storage.ingest import manifest as manifest_module
from storage.ingest.common import one_line, transient_read_error


def _failing_open(target: str, exc: BaseException):
    real = builtins.open

    def fake(path, *args, **kwargs):
        if str(path).endswith(target):
            raise exc
        return real(path, *args, **kwargs)

    return fake


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), TimeoutError("read timed out"),
                                 ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")])
def test_a_transient_folder_read_fails_the_ingest_and_publishes_nothing(tmp_path, monkeypatch, exc):
    make_pool(tmp_path / "pool")
    store = ArtifactStore(tmp_path / "store")
    monkeypatch.setattr("storage.ingest.folder.open", _failing_open("img1.jpg", exc), raising=False)
    with pytest.raises(StorageError, match=r"cannot read .*img1\.jpg.*rerun when it is reachable") as info:
        ingest_image_folder(store, tmp_path / "pool")
    assert info.value.transient
    assert not list((tmp_path / "store").glob("objects/dataset/*"))  # no dataset was published


def test_a_permission_problem_is_still_quarantined(tmp_path, monkeypatch):
    make_pool(tmp_path / "pool")
    store = ArtifactStore(tmp_path / "store")
    monkeypatch.setattr("storage.ingest.folder.open",
                        _failing_open("img1.jpg", PermissionError(errno.EACCES, "Permission denied")), raising=False)
    result = ingest_image_folder(store, tmp_path / "pool")
    reasons = [reason for _, reason in quarantine_of(store, result)]
    assert len(reasons) == 3 and all(r.startswith("cannot read file: PermissionError") for r in reasons)


def test_a_transient_manifest_read_fails_the_ingest(tmp_path, monkeypatch):
    files = make_pool(tmp_path / "pool")
    manifest = tmp_path / "pool.csv"
    manifest.write_text("path,label\n" + "".join(f"pool/{rel},{rel.split('/')[0]}\n" for rel in files))
    real = manifest_module._read_local

    def flaky(target: str) -> bytes:
        if target.endswith("img1.jpg"):
            raise TimeoutError("read timed out")
        return real(target)

    monkeypatch.setattr(manifest_module, "_read_local", flaky)
    with pytest.raises(StorageError, match=r"img1\.jpg") as info:
        ingest_manifest(ArtifactStore(tmp_path / "store"), manifest)
    assert info.value.transient


def test_classification_and_redaction():
    assert transient_read_error(TimeoutError()) and transient_read_error(OSError(errno.EIO, "eio"))
    assert not transient_read_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))  # a dead link
    assert not transient_read_error(PermissionError(errno.EACCES, "denied"))
    assert not transient_read_error(FileNotFoundError("gone"))
    line = one_line(OSError("cannot GET https://alice:s3cret@host/pool/a.jpg?X-Amz-Signature=abc123"))
    assert "s3cret" not in line and "abc123" not in line
