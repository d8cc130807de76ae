"""Manifests (CSV/TSV/Parquet, local or S3): relative paths, explicit splits, errors by row."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_pools import make_pool, quarantine_of, rows_of, written

from storage.artifacts import ArtifactStore
from storage.datasets import read_samples
from storage.ingest import (
    SourceError,
    SourceNotFoundError,
    assign_split,
    ingest_image_folder,
    ingest_manifest,
)


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


def without_credentials(monkeypatch, tmp_path, endpoint: str) -> None:
    """No AWS credentials anywhere (env, files, instance metadata); the S3 endpoint the standard way."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def test_s3_manifest_without_credentials_is_one_line_or_read_anonymously_when_public(s3_bucket, tmp_path,
                                                                                     monkeypatch):
    import boto3

    bucket, options = s3_bucket
    s3 = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1")
    files = make_pool(tmp_path / "local", per_class=3, classes=("a", "b"))
    lines = ["path,label"] + [f"images/{rel},{rel.split('/')[0]}" for rel in files]
    for acl, prefix in (("private", "private"), ("public-read", "public")):
        for rel, data in files.items():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/images/{rel}", Body=data, ACL=acl)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/m.csv", Body=("\n".join(lines) + "\n").encode(), ACL=acl)
    without_credentials(monkeypatch, tmp_path, options["endpoint_url"])
    store = ArtifactStore(tmp_path / "store")

    with pytest.raises(SourceError) as info:
        ingest_manifest(store, f"s3://{bucket}/private/m.csv")
    assert str(info.value) == (f"cannot read manifest s3://{bucket}/private/m.csv: no credentials for s3:// in the "
                               "environment (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), and "
                               "it is not publicly readable")
    assert written(store) == []

    public = ingest_manifest(store, f"s3://{bucket}/public/m.csv")
    assert public.n_samples == 6 and public.quarantine is None
