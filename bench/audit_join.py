"""Benchmark: the auditor's dataset join (storage.audit.dataset_rows) on a large pool.

    .venv/bin/python bench/audit_join.py                          # 10^7-row pool, 10 000 wanted ids
    .venv/bin/python bench/audit_join.py --pool 1000000 --wanted 1000   # a quick check

Writes a dataset of ``--pool`` rows as the store holds one (Parquet shards of 65 536 rows sorted by sample id,
columns sample_id, source_uri, label, split, data; ``data`` null, as for samples referenced by URI) into a
temporary local store, then, in a fresh process (so its peak memory is the join's own), looks up ``--wanted``
random ids: source_uri, label and split, read with column projection shard by shard. Each answer is checked.
Results go to ``$SKMM_BENCH_OUT/audit_join.json`` (default bench/out/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from storage.artifacts import ArtifactStore
from storage.datasets import (
    DEFAULT_SHARD_ROWS,
    SAMPLE_SCHEMA,
    DatasetManifest,
    DatasetRef,
    ShardRef,
    _parquet_bytes,
)


def _ids(lo: int, hi: int) -> np.ndarray:
    return np.array([hashlib.sha256(f"sample-{i}".encode()).hexdigest() for i in range(lo, hi)], dtype="S64")


def _label(ids: np.ndarray) -> list[str]:
    return [str(int(i[:2], 16) % 10) for i in ids]


def generate(store: ArtifactStore, pool: int) -> DatasetRef:
    ids = np.sort(np.concatenate([_ids(lo, min(pool, lo + 1_000_000)) for lo in range(0, pool, 1_000_000)]))
    shards = []
    for lo in range(0, pool, DEFAULT_SHARD_ROWS):
        block = [i.decode() for i in ids[lo:lo + DEFAULT_SHARD_ROWS]]
        table = pa.table({"sample_id": block, "source_uri": [f"s3://pool/images/{i[:24]}.jpg" for i in block],
                          "label": _label(np.array(block, dtype="S64")), "split": ["train"] * len(block),
                          "data": pa.nulls(len(block), pa.binary())}, schema=SAMPLE_SCHEMA)
        ref = store.put_bytes(_parquet_bytes(table, DEFAULT_SHARD_ROWS), "samples", ".parquet")
        shards.append(ShardRef(ref, len(block)))
    version = hashlib.sha256(ids.tobytes()).hexdigest()  # a stand-in: the join never recomputes the version
    manifest = DatasetManifest(version, pool, tuple(shards))
    return DatasetRef(store.put_bytes(manifest.to_json(), "dataset", ".json"), version, pool)


def join(store_dir: str, ref_json: str, wanted: int, seed: int) -> dict:
    """Run in a child process (without torch, which bench/_common imports): the timed join, its peak memory."""
    from _proc import peak_rss_mib as peak_rss_mb  # this process image's (getrusage keeps the parent's past exec)

    from storage.audit import dataset_rows

    store, ref = ArtifactStore(store_dir), DatasetRef.from_dict(json.loads(ref_json))
    picks = np.random.default_rng(seed).choice(ref.num_rows, size=wanted, replace=False)
    ids = [hashlib.sha256(f"sample-{i}".encode()).hexdigest() for i in picks]
    before = peak_rss_mb()
    start = time.perf_counter()
    got = dataset_rows(store, ref, ids)
    seconds = time.perf_counter() - start
    rows = got.to_pylist()
    assert len(rows) == wanted and {r["sample_id"] for r in rows} == set(ids), "wrong rows"
    assert all(r["source_uri"] == f"s3://pool/images/{r['sample_id'][:24]}.jpg" and r["label"] ==
               str(int(r["sample_id"][:2], 16) % 10) for r in rows), "wrong columns"
    return {"join_s": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_before_join_mb": round(before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=10_000_000)
    parser.add_argument("--wanted", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "REF_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(join(args.child[0], args.child[1], args.wanted, args.seed)))
        return

    from _common import record

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="skmm-audit-bench-"))
    try:
        store = ArtifactStore(workdir / "store")
        start = time.perf_counter()
        ref = generate(store, args.pool)
        generate_s = time.perf_counter() - start
        print(f"generated a {args.pool}-row dataset in {generate_s:.1f}s", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--wanted", str(args.wanted), "--seed", str(args.seed),
                                "--child", str(workdir / "store"), json.dumps(ref.to_dict())],
                               capture_output=True, text=True, check=True)
        result = {"pool": args.pool, "wanted": args.wanted, "shards": -(-args.pool // DEFAULT_SHARD_ROWS),
                  "generate_s": round(generate_s, 1),
                  "store_bytes": sum(f.stat().st_size for f in (workdir / "store").rglob("*") if f.is_file()),
                  **json.loads(child.stdout.strip().splitlines()[-1]), "pyarrow": pa.__version__,
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
        record("audit_join", result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
