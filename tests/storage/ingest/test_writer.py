"""The streaming writer: byte-identical to write_samples, bounded memory, nothing half-written, no debris."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactStore
from storage.datasets import dataset_version, load_manifest, read_samples, write_samples
from storage.ingest import SourceError, assign_split
from storage.ingest.writer import DatasetWriter

ROOT = Path(__file__).resolve().parents[3]


def rows(n: int, payload: int = 40) -> list[dict]:
    """Distinct samples (data → sha256 ids), a few explicit splits, three labels."""
    out = []
    for i in range(n):
        data = hashlib.sha256(str(i).encode()).digest() * (payload // 32 + 1)
        split = ("test", "val", None)[i % 3] if i % 5 == 0 else None
        out.append({"sample_id": hashlib.sha256(data).hexdigest(), "source_uri": f"file:///pool/{i}.png",
                    "label": ("a", "b", "c")[i % 3], "split": split, "data": data})
    return out


def written_objects(store: ArtifactStore) -> list[str]:
    return store.list_paths("objects")


def feed(writer: DatasetWriter, records: list[dict]) -> None:
    for r in records:
        writer.add(r["sample_id"], r["source_uri"], r["label"], r["split"], r["data"])


@pytest.mark.parametrize(("buffer_bytes", "bucket_bytes"), [(16 * 2**20, 64 * 2**20), (200, 300)],
                         ids=["defaults", "tiny-buffers-nested-buckets"])
def test_shards_and_manifest_are_byte_identical_to_write_samples(tmp_path, buffer_bytes, bucket_bytes):
    records = rows(157)
    dupes = [dict(records[7], source_uri="file:///pool/copy-of-7.png"),
             dict(records[9], source_uri="file:///pool/copy-of-9.png", split="train")]  # explicit split wins
    store = ArtifactStore(tmp_path / "store")
    with DatasetWriter(store, source_name="test pool", shard_rows=10, seed=3, val_fraction=0.2, test_fraction=0.1,
                       buffer_bytes=buffer_bytes, bucket_bytes=bucket_bytes) as writer:
        feed(writer, records[:50] + dupes + records[50:])
        result = writer.finish(source="file:///pool")

    # write_samples of the same rows, into the same store: first occurrence kept, explicit splits, the rest hashed
    expected = []
    for r in records:
        split = "train" if r is records[9] else r["split"]
        expected.append(dict(r, split=split or assign_split(r["sample_id"], 3, 0.2, 0.1)))
    reference = write_samples(store, [*expected, dict(expected[7], source_uri="file:///pool/copy-of-7.png")],
                              shard_rows=10)

    assert result.dataset == reference  # the same manifest artifact (same store, same bytes), version, rows
    ours = [s.artifact.sha256 for s in load_manifest(store, result.dataset).shards]
    theirs = [s.artifact.sha256 for s in load_manifest(store, reference).shards]
    assert ours == theirs and len(ours) == 16  # 15 full shards of 10 rows, one of 7
    assert result.n_duplicates_collapsed == 2 and result.n_samples == 157
    table = read_samples(store, result.dataset)
    assert result.dataset.version == dataset_version(
        zip(table["sample_id"].to_pylist(), table["label"].to_pylist(), table["split"].to_pylist(), strict=True))
    assert sum(result.split_counts.values()) == 157 and result.classes == ("a", "b", "c")
    assert not list((tmp_path / "store" / "tmp").iterdir())  # the spill folder is gone


def test_conflicts_name_both_places_and_publish_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    records = rows(40)
    with pytest.raises(SourceError) as info, DatasetWriter(
            store, source_name="test pool", shard_rows=8, seed=0, val_fraction=0.15, test_fraction=0.15,
            buffer_bytes=100) as writer:  # the first copy is already spilled to disk when the conflict shows
        feed(writer, records)
        writer.add(records[3]["sample_id"], "file:///elsewhere.png", "z", None, records[3]["data"])
    message = str(info.value)
    assert "conflicting labels 'a' at file:///pool/3.png and 'z' at file:///elsewhere.png" in message
    assert written_objects(store) == [] and not list((tmp_path / "store" / "tmp").iterdir())

    with pytest.raises(SourceError, match=r"conflicting splits 'val' at file:///pool/10\.png and 'test' at x"), \
            DatasetWriter(store, source_name="p", shard_rows=8, seed=0, val_fraction=0.1,
                          test_fraction=0.1) as writer:
        feed(writer, records)
        writer.add(records[10]["sample_id"], "x", "b", "test", records[10]["data"])
    assert written_objects(store) == []


MEMORY_PROBE = textwrap.dedent("""
    import io, json, os, sys
    import numpy as np
    from PIL import Image
    from storage.artifacts import ArtifactStore
    from storage.ingest import ingest_image_folder

    root, n, store_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(n)
    for i in range(n):
        folder = os.path.join(root, "ab"[i % 2])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.bmp"))
    ingest_image_folder(ArtifactStore(store_dir + "-warmup"), root, shard_rows=64)  # imports, plugins, pools
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    result = ingest_image_folder(ArtifactStore(store_dir), root, shard_rows=64)
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    print(json.dumps({"samples": result.n_samples, "growth_kib": peak - base}))
""")


def peak_growth_mib(tmp_path: Path, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / f"pool{n}"), str(n),
                          str(tmp_path / f"store{n}")], capture_output=True, text=True, env=env, check=True,
                         timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["samples"] == n
    return report["growth_kib"] / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_does_not_grow_with_the_pool(tmp_path):
    """300 vs 3 000 images of 27 KiB (8 MiB vs 80 MiB of files): the ingest's peak RSS over its starting RSS
    stays about flat (the old in-memory ingest grew by ~2.8 bytes per image byte: > 200 MiB here)."""
    small = peak_growth_mib(tmp_path, 300)
    large = peak_growth_mib(tmp_path, 3000)
    assert large - small < 32, (small, large)


def test_shards_cut_from_many_bucket_chunks_with_many_pages_are_byte_identical_to_write_samples(tmp_path):
    """The writer hands Parquet each shard as many bucket chunks (no one-chunk copy): with one value a write batch
    page boundaries do not depend on chunking. Rows of 5 KB and 1 000-row shards, so that pages are really cut (the
    test above, with ~100-byte rows, never fills a page: it passed with 1 024-value batches too)."""
    rows = []
    for i in range(2000):
        data = hashlib.sha256(str(i).encode()).digest() * 156 + i.to_bytes(4, "little")
        rows.append({"sample_id": hashlib.sha256(data).hexdigest(), "source_uri": f"file:///p/{i}",
                     "label": "ab"[i % 2], "split": "train", "data": data})
    store = ArtifactStore(tmp_path / "store")
    with DatasetWriter(store, source_name="p", shard_rows=1000, seed=0, val_fraction=0.0, test_fraction=0.0,
                       buffer_bytes=64 * 1024) as writer:
        feed(writer, rows)
        ours = writer.finish(source="file:///p").dataset
    theirs = write_samples(store, rows, shard_rows=1000)
    shards = load_manifest(store, theirs).shards
    meta = pq.ParquetFile(pa.BufferReader(store.get_bytes(shards[0].artifact))).metadata
    assert meta.row_group(0).column(4).total_uncompressed_size > 2 * 2**20  # several pages in the data column
    assert [s.artifact.sha256 for s in load_manifest(store, ours).shards] == [s.artifact.sha256 for s in shards]


def test_the_writer_version_is_dataset_version_for_labels_that_need_escaping(tmp_path):
    """The cutter builds dataset_version's JSON lines itself: labels with quotes, backslashes, control and
    non-ASCII characters give the same version (splits: hashed, explicit and null-free)."""
    labels = ['say "hi"', "back\\slash", "tab\there", "café", "雪", "\u2028", "plain"]
    records = rows(64)
    for i, r in enumerate(records):
        r["label"] = labels[i % len(labels)]
    store = ArtifactStore(tmp_path / "store")
    with DatasetWriter(store, source_name="escapes", shard_rows=10, seed=1, val_fraction=0.2,
                       test_fraction=0.1) as writer:
        feed(writer, records)
        result = writer.finish(source="file:///pool")
    got = read_samples(store, result.dataset, columns=["sample_id", "label", "split"])
    rows_back = list(zip(*(got[c].to_pylist() for c in ("sample_id", "label", "split")), strict=True))
    assert {r[1] for r in rows_back} == set(labels)
    assert result.dataset.version == dataset_version(rows_back)


@pytest.mark.parametrize("seed", range(8))
def test_add_reused_is_add_of_each_member_in_order(tmp_path, seed):
    """A replayed tar's members in one step (``add_reused``) against one ``add`` each: the same dataset, counts
    and errors — members seen before, repeated within the list, under another label (the first conflict in source
    order is named), the tiny-bucket path of pass 2."""
    import random

    from storage.ingest.reuse import BaseSamples

    rng = random.Random(seed)
    records = rows(60)
    previous = write_samples(ArtifactStore(tmp_path / "prev"), [dict(r, split=None) for r in records],
                             shard_rows=7)
    members = [(f"file:///tar#{i}", r["sample_id"], r["label"], len(r["data"])) for i, r in enumerate(records)]
    read_now = rng.sample(records, 10)
    batch = rng.sample(members, 40) + rng.sample(members, 8)  # repeats within the list
    if seed % 3 == 0:  # one member under another label
        k = rng.randrange(len(batch))
        batch[k] = (batch[k][0], batch[k][1], "zzz", batch[k][3])

    def ingest(one_by_one: bool):
        store = ArtifactStore(tmp_path / "prev")  # the base dataset's bytes are read from it
        base = BaseSamples(store, previous, lambda uri: pytest.fail(f"fetched {uri}"))
        with DatasetWriter(store, source_name="pool", shard_rows=5, seed=1, val_fraction=0.2, test_fraction=0.2,
                           base=base, bucket_bytes=rng.choice([300, 64 * 2**20])) as writer:
            for r in read_now:
                writer.add(r["sample_id"], r["source_uri"], r["label"], None, r["data"])
            try:
                if one_by_one:
                    for uri, sid, label, size in batch:
                        writer.add(sid, uri, label, None, None, reused=size)
                else:
                    writer.add_reused(batch)
            except SourceError as exc:
                return str(exc)
            result = writer.finish(source="file:///tar")
        table = read_samples(store, result.dataset)
        return (result.dataset.version, result.n_duplicates_collapsed, result.n_reused,
                table.sort_by("sample_id").to_pylist())

    assert ingest(one_by_one=False) == ingest(one_by_one=True)


def _record_drains(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, list[int], list[int]]]:
    """Every spill pass 2 drains: (level, folder, sizes, rows) as it starts (level ≥ 1: a bucket split again)."""
    import storage.ingest.writer as writer_mod

    seen: list[tuple[int, str, list[int], list[int]]] = []
    real = writer_mod.DatasetWriter._drain

    def drain(self, spill, *args, **kwargs):
        seen.append((spill.level, spill.directory, list(spill.sizes), list(spill.rows)))
        return real(self, spill, *args, **kwargs)

    monkeypatch.setattr(writer_mod.DatasetWriter, "_drain", drain)
    return seen


def test_a_bucket_is_split_again_in_arrow_batches_with_the_sizes_add_would_count(tmp_path, monkeypatch):
    """Pass 2 splits a bucket larger than bucket_bytes by the next two hex digits a spill batch at a time (no
    Python call per row: a fresh 10^7 ingest splits every bucket again), and the sub-spill counts each row as
    ``_Spill.add`` would (its size decides whether it is split once more); the shards stay write_samples'."""
    import storage.ingest.writer as writer_mod

    records = rows(300)
    store = ArtifactStore(tmp_path / "store")
    drains = _record_drains(monkeypatch)
    row_adds = []
    with DatasetWriter(store, source_name="p", shard_rows=10, seed=3, val_fraction=0.2, test_fraction=0.1,
                       buffer_bytes=500, bucket_bytes=300) as writer:
        feed(writer, records)
        real_add = writer_mod._Spill.add
        monkeypatch.setattr(writer_mod._Spill, "add", lambda spill, *a, **k: row_adds.append(1) or
                            real_add(spill, *a, **k))
        result = writer.finish(source="file:///pool")
    subs = [d for d in drains if d[0] == 1]
    assert subs and row_adds == []  # buckets were split again, none of them row by row
    for _, folder, sizes, counts in subs:
        top = os.path.basename(folder)
        expected_sizes, expected_rows = [0] * 256, [0] * 256
        for r in records:
            if r["sample_id"].startswith(top):
                sub = int(r["sample_id"][2:4], 16)
                expected_sizes[sub] += writer_mod._ROW_OVERHEAD + len(r["source_uri"]) + len(r["data"])
                expected_rows[sub] += 1
        assert (sizes, counts) == (expected_sizes, expected_rows)
    expected = [dict(r, split=r["split"] or assign_split(r["sample_id"], 3, 0.2, 0.1)) for r in records]
    reference = write_samples(store, expected, shard_rows=10)
    assert result.dataset == reference


def test_a_growth_does_not_split_buckets_again_for_the_bytes_of_rows_in_kept_shards(tmp_path, monkeypatch):
    """A bucket's size counts its reused rows' bytes (pass 2 fetches them), but the rows of kept shards are dropped,
    not fetched: sized without them, the buckets of a growth that keeps every previous shard are not split again
    (at 10^7 samples each level-0 bucket counts ~2.2 GB of reused bytes, almost all of them in kept shards)."""
    from storage.ingest.reuse import BaseSamples

    records = rows(1500, payload=2000)
    old, new = records[:1490], records[1490:]
    for r in records:
        r["split"] = None
    store = ArtifactStore(tmp_path / "store")
    options = {"source_name": "p", "shard_rows": 25, "seed": 3, "val_fraction": 0.2, "test_fraction": 0.1}
    with DatasetWriter(store, **options) as writer:
        feed(writer, old)
        first = writer.finish(source="file:///pool").dataset
    drains = _record_drains(monkeypatch)
    base = BaseSamples(store, first, lambda uri: pytest.fail(f"fetched {uri}"))
    with DatasetWriter(store, **options, base=base, bucket_bytes=6000) as writer:  # ~6 rows of 2 KB a bucket
        writer.add_reused([(r["source_uri"], r["sample_id"], r["label"], len(r["data"])) for r in old])
        feed(writer, new)
        assert max(writer._spill.sizes) > 6000  # the reused bytes alone would split buckets again
        grown = writer.finish(source="file:///pool")
    assert grown.n_kept == len(old) and [d[0] for d in drains] == [0]  # nothing split again
    with DatasetWriter(ArtifactStore(tmp_path / "fresh"), **options) as writer:
        feed(writer, records)
        assert grown.dataset.version == writer.finish(source="file:///pool").dataset.version
