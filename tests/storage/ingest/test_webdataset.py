"""WebDataset tar shards (img2dataset / DataComp layout), local and on S3: labels from .cls/.txt/.json,
quarantine of corrupt members and damaged tars, a clear error for a sample without a label."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest
from helpers import tar_bytes
from ingest_pools import image_bytes, make_pool, quarantine_of, rows_of, written

from storage.artifacts import ArtifactStore
from storage.datasets import read_samples
from storage.ingest import SourceError, SourceNotFoundError, ingest_image_folder, ingest_webdataset
from storage.ingest.reading import SourceFiles
from storage.ingest.webdataset import expand_braces, resolve_shards


def shard_members(start: int, n: int, label_kind: str = "cls") -> list[tuple[str, bytes]]:
    """n samples ``{key}.png`` + label member; labels alternate 0/1 (``cat``/``dog`` as text or JSON)."""
    members = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"))[i % 3]
        members.append((f"{key}.{ext}", image_bytes(i, fmt)))
        if label_kind == "cls":
            members.append((f"{key}.cls", str(i % 2).encode()))
        elif label_kind == "txt":
            members.append((f"{key}.txt", ("cat", "dog")[i % 2].encode()))
        else:
            members.append((f"{key}.json", json.dumps({"label": i % 2, "url": "http://x"}).encode()))
    return members


def test_webdataset_pool_quarantines_the_corrupt_member_and_keeps_the_rest(store, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first = shard_members(0, 10)
    jpeg = image_bytes(999, "JPEG", size=64)
    first += [("corrupt.jpg", jpeg[: len(jpeg) // 2]), ("corrupt.cls", b"1")]  # truncated: header fine, data not
    first += [("dir/nested.png", image_bytes(500)), ("dir/nested.cls", b"0"), ("dir/nested.json", b"{}")]
    (shards / "pool-000000.tar").write_bytes(tar_bytes(first))
    second = [*shard_members(10, 10, "txt"), ("dupe.png", image_bytes(3, "PNG")), ("dupe.cls", b"1")]
    (shards / "pool-000001.tar").write_bytes(tar_bytes(second))

    result = ingest_webdataset(store, str(shards / "pool-{000000..000001}.tar"), shard_rows=7)
    assert result.n_samples == 21 and result.n_duplicates_collapsed == 1 and result.n_quarantined == 1
    tar0 = (shards / "pool-000000.tar").as_uri()
    (uri, reason), = quarantine_of(store, result)
    assert uri == f"{tar0}#corrupt.jpg" and reason.startswith("cannot decode image: ")
    rows = {r["source_uri"]: r for r in read_samples(store, result.dataset).to_pylist()}
    assert rows[f"{tar0}#000000003.png"]["data"] == image_bytes(3, "PNG")  # the first copy, in shard order
    assert rows[f"{tar0}#000000003.png"]["label"] == "1"
    assert rows[f"{tar0}#dir/nested.png"]["label"] == "0"
    assert rows[f"{(shards / 'pool-000001.tar').as_uri()}#000000012.png"]["label"] == "cat"  # from .txt
    assert result.classes == ("0", "1", "cat", "dog")
    # a folder holding the shards, and a glob, name the same pool
    assert ingest_webdataset(store, shards, shard_rows=7).dataset == result.dataset
    assert ingest_webdataset(store, str(shards / "*.tar"), shard_rows=7).dataset == result.dataset


def test_a_sample_without_a_label_is_one_line_naming_tar_and_key(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    members = [*shard_members(0, 6), ("000000042.jpg", image_bytes(42, "JPEG")), ("000000042.txt.bak", b"x")]
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(tar_bytes(members + shard_members(6, 4)))
    with pytest.raises(SourceError) as info:
        ingest_webdataset(store, tar)
    message = str(info.value)
    assert message == (f"webdataset shard {tar} sample '000000042' has no label (expected a .cls, .txt, "
                       ".json with 'label' member); every sample needs one")
    assert written(store) == [] and not list((tmp_path / "store" / "tmp").iterdir())


def test_json_labels_damaged_and_missing_tars(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    good = tmp_path / "a.tar"
    good.write_bytes(tar_bytes([*shard_members(0, 12, "json"), ("lonely.cls", b"1")]))
    cut = tmp_path / "b.tar"
    whole = tar_bytes(shard_members(20, 6))
    cut.write_bytes(whole[: len(whole) * 2 // 3])  # cut mid-member
    result = ingest_webdataset(store, [good, cut, tmp_path / "c.tar"])
    reasons = dict(quarantine_of(store, result))
    assert reasons[f"{good.as_uri()}#lonely"] == "no image member for this key"
    assert reasons[(tmp_path / "c.tar").as_uri()] == "missing file"
    assert reasons[cut.as_uri()].startswith("cannot read tar (after ")
    assert 12 <= result.n_samples < 18 and result.classes == ("0", "1")

    with pytest.raises(SourceNotFoundError, match="no tar shard exists there"):
        ingest_webdataset(store, tmp_path / "missing-{0..3}.tar")
    with pytest.raises(ValueError, match="label_from"):
        ingest_webdataset(store, good, label_from=("caption",))


def test_same_images_as_a_folder_or_as_shards_are_the_same_dataset(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    files = make_pool(tmp_path / "folder", per_class=5)
    members = []
    for rel, data in sorted(files.items()):
        key = hashlib.sha256(rel.encode()).hexdigest()[:12]
        members += [(f"{key}.{rel.rsplit('.', 1)[1]}", data), (f"{key}.txt", rel.split("/")[0].encode())]
    (tmp_path / "pool.tar").write_bytes(tar_bytes(members))
    by_folder = ingest_image_folder(store, tmp_path / "folder")
    by_tar = ingest_webdataset(store, tmp_path / "pool.tar")
    assert by_tar.dataset.version == by_folder.dataset.version
    assert rows_of(store, by_tar) == rows_of(store, by_folder)


def test_webdataset_shards_on_s3(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for i in range(3):
        fs.pipe_file(f"{bucket}/wds/shard-{i:06d}.tar", tar_bytes(shard_members(10 * i, 8)))
    store = ArtifactStore(tmp_path / "store")
    result = ingest_webdataset(store, f"s3://{bucket}/wds/*.tar", storage_options=options)
    assert result.n_samples == 24 and result.source == f"s3://{bucket}/wds/*.tar"
    uris = {r["source_uri"] for r in read_samples(store, result.dataset, ["source_uri"]).to_pylist()}
    assert f"s3://{bucket}/wds/shard-000002.tar#000000025.jpg" in uris
    braces = ingest_webdataset(store, f"s3://{bucket}/wds/shard-{{000000..000002}}.tar", storage_options=options)
    assert braces.dataset == result.dataset
    assert ingest_webdataset(store, f"s3://{bucket}/wds/", storage_options=options).dataset == result.dataset


def test_brace_expansion_and_shard_resolution(tmp_path):
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}/s-{0..1}.tar") == ["x/s-0.tar", "x/s-1.tar", "y/s-0.tar", "y/s-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"] and expand_braces("odd{}.tar") == ["odd{}.tar"]
    for name in ("b.tar", "a.tar", ".hidden.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files = SourceFiles()
    assert resolve_shards(tmp_path, files) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert resolve_shards([str(tmp_path / "b.tar"), Path(tmp_path / "a.tar")], files) == \
        [str(tmp_path / "b.tar"), str(tmp_path / "a.tar")]
    with pytest.raises(SourceNotFoundError):
        resolve_shards(tmp_path / "empty-*.tar", files)
