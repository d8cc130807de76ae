"""Metadata fingerprints: what changes the ingest's cache key, what does not, and that no image is ever read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
from ingest_pools import image_bytes, make_pool

from storage.ingest import fingerprint

ROOT = Path(__file__).resolve().parents[3]


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_folder_fingerprint_follows_every_change_the_ingest_would_see(tmp_path):
    outside = tmp_path / "outside"
    make_pool(outside, per_class=3)
    root = tmp_path / "pool"
    make_pool(root, per_class=3, classes=("dog", "fox"))
    (root / "cat").symlink_to(outside / "cat", target_is_directory=True)
    base = fingerprint("folder", str(root))
    assert base["n"] == 9 and "nonce" not in base
    assert fingerprint("folder", str(root)) == base  # unchanged: the same key

    (root / "dog" / "notes.txt").write_text("ignored by the ingest, so by the key too")
    (root / "dog" / ".hidden.png").write_bytes(b"x")
    assert fingerprint("folder", str(root)) == base

    steps = []
    (outside / "cat" / "img0.png").write_bytes(image_bytes(4242))  # edited inside the linked class folder
    steps.append(fingerprint("folder", str(root)))
    bump_mtime(root / "dog" / "img1.jpg")  # same size, new mtime
    steps.append(fingerprint("folder", str(root)))
    (root / "fox" / "img0.png").rename(root / "fox" / "img0.txt")  # no longer an image
    steps.append(fingerprint("folder", str(root)))
    (root / "fox" / "img1.jpg").chmod(0o200)  # the ingest would quarantine it now (when not root)
    steps.append(fingerprint("folder", str(root)))
    keys = [base, *steps]
    assert all(a != b for i, a in enumerate(keys) for b in keys[i + 1:]), keys


def test_a_moved_or_timestamp_preserving_copy_keeps_the_folder_key(tmp_path):
    root = tmp_path / "a" / "pool"
    make_pool(root, per_class=2)
    base = fingerprint("folder", str(root))
    moved = tmp_path / "b" / "renamed"
    moved.parent.mkdir()
    root.rename(moved)
    assert fingerprint("folder", str(moved)) == base  # the root's location is not part of the key
    copied = tmp_path / "c"
    shutil.copytree(moved, copied)  # copy2: same sizes and mtimes, new inodes
    assert fingerprint("folder", str(copied)) == base
    (copied / "cat" / "img0.png").touch()
    assert fingerprint("folder", str(copied)) != base


def test_manifest_fingerprint_follows_listed_files_and_the_manifest(tmp_path):
    make_pool(tmp_path / "images", per_class=2)
    manifest = tmp_path / "pool.csv"
    manifest.write_text("path,label\nimages/cat/img0.png,cat\nimages/dog/img1.jpg,dog\nimages/gone.png,dog\n")
    base = fingerprint("manifest", str(manifest))
    assert base["n"] == 3 and "nonce" not in base and fingerprint("manifest", str(manifest)) == base
    (tmp_path / "images" / "cat" / "img0.png").write_bytes(image_bytes(777))  # the manifest's bytes unchanged
    changed = fingerprint("manifest", str(manifest))
    assert changed["sha256"] == base["sha256"] and changed != base
    manifest.write_text(manifest.read_text().replace(",dog\n", ",fox\n", 1))
    assert fingerprint("manifest", str(manifest))["sha256"] != base["sha256"]
    (tmp_path / "images" / "gone.png").write_bytes(image_bytes(1))  # a missing file appears
    assert fingerprint("manifest", str(manifest)) != changed


def test_remote_entries_and_shards_are_identified_by_etag(s3_bucket, tmp_path, monkeypatch):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.pipe_file(f"{bucket}/p/a.png", image_bytes(1))
    fs.pipe_file(f"{bucket}/p/b.png", image_bytes(2))
    fs.pipe_file(f"{bucket}/p/pool.csv", b"path,label\na.png,cat\nb.png,dog\nc.png,dog\n")
    fs.pipe_file(f"{bucket}/w/s-0.tar", b"0" * 1024)
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])  # sources find the endpoint the standard way
    manifest = fingerprint("manifest", f"s3://{bucket}/p/pool.csv")
    shards = fingerprint("webdataset", f"s3://{bucket}/w/s-{{0..0}}.tar")
    assert "nonce" not in manifest and "nonce" not in shards
    assert fingerprint("manifest", f"s3://{bucket}/p/pool.csv") == manifest
    fs.pipe_file(f"{bucket}/p/b.png", image_bytes(3))  # overwritten: a new ETag
    fs.pipe_file(f"{bucket}/w/s-0.tar", b"1" * 1024)  # same size, new content
    assert fingerprint("manifest", f"s3://{bucket}/p/pool.csv") != manifest
    assert fingerprint("webdataset", f"s3://{bucket}/w/s-{{0..0}}.tar") != shards


def test_fingerprint_never_raises_and_never_hits_for_what_it_cannot_describe(tmp_path, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    fsspec.filesystem("s3", **options).pipe_file(f"{bucket}/private.csv", b"path,label\na.png,x\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    cases = [("folder", str(tmp_path / "missing")), ("manifest", str(tmp_path / "missing.csv")),
             ("manifest", f"s3://{bucket}/private.csv"), ("webdataset", str(tmp_path / "none-*.tar")),
             ("embeddings", f"s3://{bucket}/private.csv"), ("manifest", str(tmp_path / "m.json"))]
    for kind, path in cases:
        first, second = fingerprint(kind, path), fingerprint(kind, path)
        assert first != second and first["nonce"] != second["nonce"], (kind, path, first)
    private = fingerprint("manifest", f"s3://{bucket}/private.csv")
    assert "no credentials for s3://" in private["unusable"], private


PROBE = textwrap.dedent("""
    import io, json, os, sys, tarfile, time
    root = sys.argv[1]
    for c in range(10):
        os.makedirs(f"{root}/pool/c{c}", exist_ok=True)
        for i in range(int(sys.argv[2]) // 10):
            with open(f"{root}/pool/c{c}/{i}.png", "wb") as fh:
                fh.write(b"not read by the fingerprint %d" % i)
    with open(f"{root}/pool.csv", "w") as fh:
        fh.write("path,label\\n" + "".join(f"pool/c{i % 10}/{i // 10}.png,c{i % 10}\\n" for i in range(1000)))
    for s in range(3):
        with tarfile.open(f"{root}/shard-{s}.tar", "w") as tar:
            tar.addfile(tarfile.TarInfo("x.png"), io.BytesIO(b""))

    from tasks.ingest import source_fingerprint
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and
                     str(args[0]).startswith(root) else None)
    start = time.perf_counter()
    source_fingerprint({"kind": "folder", "path": f"{root}/pool", "seed": 0})
    seconds = time.perf_counter() - start
    source_fingerprint({"kind": "webdataset", "path": f"{root}/shard-{{0..2}}.tar", "seed": 0})
    source_fingerprint({"kind": "manifest", "path": f"{root}/pool.csv", "seed": 0})
    print(json.dumps({"opened": sorted(set(opened)), "seconds": seconds}))
""")


def test_the_cache_key_of_a_pool_reads_no_image(tmp_path):
    """Folder, WebDataset and manifest fingerprints open no image file or tar — only the manifest itself —
    and 20 000 files take well under the time it took to hash them (counted with an audit hook on ``open``)."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), "20000"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["opened"] == [str(tmp_path / "pool.csv")], report["opened"][:5]
    assert report["seconds"] < 10, report
