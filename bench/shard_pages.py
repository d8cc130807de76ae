"""Sample shards' Parquet pages: what writing a shard and streaming it back a few images at a time hold, with the
options the shards are written with now (``SAMPLE_PARQUET_OPTIONS``: one value a write batch, so a page is ~1 MiB
plus one image) against Parquet's default write batch (1 024 values: a page of ~56 KB JPEGs was ~56 MB).

One shard of ``--rows`` synthetic ~54 KB JPEGs (bench/scale_pool.py) is written both ways in this process; for
each: Arrow memory allocated above the start (peak, sampled every millisecond on a thread) while
``pq.write_table`` writes it, and while the shard is read back through the pipeline's own reader
(``storage.sample_reader.iter_shard``, ``--batch`` rows at a time, as the embed stage and a growth ingest read);
wall times; file sizes.

    .venv/bin/python bench/shard_pages.py [--rows 2048] [--batch 64]   # → bench/results/shard_pages.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import scale_pool

from storage.artifacts import ArtifactStore
from storage.datasets import _PARQUET_OPTIONS, SAMPLE_PARQUET_OPTIONS, SAMPLE_SCHEMA, ShardRef
from storage.sample_reader import iter_shard

MIB = 2**20


class ArrowPeak:
    """The most Arrow memory allocated above the start, sampled every millisecond on a thread."""

    def __enter__(self) -> ArrowPeak:
        self.base, self.peak, self._stop = pa.total_allocated_bytes(), 0, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, pa.total_allocated_bytes() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, pa.total_allocated_bytes() - self.base)


def shard_table(rows: int) -> pa.Table:
    with ProcessPoolExecutor(2) as pool:
        images = list(pool.map(scale_pool.image_bytes, range(rows), chunksize=64))
    ids = [hashlib.sha256(b).hexdigest() for b in images]
    order = sorted(range(rows), key=ids.__getitem__)
    return pa.table({"sample_id": [ids[i] for i in order],
                     "source_uri": [f"file:///pool/{'abc'[i % 3]}/{i:08d}.jpg" for i in order],
                     "label": ["abc"[i % 3] for i in order], "split": ["train"] * rows,
                     "data": [images[i] for i in order]}, schema=SAMPLE_SCHEMA)


def measure(store: ArtifactStore, table: pa.Table, options: dict, batch: int) -> dict:
    with store.writer("samples", ".parquet") as out, ArrowPeak() as write:
        pq.write_table(table, out, row_group_size=table.num_rows, **options)
    shard = ShardRef(out.ref, table.num_rows)
    seen = 0
    with ArrowPeak() as read:
        for part in iter_shard(store, shard, ["data"], batch_rows=batch):
            seen += part.num_rows
            del part
    assert seen == table.num_rows
    return {"file_bytes": out.ref.size, "write_s": round(write.seconds, 3),
            "write_arrow_peak_mib": round(write.peak / MIB, 1), "read_s": round(read.seconds, 3),
            "read_arrow_peak_mib": round(read.peak / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "shard_pages.json")
    args = parser.parse_args()
    table = shard_table(args.rows)
    result = {"command": " ".join(sys.argv), "rows": args.rows, "image_mib": round(table["data"].nbytes / MIB, 1),
              "read_batch_rows": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for name, options in (("default_write_batch", _PARQUET_OPTIONS), ("one_value_batches", SAMPLE_PARQUET_OPTIONS)):
            measure(store, table, options, args.batch)  # warm-up: imports, first allocations
            result[name] = measure(store, table, options, args.batch)
            print(name, result[name], flush=True)
    old, new = result["default_write_batch"], result["one_value_batches"]
    result["write_peak_ratio"] = round(old["write_arrow_peak_mib"] / max(new["write_arrow_peak_mib"], 0.1), 1)
    result["read_peak_ratio"] = round(old["read_arrow_peak_mib"] / max(new["read_arrow_peak_mib"], 0.1), 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
