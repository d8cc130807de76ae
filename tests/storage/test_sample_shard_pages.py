"""A sample shard's Parquet pages hold about a megabyte, not a thousand images.

Parquet's writer checks a page's size only after each write batch (1 024 values by default), so a shard of
~56 KB JPEGs had ~56 MB data pages: every reader that streams a shard a few images at a time (the embed stage,
the finetune, a growth ingest's reuse of yesterday's shards) held a whole page compressed and decompressed, and
the writer held one while compressing it (measured on a 2 048-image shard: 176 MiB read, 162 MiB write peak of
Arrow memory; with small pages 33 MiB and 5 MiB). The shards of both writers (the streaming ingest writer and
``write_samples``) are read back a few images at a time, and the ingest writer's own peak is held too."""

from __future__ import annotations

import hashlib
import threading
import time

import pyarrow as pa
import pytest

from storage.artifacts import ArtifactStore
from storage.datasets import load_manifest, write_samples
from storage.ingest.writer import DatasetWriter
from storage.sample_reader import iter_shard

IMAGE_BYTES = 48 * 1024
N_IMAGES = 200  # ~9.4 MiB of incompressible bytes in one shard (one row group)


def records() -> list[dict]:
    out = []
    for i in range(N_IMAGES):
        data = b"".join(hashlib.sha256(f"{i}-{k}".encode()).digest() for k in range(IMAGE_BYTES // 32))
        out.append({"sample_id": hashlib.sha256(data).hexdigest(), "source_uri": f"file:///pool/{i}.jpg",
                    "label": "ab"[i % 2], "split": "train", "data": data})
    return out


def by_ingest_writer(store: ArtifactStore, rows: list[dict]):
    with DatasetWriter(store, source_name="pages", shard_rows=2048, seed=0, val_fraction=0.0,
                       test_fraction=0.0) as writer:
        for r in rows:
            writer.add(r["sample_id"], r["source_uri"], r["label"], r["split"], r["data"])
        return writer.finish(source="file:///pool").dataset


def by_write_samples(store: ArtifactStore, rows: list[dict]):
    return write_samples(store, rows, shard_rows=2048)


class ArrowPeak:
    """The most Arrow memory allocated above the start, sampled every millisecond on a thread."""

    def __enter__(self) -> ArrowPeak:
        self.base, self.peak, self._stop = pa.total_allocated_bytes(), 0, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, pa.total_allocated_bytes() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, pa.total_allocated_bytes() - self.base)


@pytest.mark.parametrize("write", [by_ingest_writer, by_write_samples], ids=["ingest-writer", "write_samples"])
def test_streaming_a_shard_a_few_images_at_a_time_holds_about_a_page(tmp_path, write):
    store = ArtifactStore(tmp_path / "store")
    dataset = write(store, records())
    (shard,) = load_manifest(store, dataset).shards
    shard_bytes = N_IMAGES * IMAGE_BYTES

    seen, peak = 0, 0
    base = pa.total_allocated_bytes()
    for part in iter_shard(store, shard, ["data"], batch_rows=8):
        peak = max(peak, pa.total_allocated_bytes() - base)  # while the batch (and what the reader holds) is alive
        seen += part.num_rows
        del part
    assert seen == N_IMAGES
    assert peak < shard_bytes / 2  # measured 0.37 × shard_bytes; one 1 024-value page held it twice: 2.15 ×


def test_the_ingest_writer_holds_its_shard_once_while_writing_it(tmp_path):
    rows = records()
    shard_bytes = N_IMAGES * IMAGE_BYTES
    store = ArtifactStore(tmp_path / "store")
    with DatasetWriter(store, source_name="pages", shard_rows=2048, seed=0, val_fraction=0.0,
                       test_fraction=0.0) as writer:
        for r in rows:
            writer.add(r["sample_id"], r["source_uri"], r["label"], r["split"], r["data"])
        del rows
        with ArrowPeak() as measured:
            writer.finish(source="file:///pool")
    # measured 1.41 × shard_bytes (the shard's rows, once); with a whole-shard page and a one-chunk copy: 5.31 ×
    assert measured.peak < 2 * shard_bytes
