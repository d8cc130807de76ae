"""Benchmark: rebuild the DuckDB lineage index from N runs × M-sample selections, then time the audit queries.

    .venv/bin/python bench/lineage_index.py                       # 1 000 runs × 10 000 samples (the issue's size)
    .venv/bin/python bench/lineage_index.py --runs 50 --samples 2000   # a quick check

Each run records three stages into a local temporary store, exactly as a pipeline would: ``sketch`` (input: one
shared dataset artifact; output: one shared sketch), ``select`` (a 10 000-sample selection drawn from a pool of
200 000 sha256-hex sample ids, with ranks and weights) and ``train`` (input: the selection; outputs: a small model
artifact and metrics) — 6 event objects, 1 selection Parquet and 1 model per run. Then:

- ``rebuild`` is timed (event listing + parsing, artifact existence check, Parquet load, table build, swap);
- ``samples_for_model`` is timed once right after the rebuild (this opens the new index file), then on 20
  random models (median, p95, max), each result checked against the selection it was trained on;
  ``models_for_sample`` likewise on 20 ids of one selection.

Results go to ``$SKMM_BENCH_OUT/lineage_index.json`` (default bench/out/).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import peak_rss_mb, record

from storage.artifacts import ArtifactStore
from storage.index import LineageIndex
from storage.lineage import LineageRecorder
from storage.selections import write_selection


def _dir_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate(store: ArtifactStore, runs: int, samples: int, pool_size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    pool = np.array([hashlib.sha256(f"sample-{i}".encode()).hexdigest() for i in range(pool_size)])
    dataset = store.put_bytes(hashlib.sha256(pool.tobytes()).digest() * 64, "dataset", ".parquet")
    sketch = store.put_bytes(b"sketch-of-the-pool" * 1000, "sketch", ".npy")
    truth = []
    for i in range(runs):
        rec = LineageRecorder(store, flow_run_id=f"flow-{i}", git_commit="0" * 40,
                              config={"run": i, "budget": samples, "method": "skmm"})
        with rec.stage("sketch", [dataset]):
            rec.complete("sketch", [sketch])
        with rec.stage("select", [sketch]):
            chosen = rng.choice(pool_size, size=samples, replace=False)
            sel = write_selection(store, pool[chosen].tolist(), np.arange(samples), rng.random(samples) + 0.5,
                                  "skmm", {"budget": samples, "seed": i})
            rec.complete("select", selection=sel)
        with rec.stage("train", [sel]):
            model = store.put_bytes(f"model-weights-{i}".encode() * 100, "model", ".pt")
            rec.complete("train", [model], model=model, metrics={"accuracy": float(rng.random()), "epochs": 3})
        truth.append({"model": model.sha256, "ids": chosen})
    return truth, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify-sha256", action="store_true", help="also time a rebuild that re-hashes artifacts")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store (printed) for inspection")
    args = parser.parse_args()

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="skmm-lineage-bench-"))
    try:
        store = ArtifactStore(workdir / "store")
        t0 = time.perf_counter()
        truth, pool = generate(store, args.runs, args.samples, args.pool, args.seed)
        generate_s = time.perf_counter() - t0
        print(f"generated {args.runs} runs in {generate_s:.1f}s", file=sys.stderr)

        index = LineageIndex(workdir / "lineage.duckdb")
        stats = index.rebuild(store, verify_sha256=False)  # existence and size only, as in the recorded figures
        second = index.rebuild(store, verify_sha256=False)  # the index is a cache: rebuilding again is normal
        verify_stats = index.rebuild(store, verify_sha256=True) if args.verify_sha256 else None

        rnd = random.Random(args.seed)
        picks = rnd.sample(truth, min(args.queries, len(truth)))
        start = time.perf_counter()
        index.samples_for_model(picks[0]["model"])  # the first query after the rebuild also opens the new file
        first_ms = (time.perf_counter() - start) * 1000
        model_ms = []
        for pick in picks:
            start = time.perf_counter()
            table = index.samples_for_model(pick["model"])
            model_ms.append((time.perf_counter() - start) * 1000)
            expected = set(pool[pick["ids"]].tolist())
            got = table.column("sample_id").to_pylist()
            assert len(got) == len(expected) and set(got) == expected, "samples_for_model returned wrong ids"
            assert table.column("rank").to_pylist() == list(range(args.samples))
        sample_ms = []
        for sid in rnd.sample(list(pool[truth[0]["ids"]]), min(args.queries, args.samples)):
            start = time.perf_counter()
            models = index.models_for_sample(sid)
            sample_ms.append((time.perf_counter() - start) * 1000)
            assert truth[0]["model"] in models.column("model_sha256").to_pylist()

        def summary(ms: list[float]) -> dict:
            ms = sorted(ms)
            return {"median_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
                    "max_ms": round(ms[-1], 2), "min_ms": round(ms[0], 2), "n": len(ms)}

        result = {
            "runs": args.runs, "samples_per_selection": args.samples, "pool": args.pool,
            "event_objects": stats["events"], "selection_rows": stats["selections"],
            "distinct_samples": stats["samples"],
            "generate_s": round(generate_s, 1),
            "store_bytes": _dir_size(workdir / "store"),
            "db_bytes": os.path.getsize(workdir / "lineage.duckdb"),
            "rebuild": {k: stats[k] for k in ("seconds", "read_events_s", "check_artifacts_s", "build_s")},
            "rebuild_again_s": second["seconds"],
            "rebuild_verify_sha256_s": verify_stats["seconds"] if verify_stats else None,
            "samples_for_model_first_after_rebuild_ms": round(first_ms, 2),
            "samples_for_model": summary(model_ms),
            "models_for_sample": summary(sample_ms),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "pyarrow": pa.__version__,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        }
        record("lineage_index", result)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
