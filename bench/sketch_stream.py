"""The LP sketch stage, streamed (issue 8): wall time and peak RSS of the old (in-memory) and new (streamed) stage.

For each N a child process writes, to a temporary local store, a dataset of N referenced samples (9 in 10 in the
train split, so the split is a strict subset of the embeddings table; random-looking 64-hex ids) and a synthetic
N × d float32 embeddings table of all of them (``write_vector_chunks``, 65 536-row chunks). Then each path runs
in a fresh child, so that no peak hides another, on the same inputs:

- ``old``: a frozen copy of ``run_sketch``'s LP branch before streaming: the train ids as Python str, the
  split's N × d features read into one array, normalised (a copy), projected in 8 192-row batches and
  concatenated (a copy), written with ``write_vectors``;
- ``new``: ``tasks.sketch.run_sketch`` (mode "lp"): the ids as one 64-byte array, the features streamed row group
  by row group, normalised and projected 8 192 rows at a time, written with ``write_vector_chunks``.

Each child records its wall time, its peak RSS (ru_maxrss, imports included; also the parent's os.wait4 rusage)
and the sha256 of the stored sketch table: the two must be equal.
Run: nice -n 10 .venv/bin/python bench/sketch_stream.py --sizes 100000,1000000 [--dim 512] [--sketch-dim 256]
Results merge into $SKMM_BENCH_OUT/sketch_stream.json (default bench/out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CHUNK = 1 << 16
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(os.environ.get("SKMM_BENCH_OUT", ROOT / "bench" / "out"))


def random_ids(N: int, seed: int = 0) -> np.ndarray:
    """N distinct random-looking 64-hex sample ids (``S64``), in no particular order."""
    rng = np.random.default_rng(seed)
    heads = np.unique(rng.integers(0, 2**63, size=N + N // 100 + 16, dtype=np.uint64))[:N]
    if len(heads) < N:
        raise RuntimeError("id collision: raise the head range")
    rng.shuffle(heads)
    raw = np.empty((N, 32), dtype=np.uint8)
    raw[:, :8] = heads[:, None].byteswap().view(np.uint8).reshape(N, 8)
    raw[:, 8:] = rng.integers(0, 256, size=(N, 24), dtype=np.uint8)
    out = np.empty((N, 64), dtype=np.uint8)
    out[:, 0::2], out[:, 1::2] = HEX[raw >> 4], HEX[raw & 15]
    return out.view("S64").reshape(N)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prepare(store_dir: str, N: int, d: int) -> None:
    """Child: write the dataset and the embeddings table; print their refs as JSON."""
    import pyarrow as pa

    from storage.datasets import write_samples, write_vector_chunks
    from tasks.store import open_store, store_spec

    st = open_store(store_spec(store_dir))
    ids = random_ids(N)
    start = time.perf_counter()
    splits = np.where(np.arange(N) % 10 == 9, "val", "train")
    table = pa.table({"sample_id": pa.array(ids.astype(str)), "source_uri": [f"mem://{i}" for i in range(N)],
                      "label": pa.array(np.char.add("c", (np.arange(N) % 10).astype(str))), "split": splits})
    dataset = write_samples(st, table)
    del table
    dataset_s = time.perf_counter() - start
    ids.sort()
    rng = np.random.default_rng(1)

    def chunks():
        for lo in range(0, N, CHUNK):
            rows = min(CHUNK, N - lo)
            yield ids[lo:lo + rows], rng.standard_normal((rows, d), np.float32) * np.float32(3.0)

    start = time.perf_counter()
    emb = write_vector_chunks(st, chunks(), {"bench": "sketch_stream", "dim": d}, kind="embeddings")
    print(json.dumps({"dataset": dataset.to_dict(), "embeddings": emb.to_dict(), "dataset_s": round(dataset_s, 1),
                      "embeddings_s": round(time.perf_counter() - start, 1),
                      "embeddings_mib": round(emb.artifact.size / 2**20, 1), "peak_rss_mib": round(peak_mib(), 1)}))


def old_lp_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None, seed: int = 0) -> dict:
    """Frozen copy of run_sketch's LP branch before streaming (as in tests/tasks/test_sketch_stream.py)."""
    from skmm.gradients import normalize_features
    from skmm.sketch import GaussianProjector
    from storage.datasets import DatasetRef, VectorTableRef, read_vectors, write_vectors
    from tasks.sketch import pool_ids
    from tasks.store import open_store

    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    ids, _ = pool_ids(st, ds, "train")
    if not ids:
        raise ValueError("the dataset has no train split to select from")
    _, features = read_vectors(st, emb, sample_ids=ids)
    grads = normalize_features(features.astype(np.float32))
    spec = None
    if sketch_dim is not None and sketch_dim < grads.shape[1]:
        proj = GaussianProjector(grads.shape[1], sketch_dim, seed).fit()
        grads = np.concatenate([proj.project(grads[i:i + 8192]) for i in range(0, len(grads), 8192)])
        spec = proj.spec.to_dict()
    producer = {"mode": "lp", "features": emb.producer_digest, "sketch": spec}
    return write_vectors(st, ids, grads, producer, kind="sketch").to_dict()


def measure(store_dir: str, refs_json: str, path: str, sketch_dim: int) -> None:
    """Child: one path of the LP sketch stage; print wall time, peak RSS and the table's sha256 as JSON."""
    from tasks.sketch import run_sketch
    from tasks.store import store_spec

    refs = json.loads(refs_json)
    store = store_spec(store_dir)
    after_imports = peak_mib()
    start = time.perf_counter()
    if path == "old":
        out = old_lp_sketch(refs["embeddings"], refs["dataset"], store, sketch_dim)
    else:
        out = run_sketch(refs["embeddings"], refs["dataset"], store, sketch_dim=sketch_dim, seed=0, mode="lp")
    print(json.dumps({"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak_mib(), 1),
                      "rss_after_imports_mib": round(after_imports, 1), "rows": out["num_rows"], "dim": out["dim"],
                      "sha256": out["artifact"]["sha256"]}))


def child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; (its JSON line, its peak RSS in MiB from wait4)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args[:2]} failed")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sketch-dim", type=int, default=256)
    parser.add_argument("--paths", default="old,new")
    args = parser.parse_args()
    path = OUT / "sketch_stream.json"
    results = json.loads(path.read_text()) if path.exists() else {"benchmark": "sketch_stream", "runs": {}}
    results["command"] = "nice -n 10 .venv/bin/python bench/sketch_stream.py " + " ".join(sys.argv[1:])
    for N in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="sketch_stream_") as tmp:
            store_dir = str(pathlib.Path(tmp) / "store")
            refs, _ = child(["prepare", store_dir, str(N), str(args.dim)])
            run = {"N": N, "d": args.dim,
                   "sketch_dim": args.sketch_dim, "prepare": {k: v for k, v in refs.items()
                                                              if k not in ("dataset", "embeddings")},
                   "paths": {}}
            for p in args.paths.split(","):
                res, rss = child(["measure", store_dir, json.dumps(refs), p, str(args.sketch_dim)])
                run["paths"][p] = {**res, "peak_rss_wait4_mib": round(rss, 1)}
                print(N, p, json.dumps(run["paths"][p]), flush=True)
            shas = {r["sha256"] for r in run["paths"].values()}
            run["same_sha256"] = len(shas) == 1
            results["runs"][f"N={N},d={args.dim},m={args.sketch_dim}"] = run
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        prepare(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "measure":
        measure(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
