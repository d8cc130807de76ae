"""The ingest stage's cache through the real curate flow (Prefect test server, tiny tower, local store, moto S3):
it follows exactly the files the ingest reads — links followed, the same extension filter — and a remote source
it cannot describe is a clear one-line error, never a cache-key traceback."""

from __future__ import annotations

import io
import logging
import pathlib
from typing import Any

import numpy as np
import pytest
from flow_helpers import task_states
from helpers import tar_bytes
from PIL import Image

from flows.curate import ModelConfig, SourceConfig, curate
from storage.datasets import DatasetRef, load_manifest, read_samples
from tasks.store import open_store, store_spec

RUN: dict[str, Any] = {"budgets": [6], "methods": ["uniform"], "seeds": [0], "sketch_dim": 8,
                       "model": ModelConfig(name="skmm-tiny-vit")}
PER_CLASS = 12


def image_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.array([200, 40, 40] if seed % 2 else [40, 40, 200], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def sample_ids(store_dir: pathlib.Path, result: dict) -> set[str]:
    table = read_samples(open_store(store_spec(store_dir)), DatasetRef.from_dict(result["dataset"]), ["sample_id"])
    return set(table["sample_id"].to_pylist())


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_ingest_reruns_for_an_edit_in_a_linked_class_folder_and_a_renamed_image(prefect_server, tmp_path,
                                                                                  monkeypatch):
    import storage.ingest.reuse as reuse_mod

    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)  # the files below are milliseconds old: key them at once
    outside, pool = tmp_path / "elsewhere" / "cats", tmp_path / "pool"
    outside.mkdir(parents=True)
    (pool / "dogs").mkdir(parents=True)
    for i in range(PER_CLASS):
        (outside / f"{i:02d}.png").write_bytes(image_bytes(2 * i + 1))
        (pool / "dogs" / f"{i:02d}.png").write_bytes(image_bytes(2 * i))
    (pool / "cats").symlink_to(outside, target_is_directory=True)
    store_dir = tmp_path / "store"
    args = {**RUN, "source": SourceConfig(kind="folder", path=str(pool), shard_rows=4), "store_url": str(store_dir)}

    first = curate(**args, return_state=True)
    ids = sample_ids(store_dir, first.result())
    assert len(ids) == 2 * PER_CLASS
    assert task_states(curate(**args, return_state=True))["ingest"] == ["Cached"]  # unchanged: a hit

    old, new = (outside / "03.png").read_bytes(), image_bytes(1000, size=40)  # another size, so a new stat
    (outside / "03.png").write_bytes(new)  # edited inside the linked class folder
    edited = curate(**args, return_state=True)
    assert task_states(edited)["ingest"] == ["Completed"]
    after_edit = sample_ids(store_dir, edited.result())
    assert sha(new) in after_edit and sha(old) not in after_edit and len(after_edit) == 2 * PER_CLASS
    # only the edited file was read, and the shards without the old image were kept: the ingest stage's lineage
    # says so (storage/ingest/reuse.py, storage/ingest/writer.py)
    kept = sum(sh.num_rows for sh in set(shards(store_dir, edited.result())) & set(shards(store_dir, first.result())))
    assert 2 * PER_CLASS - 4 <= kept <= 2 * PER_CLASS - 1
    assert ingest_metrics(store_dir, edited.result()["run_id"]) == {"samples": 2 * PER_CLASS, "quarantined": 0,
                                                                    "reused": 2 * PER_CLASS - 1, "kept": kept}

    gone = (pool / "dogs" / "05.png").read_bytes()
    (pool / "dogs" / "05.png").rename(pool / "dogs" / "05.txt")  # no longer an image
    renamed = curate(**args, return_state=True)
    assert task_states(renamed)["ingest"] == ["Completed"]
    after_rename = sample_ids(store_dir, renamed.result())
    assert after_rename == after_edit - {sha(gone)}


def shards(store_dir: pathlib.Path, result: dict) -> tuple:
    return load_manifest(open_store(store_spec(store_dir)), DatasetRef.from_dict(result["dataset"])).shards


def ingest_metrics(store_dir: pathlib.Path, run_id: str) -> dict:
    from storage.lineage import EVENTS_PREFIX, event_record, parse_event

    st = open_store(store_spec(store_dir))
    records = [event_record(parse_event(st.read_rel(rel), rel)) for rel in st.list_paths(EVENTS_PREFIX)
               if rel.endswith(".json")]
    (done,) = [r for r in records if r["run_id"] == run_id and r["stage"] == "ingest" and r["event_type"] == "COMPLETE"]
    return done["metrics"]


def without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, endpoint: str) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the S3 endpoint of sources, the standard way


def test_s3_manifest_without_credentials(prefect_server, s3_bucket, tmp_path, monkeypatch, caplog):
    import boto3

    bucket, options = s3_bucket
    s3 = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1")
    for acl, prefix in (("private", "private"), ("public-read", "public")):
        rows = ["path,label"]
        for i in range(2 * PER_CLASS):
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{i}.png", Body=image_bytes(i), ACL=acl)
            rows.append(f"{i}.png,{'cats' if i % 2 else 'dogs'}")
        s3.put_object(Bucket=bucket, Key=f"{prefix}/pool.csv", Body="\n".join(rows).encode() + b"\n", ACL=acl)
    without_credentials(monkeypatch, tmp_path, options["endpoint_url"])
    store_dir = tmp_path / "store"
    caplog.set_level(logging.INFO)

    with pytest.raises(Exception) as info:
        curate(**RUN, source=SourceConfig(kind="manifest", path=f"s3://{bucket}/private/pool.csv"),
               store_url=str(store_dir))
    assert str(info.value) == (f"cannot read manifest s3://{bucket}/private/pool.csv: no credentials for s3:// in "
                               "the environment (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), "
                               "and it is not publicly readable")

    public = {**RUN, "source": SourceConfig(kind="manifest", path=f"s3://{bucket}/public/pool.csv"),
              "store_url": str(store_dir)}
    assert curate(**public)["dataset"]["num_rows"] == 2 * PER_CLASS  # a public bucket needs none
    assert task_states(curate(**public, return_state=True))["ingest"] == ["Cached"]
    assert "computing cache key" not in caplog.text


def test_source_config_recognises_webdataset_shards_and_passes_max_pixels(tmp_path):
    from flows.curate import source_config

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a-000000.tar").write_bytes(b"")
    (tmp_path / "images" / "cat").mkdir(parents=True)
    assert source_config(str(tmp_path / "shards")).kind == "webdataset"  # a folder of .tar files
    assert source_config(str(tmp_path / "shards" / "a-000000.tar")).kind == "webdataset"
    assert source_config("pool/shards-{000000..000009}.tar") == SourceConfig(
        kind="webdataset", path="pool/shards-{000000..000009}.tar")
    assert source_config("s3://bucket/pool/*.tar", max_pixels=1000) == SourceConfig(
        kind="webdataset", path="s3://bucket/pool/*.tar", max_pixels=1000)
    assert source_config(str(tmp_path / "images"), max_pixels=7).max_pixels == 7
    assert source_config(str(tmp_path / "images")).kind == "folder"
    assert SourceConfig().max_pixels == 89_478_485
    with pytest.raises(ValueError):
        SourceConfig(kind="folder", path="x", max_pixels=0)


def test_webdataset_source_through_the_flow_and_max_pixels_in_the_key(prefect_server, tmp_path):
    from flows.curate import source_config

    members = []
    for i in range(2 * PER_CLASS):
        members += [(f"{i:06d}.png", image_bytes(i)), (f"{i:06d}.cls", str(i % 2).encode())]
    members += [("big.png", image_bytes(999, size=64)), ("big.cls", b"1")]  # 64×64 = 4096 pixels
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "pool-000000.tar").write_bytes(tar_bytes(members[:24]))
    (tmp_path / "shards" / "pool-000001.tar").write_bytes(tar_bytes(members[24:]))
    store_dir = str(tmp_path / "store")
    small = source_config(str(tmp_path / "shards" / "pool-{000000..000001}.tar"), max_pixels=32 * 32)

    first = curate(**RUN, source=small, store_url=store_dir)
    assert first["quarantined"] == 1 and first["dataset"]["num_rows"] == 2 * PER_CLASS
    assert task_states(curate(**RUN, source=small, store_url=store_dir, return_state=True))["ingest"] == ["Cached"]
    default = curate(**RUN, source=small.model_copy(update={"max_pixels": 89_478_485}), store_url=store_dir,
                     return_state=True)
    assert task_states(default)["ingest"] == ["Completed"]  # the limit is part of the key
    assert default.result()["quarantined"] == 0 and default.result()["dataset"]["num_rows"] == 2 * PER_CLASS + 1
