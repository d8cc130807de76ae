"""What a nightly growth's embed stage writes, as a Prefect flow: the features of the new samples only (each run of
the grown dataset combined on its own, the kept run's combine a cache hit, the runs linked) against the whole
pool's combined table again (the code before).

A pool of N ~56 KB JPEGs (bench/scale_pool.py) is ingested (reuse on) and embedded in a flow (the tiny tower,
2 048-row shards), grown by 1 % (the new samples form a second run: every previous shard is kept), ingested and
embedded again in a flow, then the LP gradients + sketch stage (m = 16); every step in a fresh child process with its
own temporary Prefect server. Measured for the growth's flow: the bytes and rows of the feature tables it wrote (new
objects under ``objects/embeddings``) and of the sketch tables (``objects/sketch``), each stage's wall time, and the
features and sketch read back (their digests must equal a from-scratch run's).
Run it on each checkout (``PYTHONPATH``) with its own ``--work``:

    PYTHONPATH=. .venv/bin/python bench/embed_growth_link.py --n 10000 --label after
    # → bench/results/embed_growth_link.json (one row per --label)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time

import scale_pool  # bench/ is on the path when run as a script
from scale import in_child

MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}


def ingest_and_embed(pool: str, store: str, prefect_home: str) -> dict:
    """Ingest the folder, then the embed stage, each a task call in one flow; the embed part timed."""
    os.environ["PREFECT_HOME"] = prefect_home
    import pyarrow.parquet as pq
    from prefect import flow

    from storage.datasets import VectorTableRef, read_vectors
    from tasks.embed import embed_with_counts
    from tasks.ingest import ingest
    from tasks.sketch import gradients_sketch
    from tasks.store import open_store, result_storage, store_spec

    spec = store_spec(store)
    tables = pathlib.Path(store) / "objects" / "embeddings"
    sketches = pathlib.Path(store) / "objects" / "sketch"

    def listed(folder: pathlib.Path) -> set:
        return set(folder.iterdir()) if folder.exists() else set()

    def digest_of(ref: dict) -> tuple[str, int]:
        ids, mat = read_vectors(open_store(spec), VectorTableRef.from_dict(ref))
        return hashlib.sha256("\n".join(ids).encode() + mat.tobytes()).hexdigest(), len(ids)

    def rows_bytes(paths: set) -> tuple[int, int, int]:
        tabs = [p for p in paths if p.suffix == ".parquet"]
        return len(tabs), sum(pq.read_metadata(p).num_rows for p in tabs), sum(p.stat().st_size for p in paths)

    @flow(name="bench-embed-growth")
    def run() -> dict:
        opts = {"result_storage": result_storage(spec)}
        ing = ingest.with_options(**opts)({"kind": "folder", "path": pool}, spec)
        before, before_sk = listed(tables), listed(sketches)
        start = time.perf_counter()
        combined, counts = embed_with_counts(ing["dataset"], MODEL, spec, opts)
        stage_s = time.perf_counter() - start
        start = time.perf_counter()
        sk = gradients_sketch(combined, ing["dataset"], spec, opts, sketch_dim=16, seed=0, mode="lp", model=MODEL)
        sketch_s = time.perf_counter() - start
        n_tables, rows, size = rows_bytes(listed(tables) - before)
        sk_tables, sk_rows, sk_size = rows_bytes(listed(sketches) - before_sk)
        digest, num_rows = digest_of(combined)
        sk_digest, sk_num_rows = digest_of(sk)
        return {"embed_stage_s": round(stage_s, 2), "samples_embedded": counts["samples_embedded"],
                "shards_cached": counts["shards_cached"], "kept": ing.get("n_kept"),
                "tables_written": n_tables, "feature_rows_written": rows, "feature_bytes_written": size,
                "features_digest": digest, "num_rows": num_rows,
                "sketch_stage_s": round(sketch_s, 2), "sketch_tables_written": sk_tables,
                "sketch_rows_written": sk_rows, "sketch_bytes_written": sk_size, "sketch_digest": sk_digest,
                "sketch_num_rows": sk_num_rows}

    return run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--label", default="now")
    parser.add_argument("--work", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "skmm-embed-growth-link")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "embed_growth_link.json")
    args = parser.parse_args()
    master, pool, store, grown = scale_pool.growth_setup(args.work, args.n, "store")
    home = tempfile.mkdtemp(prefix="skmm-bench-prefect-")
    time.sleep(2.5)  # files changed within SETTLE_NS of a listing are read, not keyed
    first = in_child(ingest_and_embed, str(pool), str(store), home)
    print("first", first, flush=True)
    scale_pool.make_pool(master, pool, args.n, grown)
    time.sleep(2.5)
    growth = in_child(ingest_and_embed, str(pool), str(store), home)
    print("growth", growth, flush=True)
    row = {"benchmark": "embed_growth_link", "command": " ".join(sys.argv), "label": args.label, "n": args.n,
           "added": grown, "model": MODEL["name"], "first": first, "growth": growth}
    log = json.loads(args.out.read_text()) if args.out.exists() else []
    log = [r for r in log if r.get("label") != args.label] + [row]
    args.out.write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
