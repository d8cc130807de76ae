"""Image folders: quarantine, duplicates, splits that survive moves, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import threading
import zlib

import pytest
from ingest_pools import CLASSES, image_bytes, make_pool, quarantine_of, rows_of, written
from PIL import Image

from storage.artifacts import ArtifactStore
from storage.datasets import read_samples
from storage.ingest import (
    IngestResult,
    SourceError,
    SourceNotFoundError,
    assign_split,
    ingest_image_folder,
)


def test_image_folder_ingest_quarantines_collapses_and_stores_raw_bytes(store, tmp_path):
    root = tmp_path / "pool"
    files = make_pool(root)
    good_jpeg = image_bytes(999, "JPEG", size=64)
    (root / "cat" / "broken.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # truncated JPEG
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    (root / "dog" / ".DS_Store").write_bytes(b"\0junk")  # ignored: hidden
    (root / "README.md").write_text("files at the root are ignored")
    (root / "fox" / "nested" / "deeper").mkdir(parents=True)
    (root / "fox" / "nested" / "deeper" / "copy.png").write_bytes(files["fox/img0.png"])  # duplicate, same class
    (root / "empty_class").mkdir()  # a class folder with no images is fine

    result = ingest_image_folder(store, root)

    assert result.n_samples == 18 and result.dataset.num_rows == 18
    assert result.n_duplicates_collapsed == 1
    assert result.n_quarantined == 2
    assert result.classes == CLASSES
    assert sum(result.split_counts.values()) == 18 and set(result.split_counts) == {"train", "val", "test"}
    assert result.vectors is None and result.source == root.resolve().as_uri()
    assert result.quarantine is not None and result.quarantine.uri.startswith(store.url)
    quarantine = dict(quarantine_of(store, result))
    assert quarantine[(root / "dog" / "empty.png").resolve().as_uri()] == "empty file"
    reason = quarantine[(root / "cat" / "broken.jpg").resolve().as_uri()]
    assert reason.startswith("cannot decode image: ") and "truncated" in reason and "\n" not in reason

    table = read_samples(store, result.dataset)
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    for rel, data in files.items():
        row = by_id[hashlib.sha256(data).hexdigest()]
        assert row["data"] == data  # raw file bytes, not re-encoded
        assert row["label"] == rel.split("/")[0]
        assert row["source_uri"] == (root / rel).resolve().as_uri()  # of a duplicate, the first file in walk order
        assert row["split"] == assign_split(row["sample_id"], 0, 0.15, 0.15)
    # JSON-able, and round-trips
    assert IngestResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_image_folder_splits_survive_renaming_moving_and_resharding(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first = tmp_path / "a"
    files = make_pool(first, per_class=8)
    moved = tmp_path / "elsewhere" / "b"
    for n, (rel, data) in enumerate(sorted(files.items(), reverse=True)):
        label, name = rel.split("/")
        target = moved / label / f"batch{n % 3}" / f"renamed_{n:03d}_{name.lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    a = ingest_image_folder(store, first, seed=3)
    b = ingest_image_folder(store, moved, seed=3, shard_rows=5)
    assert a.dataset.version == b.dataset.version
    assert rows_of(store, a) == rows_of(store, b)
    assert a.split_counts == b.split_counts and a.classes == b.classes
    assert len(rows_of(store, a)) == 24
    assert ingest_image_folder(store, first, seed=3).dataset == a.dataset  # the very same artifacts
    c = ingest_image_folder(store, first, seed=4)
    assert [r[:2] for r in rows_of(store, c)] == [r[:2] for r in rows_of(store, a)]  # same samples ...
    assert c.dataset.version != a.dataset.version  # ... other splits


def test_identical_images_in_two_classes_is_an_error_and_writes_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    root = tmp_path / "pool"
    files = make_pool(root)
    (root / "dog" / "stray.png").write_bytes(files["cat/img0.png"])
    with pytest.raises(SourceError, match="conflicting labels") as info:
        ingest_image_folder(store, root)
    message = str(info.value)
    assert "cat/img0.png" in message and "dog/stray.png" in message and "\n" not in message
    assert written(store) == []


def test_image_folder_errors_name_the_folder(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    missing = tmp_path / "nope"
    with pytest.raises(SourceNotFoundError, match="does not exist") as info:
        ingest_image_folder(store, missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert str(missing) in str(info.value)

    a_file = tmp_path / "file.png"
    a_file.write_bytes(image_bytes(1))
    with pytest.raises(SourceError, match="not a directory"):
        ingest_image_folder(store, a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=f"{empty}.* is empty"):
        ingest_image_folder(store, empty)

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(image_bytes(2))
    with pytest.raises(SourceError, match="no class subfolders"):
        ingest_image_folder(store, flat)

    one = tmp_path / "one"
    make_pool(one, classes=("cat",))
    (one / "dog").mkdir()
    (one / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SourceError, match="needs at least 2 classes") as info:
        ingest_image_folder(store, one)
    assert "1 input(s) quarantined" in str(info.value) and "dog/bad.png" in str(info.value)

    two = tmp_path / "two"
    make_pool(two, per_class=1, classes=("cat", "dog"))
    with pytest.raises(SourceError, match="train split"):
        ingest_image_folder(store, two, val_fraction=0.495, test_fraction=0.5)

    with pytest.raises(ValueError, match="val_fraction"):
        ingest_image_folder(store, two, val_fraction=1.5)
    assert written(store) == []


# ---------------------------------------------------------------------------------------------- links, names, limits
def test_symlinked_class_folders_files_and_subfolders_are_followed(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    outside = tmp_path / "outside"
    files = make_pool(outside, per_class=3)
    root = tmp_path / "pool"
    root.mkdir()
    (root / "cat").symlink_to(outside / "cat", target_is_directory=True)  # a linked class folder
    (root / "dog").mkdir()
    (root / "dog" / "linked.png").symlink_to(outside / "dog" / "img0.png")  # a linked file
    (root / "dog" / "more").symlink_to(outside / "fox", target_is_directory=True)  # a linked subfolder
    (root / "dog" / "loop").symlink_to(root / "dog", target_is_directory=True)  # a cycle: skipped, not followed
    (root / "dog" / "dangling.png").symlink_to(tmp_path / "nowhere.png")

    result = ingest_image_folder(store, root)
    by_uri = {r["source_uri"]: r for r in read_samples(store, result.dataset).to_pylist()}
    assert result.n_samples == 3 + 1 + 3 and result.classes == ("cat", "dog")
    assert by_uri[(root / "cat" / "img1.jpg").as_uri()]["data"] == files["cat/img1.jpg"]  # the path through the link
    assert by_uri[(root / "dog" / "more" / "img2.JPG").as_uri()]["label"] == "dog"
    assert quarantine_of(store, result) == [((root / "dog" / "dangling.png").as_uri(), "missing file (a broken link)")]


def test_a_class_folder_name_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    root = tmp_path / "pool"
    make_pool(root, per_class=2)
    bad = os.path.join(os.fsencode(root), b"caf\xe9")
    os.mkdir(bad)
    with open(os.path.join(bad, b"x.png"), "wb") as fh:
        fh.write(image_bytes(77))
    with pytest.raises(SourceError) as info:
        ingest_image_folder(store, root)
    message = str(info.value)
    assert f"class folder {root}/caf\\xe9 has a name that is not valid UTF-8" in message and "\n" not in message
    message.encode("utf-8")  # printable: no lone surrogates
    assert written(store) == []


def test_a_fifo_with_an_image_name_is_quarantined_not_read(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    root = tmp_path / "pool"
    make_pool(root, per_class=2)
    os.mkfifo(root / "cat" / "pipe.png")  # reading it would block forever
    done: list = []
    worker = threading.Thread(target=lambda: done.append(ingest_image_folder(store, root)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done, "the ingest blocked on a FIFO"
    assert quarantine_of(store, done[0]) == [((root / "cat" / "pipe.png").as_uri(), "not a regular file")]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` (valid signature, IHDR) and holds 4 bytes of pixel data: decoding
    it would fail, so only a check on the header's size quarantines it as too large."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")


def test_images_above_max_pixels_are_quarantined_before_decoding(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    root = tmp_path / "pool"
    make_pool(root, per_class=4)
    (root / "cat" / "huge.png").write_bytes(png_header_only(12_000, 12_000))  # 144 M pixels: above Pillow's default
    big = Image.new("1", (12_000, 12_000))  # a real, fully decodable 12 000² image (1 bit per pixel)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    (root / "dog" / "huge_real.png").write_bytes(buf.getvalue())

    result = ingest_image_folder(store, root)
    reasons = dict(quarantine_of(store, result))
    for name in ("cat/huge.png", "dog/huge_real.png"):
        assert reasons[(root / name).as_uri()] == \
            "image too large: 12000×12000 = 144000000 pixels > max_pixels 89478485"
    assert result.n_samples == 12

    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global limit is never touched

    with pytest.raises(SourceError, match=r"no usable samples; 14 input\(s\) quarantined, e\.g\. \S+: image too "
                                          r"large: \d+×\d+ = \d+ pixels > max_pixels 575$"):
        ingest_image_folder(store, root, max_pixels=575)  # the pool's own images are 24×24
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        ingest_image_folder(store, root, max_pixels=0)
