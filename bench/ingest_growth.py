"""A nightly growth run's ingest: the pool grown by 1 %, ingested again into the store that holds yesterday's
dataset (which records the images that passed the decode check, storage/ingest/checked.py) against the same
grown pool ingested into a store without that record (every file decoded: what a growth run did before).

For each pool size N: ``first`` (N images into a fresh store), ``growth`` (N + 1 % into the same store),
``growth_unrecorded`` (N + 1 % into another fresh store), each in a fresh child process (wall time of the ingest
call, peak RSS, and how many images the decode check decoded — the real check, counted by a wrapper). The two
growth datasets must be the same (version and shard bytes), or the script fails.

    .venv/bin/python bench/ingest_growth.py [--sizes 10000,30000] [--work /tmp/skmm-growth]
    # → bench/results/ingest_growth.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import shutil
import sys
import time

import scale_pool  # bench/ is on the path when run as a script
from scale import in_child

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def ingest_counted(pool: str, store: str) -> dict:
    """``ingest_image_folder`` of ``pool`` into ``store``: seconds, decode checks run, dataset identity."""
    import storage.ingest.checked as checked
    from storage.artifacts import ArtifactStore
    from storage.datasets import load_manifest
    from storage.ingest import ingest_image_folder

    real, calls = checked.decode_problem, itertools.count()

    def counted(data: bytes, max_pixels: int) -> str | None:
        next(calls)  # atomic under the GIL: the read pool's threads call this concurrently
        return real(data, max_pixels)

    checked.decode_problem = counted
    st = ArtifactStore(store)
    start = time.perf_counter()
    result = ingest_image_folder(st, pool)
    seconds = time.perf_counter() - start
    shards = [s.artifact.sha256 for s in load_manifest(st, result.dataset).shards]
    return {"ingest_s": round(seconds, 2), "decoded": next(calls), "n_samples": result.n_samples,
            "version": result.dataset.version, "shards_sha256": shards}


def run_size(n: int, work: pathlib.Path) -> dict:
    grown = n // 100
    master = work / "master"
    scale_pool.make_master(master, n + grown)
    pool = work / f"pool-{n}"
    shutil.rmtree(pool, ignore_errors=True)
    scale_pool.make_pool(master, pool, 0, n)
    stores = [work / f"store-{n}-{k}" for k in ("a", "b")]
    for s in stores:
        shutil.rmtree(s, ignore_errors=True)
    out: dict = {"n": n, "added": grown}
    out["first"] = in_child(ingest_counted, str(pool), str(stores[0]))
    print(f"[N={n}] first {out['first']['ingest_s']} s, decoded {out['first']['decoded']}", flush=True)
    scale_pool.make_pool(master, pool, n, grown)
    out["growth"] = in_child(ingest_counted, str(pool), str(stores[0]))
    out["growth_unrecorded"] = in_child(ingest_counted, str(pool), str(stores[1]))
    a, b = out["growth"], out["growth_unrecorded"]
    if (a["version"], a["shards_sha256"]) != (b["version"], b["shards_sha256"]):
        raise SystemExit(f"N={n}: the grown datasets differ between the two stores")
    for part in out.values():
        if isinstance(part, dict):
            part.pop("shards_sha256", None)
    out["speedup"] = round(b["ingest_s"] / a["ingest_s"], 2)
    print(f"[N={n}] growth {a['ingest_s']} s ({a['decoded']} decoded) vs unrecorded {b['ingest_s']} s "
          f"({b['decoded']} decoded): {out['speedup']}×", flush=True)
    for s in stores:
        shutil.rmtree(s, ignore_errors=True)
    shutil.rmtree(pool, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,30000")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/skmm-growth"))
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "ingest_growth.json")
    args = parser.parse_args()
    results = [run_size(int(s), args.work) for s in args.sizes.split(",")]
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
