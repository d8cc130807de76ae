"""What a nightly growth's LP gradients + sketch stage reads, writes and costs, as a Prefect flow: the new run's
train rows only (one sketch task per run of the dataset, the kept run's a cache hit, the runs linked) against the
whole split again (the code before).

A dataset of N samples (tiny bytes; their d-dimensional float32 features written as the embed stage leaves them:
one table per run, linked) is sketched to m columns in a flow, grown by 1 % (a second run), and sketched again in a
flow; each step in a fresh child process with its own temporary Prefect server. Measured for the growth's stage:
wall time, the sketch rows and bytes it wrote (new objects under ``objects/sketch``) and the digest of the sketch
read back (equal before and after: the rows are bitwise the same). Run it on each checkout (``PYTHONPATH``):

    PYTHONPATH=. .venv/bin/python bench/lp_sketch_growth.py --n 200000 --label after
    # → bench/results/lp_sketch_growth.json (one row per --label)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
from scale import in_child  # bench/ is on the path when run as a script

SEED = 0
SPLITS = ("train", "train", "train", "val", "test")


def records(lo: int, hi: int) -> list[dict]:
    return [{"source_uri": f"mem://{i}", "label": str(i % 10), "split": SPLITS[i % 5], "data": f"sample-{i}".encode()}
            for i in range(lo, hi)]


def feature_chunks(ids: list[str], dim: int):
    """(ids, rows) in 8 192-row chunks; a row is a function of its id alone (as the embed stage's are)."""
    for lo in range(0, len(ids), 8192):
        part = np.array(ids[lo:lo + 8192])
        rng = np.random.default_rng([int(part[0][:12], 16), len(part)])
        yield part, rng.standard_normal((len(part), dim)).astype(np.float32)


def build(store: str, n: int, added: int, dim: int) -> dict:
    """The one-run dataset of n samples and the grown one (+ ``added``, a second run), with their features."""
    from storage.datasets import (
        DatasetManifest,
        DatasetRef,
        dataset_version,
        load_manifest,
        sample_id,
        write_samples,
        write_vector_chunks,
    )
    from storage.linked_vectors import link_vectors
    from tasks.store import open_store, store_spec

    st = open_store(store_spec(store))
    producer = {"model": "synthetic", "dim": dim}
    out, shards, runs, tables, rows = {}, [], [], [], []
    for label, part in (("first", records(0, n)), ("growth", records(n, n + added))):
        ds = write_samples(st, part)
        run = load_manifest(st, ds).shards
        shards += run
        runs.append(len(run))
        ids = sorted(sample_id(r["data"]) for r in part)
        tables.append(write_vector_chunks(st, feature_chunks(ids, dim), producer, kind="embeddings"))
        rows += part
        if label == "first":
            out["first"] = {"dataset": ds.to_dict(), "embeddings": tables[0].to_dict()}
    version = dataset_version((sample_id(r["data"]), r["label"], r["split"]) for r in rows)
    manifest = DatasetManifest(version, len(rows), tuple(shards), runs=tuple(runs))
    grown = DatasetRef(st.put_bytes(manifest.to_json(), "dataset", ".json"), version, len(rows))
    out["growth"] = {"dataset": grown.to_dict(), "embeddings": link_vectors(st, tables).to_dict()}
    return out


def sketch_stage(store: str, prefect_home: str, refs: dict, m: int) -> dict:
    """The LP gradients + sketch stage in a flow (timed around the stage), and what it wrote."""
    os.environ["PREFECT_HOME"] = prefect_home
    import pyarrow.parquet as pq
    from prefect import flow

    from storage.datasets import VectorTableRef, read_vectors
    from tasks.sketch import gradients_sketch
    from tasks.store import open_store, result_storage, store_spec

    spec = store_spec(store)
    folder = pathlib.Path(store) / "objects" / "sketch"

    @flow(name="bench-lp-sketch-growth")
    def run() -> dict:
        before = set(folder.iterdir()) if folder.exists() else set()
        start = time.perf_counter()
        sk = gradients_sketch(refs["embeddings"], refs["dataset"], spec, {"result_storage": result_storage(spec)},
                              sketch_dim=m, seed=SEED, mode="lp", model={"name": "synthetic"})
        stage_s = time.perf_counter() - start
        written = set(folder.iterdir()) - before
        tables = [p for p in written if p.suffix == ".parquet"]
        ids, mat = read_vectors(open_store(spec), VectorTableRef.from_dict(sk))
        return {"sketch_stage_s": round(stage_s, 2), "sketch_tables_written": len(tables),
                "sketch_rows_written": sum(pq.read_metadata(p).num_rows for p in tables),
                "sketch_bytes_written": sum(p.stat().st_size for p in written), "sketch_rows": len(ids),
                "sketch_digest": hashlib.sha256("\n".join(ids).encode() + mat.tobytes()).hexdigest()}

    return run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--m", type=int, default=256, help="sketch columns (the automatic m's m_max)")
    parser.add_argument("--label", default="now")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "lp_sketch_growth.json")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="skmm-lp-sketch-growth-"))
    try:
        store, home = str(work / "store"), str(work / "prefect")
        added = max(args.n // 100, 1)
        refs = in_child(build, store, args.n, added, args.dim)
        first = in_child(sketch_stage, store, home, refs["first"], args.m)
        print("first", first, flush=True)
        growth = in_child(sketch_stage, store, home, refs["growth"], args.m)
        print("growth", growth, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"benchmark": "lp_sketch_growth", "command": " ".join(sys.argv), "label": args.label, "n": args.n,
           "added": added, "dim": args.dim, "m": args.m, "build_s": refs["process_wall_s"], "first": first,
           "growth": growth}
    log = json.loads(args.out.read_text()) if args.out.exists() else []
    log = [r for r in log if r.get("label") != args.label] + [row]
    args.out.write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
