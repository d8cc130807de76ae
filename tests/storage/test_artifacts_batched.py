"""The store's batched reads: many small objects, and verified local copies, with bounded concurrency."""

from __future__ import annotations

import pytest

from storage.errors import ArtifactCorruptedError, ArtifactNotFoundError


def test_read_many(store):
    for i in range(20):
        store.put_immutable(f"records/{i:02d}.json", f"record {i}".encode())
    rels = [f"records/{i:02d}.json" for i in range(20)] + ["records/missing.json"]
    got = store.read_many(rels, max_workers=4)
    assert list(got) == rels
    assert all(got[f"records/{i:02d}.json"] == f"record {i}".encode() for i in range(20))
    assert isinstance(got["records/missing.json"], ArtifactNotFoundError)
    with pytest.raises(ValueError, match="max_workers"):
        store.read_many(rels, max_workers=0)


def test_local_copies(store, tmp_path):
    good = store.put_bytes(b"good bytes", "blob", ".bin")
    bad = store.put_bytes(b"will be damaged", "blob", ".bin")
    gone = store.put_bytes(b"will be removed", "blob", ".bin")
    store.fs.pipe_file(store._path(store._rel_from_uri(bad.uri)), b"WILL BE DAMAGED")
    store.fs.rm_file(store._path(store._rel_from_uri(gone.uri)))
    folder = tmp_path / "copies"
    folder.mkdir()
    got = store.local_copies([good, bad, gone, good], folder, max_workers=2)
    assert list(got) == [good.uri, bad.uri, gone.uri]
    assert got[good.uri].read_bytes() == b"good bytes"
    assert isinstance(got[bad.uri], ArtifactCorruptedError) and isinstance(got[gone.uri], ArtifactNotFoundError)
