"""Ingesting pools (image folders, manifests, precomputed embeddings, the bundled digits) into the store:
content-hash ids, hash-based splits that survive re-ordering, quarantine instead of crashes, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.artifacts import ArtifactStore
from storage.datasets import read_samples, read_vectors, vector_sample_id
from storage.sources import (
    IngestResult,
    SourceError,
    SourceNotFoundError,
    assign_split,
    ingest_digits,
    ingest_embeddings,
    ingest_image_folder,
    ingest_manifest,
    render_digit_png,
)

CLASSES = ("cat", "dog", "fox")


# ---------------------------------------------------------------------------------------------- fixtures
def image_bytes(seed: int, fmt: str = "PNG", size: int = 24) -> bytes:
    """A distinct noise image (content depends on ``seed``) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_pool(root: Path, per_class: int = 6, classes: tuple[str, ...] = CLASSES) -> dict[str, bytes]:
    """root/<class>/img<i>.{png,jpg,JPG}: distinct images; returns {relative path: bytes}."""
    files = {}
    for c, label in enumerate(classes):
        for i in range(per_class):
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("JPEG", "JPG")][i % 3]
            rel = f"{label}/img{i}.{ext}"
            files[rel] = image_bytes(100 * c + i, fmt)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def rows_of(store: ArtifactStore, result: IngestResult) -> list[tuple[str, str, str]]:
    table = read_samples(store, result.dataset, columns=["sample_id", "label", "split"])
    return list(zip(*(table[c].to_pylist() for c in ("sample_id", "label", "split")), strict=True))


def quarantine_of(store: ArtifactStore, result: IngestResult) -> list[tuple[str, str]]:
    assert result.quarantine is not None and result.quarantine.kind == "quarantine"
    table = pq.read_table(pa.BufferReader(store.get_bytes(result.quarantine)))
    assert table.column_names == ["source_uri", "reason"]
    return list(zip(table["source_uri"].to_pylist(), table["reason"].to_pylist(), strict=True))


def written(store: ArtifactStore) -> list[str]:
    return store.list_paths("objects")


# ---------------------------------------------------------------------------------------------- splits
def test_assign_split_is_a_pure_function_of_id_and_seed():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6000)]
    splits = [assign_split(s, 0, 0.2, 0.1) for s in ids]
    assert splits == [assign_split(s, 0, 0.2, 0.1) for s in reversed(ids)][::-1]
    counts = {k: splits.count(k) / len(ids) for k in ("train", "val", "test")}
    assert abs(counts["train"] - 0.7) < 0.03 and abs(counts["val"] - 0.2) < 0.03 and abs(counts["test"] - 0.1) < 0.03
    other = [assign_split(s, 1, 0.2, 0.1) for s in ids]
    assert other != splits  # the seed reshuffles
    # growing val only moves samples out of train
    wider = [assign_split(s, 0, 0.3, 0.1) for s in ids]
    assert all(a == b or (a == "train" and b == "val") for a, b in zip(splits, wider, strict=True))
    assert {assign_split(s, 0, 0.0, 0.0) for s in ids[:100]} == {"train"}


@pytest.mark.parametrize("kwargs", [dict(val_fraction=-0.1), dict(test_fraction=1.0),
                                    dict(val_fraction=0.5, test_fraction=0.5), dict(seed=1.5), dict(seed=True)])
def test_assign_split_rejects_bad_arguments(kwargs):
    args = dict(seed=0, val_fraction=0.15, test_fraction=0.15) | kwargs
    with pytest.raises(ValueError):
        assign_split("ab" * 32, **args)


# ---------------------------------------------------------------------------------------------- image folder
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


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_csv_with_relative_paths_splits_and_missing_files(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    pool = tmp_path / "data"
    files = make_pool(pool / "images")
    lines = ["path,label,split,comment"]
    for i, rel in enumerate(sorted(files)):
        split = "test" if i == 0 else ("Validation" if i == 1 else "")
        lines.append(f"images/{rel},{rel.split('/')[0]},{split},x")
    lines.append("images/cat/gone.png,cat,,missing")
    lines.append(f"{pool / 'images' / 'dog' / 'img1.jpg'},dog,,absolute duplicate")
    (pool / "manifest.csv").write_text("\n".join(lines) + "\n")

    result = ingest_manifest(store, pool / "manifest.csv")
    assert result.n_samples == 18 and result.n_duplicates_collapsed == 1 and result.n_quarantined == 1
    assert quarantine_of(store, result) == [((pool / "images" / "cat" / "gone.png").as_uri(), "missing file")]
    splits = {sid: split for sid, _, split in rows_of(store, result)}
    ordered = sorted(files)
    assert splits[hashlib.sha256(files[ordered[0]]).hexdigest()] == "test"
    assert splits[hashlib.sha256(files[ordered[1]]).hexdigest()] == "val"
    for rel in ordered[2:]:
        sid = hashlib.sha256(files[rel]).hexdigest()
        assert splits[sid] == assign_split(sid, 0, 0.15, 0.15)

    # the same pool through the image-folder route is the same dataset unless splits were given explicitly
    by_folder = ingest_image_folder(store, pool / "images")
    assert [r[:2] for r in rows_of(store, by_folder)] == [r[:2] for r in rows_of(store, result)]


def test_manifest_parquet_with_url_column_integer_labels_and_base_dir(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    images = tmp_path / "images"
    files = make_pool(images, per_class=4, classes=("0", "1"))
    table = pa.table({"url": sorted(files), "label": [int(r.split("/")[0]) for r in sorted(files)]})
    manifest = tmp_path / "meta" / "manifest.parquet"
    manifest.parent.mkdir()
    pq.write_table(table, manifest)
    result = ingest_manifest(store, manifest, base_dir=images)
    assert result.n_samples == 8 and result.classes == ("0", "1") and result.quarantine is None
    # without base_dir the entries resolve against the manifest's folder, where they do not exist
    with pytest.raises(SourceError, match="no usable samples; 8 input"):
        ingest_manifest(store, manifest)


def test_manifest_reads_from_s3(s3_bucket, tmp_path):
    import fsspec

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    files = make_pool(tmp_path / "local", per_class=3, classes=("a", "b"))
    for rel, data in files.items():
        fs.pipe_file(f"{bucket}/pool/images/{rel}", data)
    lines = ["path,label"] + [f"images/{rel},{rel.split('/')[0]}" for rel in files] + ["images/a/missing.png,a"]
    fs.pipe_file(f"{bucket}/pool/manifest.csv", ("\n".join(lines) + "\n").encode())
    store = ArtifactStore(f"s3://{bucket}/store", storage_options=options)

    result = ingest_manifest(store, f"s3://{bucket}/pool/manifest.csv", storage_options=options)
    assert result.n_samples == 6 and result.source == f"s3://{bucket}/pool/manifest.csv"
    assert quarantine_of(store, result) == [(f"s3://{bucket}/pool/images/a/missing.png", "missing file")]
    stored = {r["sample_id"]: r["data"] for r in read_samples(store, result.dataset).to_pylist()}
    assert stored == {hashlib.sha256(d).hexdigest(): d for d in files.values()}


def test_manifest_errors_name_the_column_or_row(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    files = make_pool(tmp_path, per_class=2)
    rels = sorted(files)

    def manifest(text: str, name: str = "m.csv") -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    with pytest.raises(SourceError, match="no 'label' column"):
        ingest_manifest(store, manifest("path,class\n" + "".join(f"{r},x\n" for r in rels)))
    with pytest.raises(SourceError, match="no 'path' \\(or 'url'\\) column"):
        ingest_manifest(store, manifest("file,label\na.png,x\n"))
    rows = [f"{r},{r.split('/')[0]}" for r in rels]
    rows[2] = f"{rels[2]},"
    with pytest.raises(SourceError, match="row 3 has an empty label"):
        ingest_manifest(store, manifest("path,label\n" + "\n".join(rows) + "\n"))
    with pytest.raises(SourceError, match="row 1 has split 'holdout'"):
        ingest_manifest(store, manifest(f"path,label,split\n{rels[0]},cat,holdout\n"))
    with pytest.raises(SourceError, match="has no rows"):
        ingest_manifest(store, manifest("path,label\n"))
    conflict = "path,label\n" + "".join(f"{r},{r.split('/')[0]}\n" for r in rels) + f"{rels[0]},dog\n"
    with pytest.raises(SourceError, match="conflicting labels"):
        ingest_manifest(store, manifest(conflict))
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        ingest_manifest(store, tmp_path / "absent.csv")
    with pytest.raises(SourceError, match="unsupported format"):
        ingest_manifest(store, manifest("{}", "m.json"))
    assert written(store) == []


# ---------------------------------------------------------------------------------------------- embeddings
def embedding_table(n: int = 30, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), [CLASSES[i % 3] for i in range(n)]


def test_embeddings_fixed_size_list_quarantines_nan_and_writes_vectors(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    mat, labels = embedding_table()
    mat[7, 3] = np.nan
    mat[8, 0] = np.inf
    mat[9] = mat[4]  # an identical vector with the same label (both "cat"? make it so) collapses
    labels[9] = labels[4]
    flat = pa.array(mat.reshape(-1), pa.float32())
    table = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(flat, 8), "label": labels})
    path = tmp_path / "emb.parquet"
    pq.write_table(table, path)

    result = ingest_embeddings(store, path)
    assert result.n_samples == 27 and result.n_quarantined == 2 and result.n_duplicates_collapsed == 1
    assert sorted(quarantine_of(store, result)) == [(f"{path.as_uri()}#row=7", "non-finite vector (NaN or inf)"),
                                                    (f"{path.as_uri()}#row=8", "non-finite vector (NaN or inf)")]
    samples = read_samples(store, result.dataset)
    assert samples["data"].null_count == 27
    assert result.vectors is not None and result.vectors.kind == "embeddings" and result.vectors.dim == 8
    assert result.vectors.producer == {"source": "precomputed", "uri": path.as_uri(), "column": "embedding"}
    ids, vectors = read_vectors(store, result.vectors)
    assert ids == samples["sample_id"].to_pylist()
    assert all(vector_sample_id(v) == s for s, v in zip(ids, vectors, strict=True))
    good = [i for i in range(30) if i not in (7, 8, 9)]
    assert sorted(ids) == sorted(vector_sample_id(mat[i]) for i in good)
    assert IngestResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_embeddings_from_float_columns_and_id_column(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    mat, labels = embedding_table(n=24, dim=4)
    columns = {f"f{j}": mat[:, j].astype(np.float64) for j in range(4)}
    hex_ids = [hashlib.sha256(f"img{i}".encode()).hexdigest().upper() for i in range(12)]
    names = hex_ids + [f"user-key-{i}" for i in range(12, 24)]
    table = pa.table({"key": names, **columns, "label": labels, "score": [1] * 24,
                      "part": ["train"] * 20 + ["test"] * 4})
    path = tmp_path / "cols.parquet"
    pq.write_table(table, path)

    auto = ingest_embeddings(store, path, split_column="part")  # float columns f0..f3 picked automatically
    assert auto.vectors is not None and auto.vectors.dim == 4
    assert auto.vectors.producer["column"] == ["f0", "f1", "f2", "f3"]
    assert auto.split_counts == {"train": 20, "val": 0, "test": 4}

    keyed = ingest_embeddings(store, path, id_column="key", vector_column=["f0", "f1", "f2", "f3"])
    ids = {r[0] for r in rows_of(store, keyed)}
    assert {h.lower() for h in hex_ids} <= ids  # hex ids are taken as they are
    assert hashlib.sha256(b"user-key-12").hexdigest() in ids  # others are hashed
    assert keyed.dataset.version != auto.dataset.version

    clash = table.set_column(0, "key", pa.array(["same"] * 2 + names[2:]))
    pq.write_table(clash, tmp_path / "clash.parquet")
    with pytest.raises(SourceError, match="different vectors"):
        ingest_embeddings(store, tmp_path / "clash.parquet", id_column="key", vector_column=["f0", "f1"])


def test_embeddings_errors(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    mat, labels = embedding_table(n=6, dim=3)
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"embedding": [list(map(float, v)) for v in mat], "cls": labels}), path)
    with pytest.raises(SourceError, match="no label column 'label'"):
        ingest_embeddings(store, path)
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0]], "label": ["a", "b"]}), path)
    with pytest.raises(SourceError, match="different lengths"):
        ingest_embeddings(store, path)
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [3.0, 1.0]], "label": ["a", None]}), path)
    with pytest.raises(SourceError, match="row 1 has an empty label"):
        ingest_embeddings(store, path)
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0, 2.0], [0.0, 2.0]], "label": ["a", "b", "b"]}), path)
    with pytest.raises(SourceError, match="conflicting labels"):
        ingest_embeddings(store, path)
    with pytest.raises(SourceNotFoundError):
        ingest_embeddings(store, tmp_path / "absent.parquet")
    assert written(store) == []


# ---------------------------------------------------------------------------------------------- digits
def test_render_digit_png_is_deterministic_and_decodes():
    pixels = (np.arange(64).reshape(8, 8) % 17).astype(float)
    pixels[-1, -1] = 16
    a = render_digit_png(pixels, 32)
    assert a == render_digit_png(pixels.copy(), 32)
    img = Image.open(io.BytesIO(a))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    arr = np.asarray(img)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[-1, -1].tolist() == [255, 255, 255]  # 0 → black, 16 → white
    assert render_digit_png(pixels, 32, "bilinear") != a
    assert render_digit_png(pixels, 32, "bilinear") == render_digit_png(pixels, 32, "bilinear")


def test_ingest_digits_is_deterministic(store):
    from sklearn.datasets import load_digits

    start = time.perf_counter()
    first = ingest_digits(store)
    elapsed = time.perf_counter() - start
    second = ingest_digits(store)
    assert second == first  # same bytes → same shards, manifest and version
    assert first.n_samples + first.n_duplicates_collapsed == 1797 and first.n_quarantined == 0
    assert first.n_samples == 1797  # scikit-learn's copy holds no identical images
    assert first.classes == tuple(str(d) for d in range(10))
    assert sum(first.split_counts.values()) == 1797 and min(first.split_counts.values()) > 150
    assert first.quarantine is None and first.vectors is None
    assert elapsed < 20

    table = read_samples(store, first.dataset)
    digits = load_digits()
    row = {r["source_uri"]: r for r in table.to_pylist()}["sklearn://datasets/load_digits#index=0"]
    assert row["data"] == render_digit_png(digits.images[0], 32)
    assert row["label"] == str(digits.target[0])
    assert Image.open(io.BytesIO(row["data"])).size == (32, 32)
    assert ingest_digits(store, seed=1).dataset.version != first.dataset.version


def test_ingest_digits_other_size(tmp_path):
    result = ingest_digits(ArtifactStore(tmp_path / "store"), image_size=16, val_fraction=0.1, test_fraction=0.2)
    assert result.n_samples == 1797
    with pytest.raises(ValueError, match="image_size"):
        ingest_digits(ArtifactStore(tmp_path / "store"), image_size=4)


def test_copying_a_folder_keeps_the_dataset(tmp_path):
    """A copied tree (shutil, new root) ingests to the same version: ids come from bytes, not paths."""
    store = ArtifactStore(tmp_path / "store")
    make_pool(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    assert ingest_image_folder(store, tmp_path / "orig").dataset.version == \
        ingest_image_folder(store, tmp_path / "copy").dataset.version
