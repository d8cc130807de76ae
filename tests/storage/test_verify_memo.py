"""The machine-local memo of verified artifacts (storage/verify_memo.py): an artifact is hashed again only when
the state its store reports (a local stat, an S3 ETag) changed — every damage, replacement or deletion is still
caught — and the memo lives on this machine, never in the store."""

from __future__ import annotations

import os
import time

import pytest

import storage.verify_memo as memo_mod
from storage.artifacts import ArtifactStore
from storage.errors import ArtifactCorruptedError, ArtifactNotFoundError
from storage.verify_memo import VerifyMemo, memo_dir, object_state, verify_remembered


@pytest.fixture
def later(monkeypatch):
    """The settle rule's clock 3 s ahead, so objects written just now have a state; a write made after a state was
    recorded still lands on a later clock tick (see ``settle``)."""
    monkeypatch.setattr(memo_mod, "_now_ns", lambda: time.time_ns() + 3_000_000_000)


def settle() -> None:
    time.sleep(0.05)  # past the filesystem's timestamp tick: the next write gets a later ctime


def objects(store: ArtifactStore) -> list[str]:
    return store.list_paths("objects")


def path_of(store: ArtifactStore, ref) -> str:
    return store._path(store._rel_from_uri(ref.uri))


def overwrite(store: ArtifactStore, ref, data: bytes) -> None:
    """Replace the object's bytes in place (same size), keeping its mtime where the store allows it."""
    if store.is_local:
        target = path_of(store, ref)
        st = os.stat(target)
        with open(target, "r+b") as fh:
            fh.write(data)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime back as it was: the ctime still moves
    else:
        store.fs.pipe_file(path_of(store, ref), data)
        store.fs.invalidate_cache()


def test_an_unchanged_artifact_is_hashed_once_per_machine_and_the_store_holds_no_memo(store, tmp_path, later):
    memo = VerifyMemo(tmp_path / "memo")
    ref = store.put_bytes(b"0123456789" * 100, "features", ".parquet")
    before = objects(store)
    assert object_state(store, ref) is not None
    assert verify_remembered(store, ref, memo) is True  # hashed
    assert verify_remembered(store, ref, memo) is False  # the same state: not read again
    assert verify_remembered(store, ref, VerifyMemo(tmp_path / "other")) is True  # another machine's memo
    assert objects(store) == before and len(list((tmp_path / "memo").rglob("*"))) == 2  # a folder and a record


def test_a_damaged_replaced_or_deleted_artifact_is_caught_after_it_was_remembered(store, tmp_path, later):
    memo = VerifyMemo(tmp_path / "memo")
    ref = store.put_bytes(b"a" * 1000, "sketch", ".parquet")
    verify_remembered(store, ref, memo)
    settle()
    overwrite(store, ref, b"b" * 1000)  # same size; locally the same mtime too
    with pytest.raises(ArtifactCorruptedError, match=ref.sha256[:12]):
        verify_remembered(store, ref, memo)
    overwrite(store, ref, b"a" * 1000)  # the right bytes again: hashed locally (another ctime); on S3 the ETag is
    assert verify_remembered(store, ref, memo) is store.is_local  # the bytes' MD5, so the remembered state is back
    store.fs.rm(path_of(store, ref))
    store.fs.invalidate_cache()
    with pytest.raises(ArtifactNotFoundError):
        verify_remembered(store, ref, memo)


def test_a_local_file_replaced_by_another_of_the_same_size_and_mtime_is_hashed(tmp_path, later):
    store = ArtifactStore(tmp_path / "store")
    memo = VerifyMemo(tmp_path / "memo")
    ref = store.put_bytes(b"x" * 64, "model", ".json")
    verify_remembered(store, ref, memo)
    target = path_of(store, ref)
    st = os.stat(target)
    forged = tmp_path / "forged"
    forged.write_bytes(b"y" * 64)
    os.utime(forged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(forged, target)  # another inode
    with pytest.raises(ArtifactCorruptedError):
        verify_remembered(store, ref, memo)


def test_a_recently_changed_object_has_no_state_and_is_always_hashed(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    memo = VerifyMemo(tmp_path / "memo")
    ref = store.put_bytes(b"z" * 64, "model", ".json")
    assert object_state(store, ref) is None  # written less than SETTLE_NS ago
    assert verify_remembered(store, ref, memo) is True
    assert verify_remembered(store, ref, memo) is True
    assert not (tmp_path / "memo").exists()


def test_the_memo_folder_is_machine_local_and_can_be_turned_off(monkeypatch, tmp_path, later):
    monkeypatch.setenv("SKMM_CACHE_DIR", str(tmp_path / "cache"))
    assert memo_dir() == tmp_path / "cache" / "verified"
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_bytes(b"w" * 64, "model", ".json")
    assert verify_remembered(store, ref) is True and verify_remembered(store, ref) is False
    monkeypatch.setenv("SKMM_CACHE_DIR", "off")
    assert memo_dir() is None
    assert verify_remembered(store, ref) is True and verify_remembered(store, ref) is True
    monkeypatch.delenv("SKMM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert memo_dir() == tmp_path / "xdg" / "skmm" / "verified"
