"""A nightly growth run's embed stage: the new samples of every shard packed into shared blocks (the default)
against each shard padding its own few new samples to a whole block (``pack=False``, the path before).

A pool of N ~56 KB JPEGs (bench/scale_pool.py) is ingested in 2 048-row shards and embedded once; then grown by
1 % (its new samples land in every shard) and ingested again. The grown dataset is embedded packed and unpacked
(order alternating over ``--repeats``; after each run every file it added to the store is deleted, so each starts
from the same store and catalog), each in a fresh child process:
wall time of the stage (``run_embed_counted``), peak RSS, samples through the tower and forward passes
(``tower_blocks``). The two tables must be the same artifact, or the script fails.

    .venv/bin/python bench/embed_growth_pack.py [--n 6144] [--model ViT-S-32] [--repeats 2]
    # → bench/results/embed_growth_pack_<model>.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import scale_pool  # bench/ is on the path when run as a script
from scale import in_child

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def ingest(pool: str, store: str) -> dict:
    from storage.artifacts import ArtifactStore
    from storage.ingest import ingest_image_folder

    return {"dataset": ingest_image_folder(ArtifactStore(store), pool).dataset.to_dict()}


def embed(dataset: dict, store: str, model: str, pack: bool) -> dict:
    from tasks.embed import run_embed_counted
    from tasks.store import store_spec

    start = time.perf_counter()
    combined, counts = run_embed_counted(dataset, {"name": model, "pretrained": None, "init_seed": 0},
                                         store_spec(store), pack=pack)
    return {"stage_s": round(time.perf_counter() - start, 2), "table_sha256": combined["artifact"]["sha256"],
            **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6144)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "skmm-growth-pack")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    n = args.n
    master, pool, base, grown = scale_pool.growth_setup(args.work, n, "store-base")
    first = in_child(ingest, str(pool), str(base))["dataset"]
    first_embed = in_child(embed, first, str(base), args.model, True)
    print("first embed", first_embed, flush=True)
    scale_pool.make_pool(master, pool, n, grown)
    dataset = in_child(ingest, str(pool), str(base))["dataset"]
    before = scale_pool.files_under(base)
    runs = []
    for r in range(args.repeats):
        for pack in ((True, False) if r % 2 == 0 else (False, True)):
            run = {"repeat": r, "pack": pack, **in_child(embed, dataset, str(base), args.model, pack)}
            print(run, flush=True)
            runs.append(run)
            for path in scale_pool.files_under(base) - before:  # back to the grown store
                path.unlink()
    if len({run["table_sha256"] for run in runs}) != 1:
        raise SystemExit(f"packed and unpacked tables differ: {runs}")

    def best(pack: bool) -> float:
        return min(run["stage_s"] for run in runs if run["pack"] is pack)

    result = {"benchmark": "embed_growth_pack", "model": args.model, "n": n, "added": grown, "shard_rows": 2048,
              "first_embed": first_embed, "runs": runs, "best_s": {"packed": best(True), "unpacked": best(False)},
              "speedup_best": round(best(False) / best(True), 3)}
    out = args.out or pathlib.Path(__file__).resolve().parent / "results" / f"embed_growth_pack_{args.model}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
