"""Content cache keys: refs count by content, not location; inputs that cannot be keyed fail loudly."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.cache import ContentCache, content_view
from tasks.ingest import source_fingerprint

REF = {"uri": "file:///a/objects/x/abc", "sha256": "ab" * 32, "size": 3, "kind": "x"}


def key(policy: ContentCache, inputs: dict, name: str = "t") -> str:
    return policy.compute_key(SimpleNamespace(task=SimpleNamespace(name=name)), inputs, {})


def test_refs_count_by_content_not_location():
    moved = {**REF, "uri": "s3://elsewhere/objects/x/abc"}
    policy = ContentCache(code_version="1")
    assert key(policy, {"ref": REF}) == key(policy, {"ref": moved})
    assert key(policy, {"ref": REF}) != key(policy, {"ref": {**REF, "sha256": "cd" * 32}})
    assert content_view({"dataset": {"manifest": REF, "version": "v"}})["dataset"]["manifest"] == {
        "kind": "x", "sha256": "ab" * 32, "size": 3}


def test_code_version_task_name_and_ignored_inputs():
    a, b = ContentCache(code_version="1"), ContentCache(code_version="2")
    assert key(a, {"x": 1}) != key(b, {"x": 1})
    assert key(a, {"x": 1}, "t1") != key(a, {"x": 1}, "t2")
    quiet = ContentCache(code_version="1", ignore=("progress",))
    assert key(quiet, {"x": 1, "progress": True}) == key(quiet, {"x": 1, "progress": False})


def test_fields_are_keyword_only_so_records_stay_put():
    with pytest.raises(TypeError):
        ContentCache("1")  # would land in CachePolicy.key_storage
    assert ContentCache(code_version="1").key_storage is None


def test_uncacheable_input_raises_instead_of_returning_none():
    with pytest.raises(TypeError, match="pass refs, not data"):
        key(ContentCache(code_version="1"), {"x": np.zeros(3)})


def test_folder_fingerprint_ignores_the_path(tmp_path):
    """A pool moved or copied with its timestamps (cp -a) keeps its key: relative paths, sizes, mtimes."""
    (tmp_path / "a" / "cat").mkdir(parents=True)
    (tmp_path / "a" / "cat" / "1.png").write_bytes(b"same bytes")
    shutil.copytree(tmp_path / "a", tmp_path / "b/c")  # copy2: timestamps kept
    fa = source_fingerprint({"kind": "folder", "path": str(tmp_path / "a"), "seed": 0})
    fb = source_fingerprint({"kind": "folder", "path": str(tmp_path / "b/c"), "seed": 0})
    assert fa == fb and "path" not in fa
    (tmp_path / "b/c/cat/1.png").write_bytes(b"other bytes")
    assert source_fingerprint({"kind": "folder", "path": str(tmp_path / "b/c"), "seed": 0}) != fa


def test_manifest_fingerprint_follows_the_listed_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"one")
    manifest = tmp_path / "pool.csv"
    manifest.write_text("path,label\na.png,cat\n")
    source = {"kind": "manifest", "path": str(manifest), "seed": 0}
    before = source_fingerprint(source)
    (tmp_path / "a.png").write_bytes(b"changed in place")  # same manifest bytes, new image bytes
    assert source_fingerprint(source) != before
