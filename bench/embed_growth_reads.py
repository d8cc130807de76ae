"""What a nightly growth run's embed stage reads from the store: with the ingest's new rows (the default since
the growth ingest leaves each rewritten shard's new samples aside) against without them (the embed task then reads
the changed shard's image column, as every growth did before).

A pool of N ~56 KB JPEGs (bench/scale_pool.py) is ingested in 2 048-row shards and embedded once; grown by 1 % (its
new samples land in every shard) and ingested again (reuse on: it writes ``catalog/new-rows/``). The grown dataset's
embed stage (``run_embed_counted``) then runs in a fresh child process, with and without the new-rows files (order
alternating over ``--repeats``; every file a run adds is deleted after it, and the new-rows files are put back),
through a store whose real local filesystem counts the bytes read: bytes read, wall time, samples through the tower.
The two tables must be the same artifact, or the script fails.

    .venv/bin/python bench/embed_growth_reads.py [--n 6144] [--model skmm-tiny-vit] [--repeats 2]
    # → bench/results/embed_growth_reads.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import scale_pool  # bench/ is on the path when run as a script
from metadata_read import _counting_store
from scale import in_child

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from storage.ingest.reuse import NEW_ROWS_PREFIX, SETTLE_NS  # after the path insert above


def ingest(pool: str, store: str) -> dict:
    from storage.artifacts import ArtifactStore
    from storage.ingest import ingest_image_folder

    result = ingest_image_folder(ArtifactStore(store), pool)
    return {"dataset": result.dataset.to_dict(), "reused": result.n_reused}


def embed(dataset: dict, store: str, model: str) -> dict:
    import tasks.embed as embed_mod
    from tasks.store import store_spec

    counting = _counting_store(store)
    embed_mod.open_store = lambda spec: counting  # every read of the stage goes through the counting filesystem
    start = time.perf_counter()
    combined, counts = embed_mod.run_embed_counted(dataset, {"name": model, "pretrained": None, "init_seed": 0},
                                                   store_spec(store))
    return {"stage_s": round(time.perf_counter() - start, 2), "mb_read": round(counting.fs.bytes_read / 1e6, 2),
            "table_sha256": combined["artifact"]["sha256"], **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6144)
    parser.add_argument("--model", default="skmm-tiny-vit")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "skmm-growth-reads")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "embed_growth_reads.json")
    args = parser.parse_args()
    n = args.n
    master, pool, base, grown = scale_pool.growth_setup(args.work, n, "store")
    time.sleep(SETTLE_NS / 1e9 + 0.5)  # files changed within 2 s of the listing are read, not keyed
    first = in_child(ingest, str(pool), str(base))["dataset"]
    first_embed = in_child(embed, first, str(base), args.model)
    print("first embed", first_embed, flush=True)
    scale_pool.make_pool(master, pool, n, grown)
    growth = in_child(ingest, str(pool), str(base))
    new_rows = sorted((base / NEW_ROWS_PREFIX).glob("*.parquet"))
    kept = {p: p.read_bytes() for p in new_rows}
    before = scale_pool.files_under(base)
    runs = []
    for r in range(args.repeats):
        for with_rows in ((True, False) if r % 2 == 0 else (False, True)):
            if not with_rows:
                for p in new_rows:
                    p.unlink()
            run = {"repeat": r, "new_rows": with_rows, **in_child(embed, growth["dataset"], str(base), args.model)}
            print(run, flush=True)
            runs.append(run)
            for path in scale_pool.files_under(base) - before:  # back to the grown store
                path.unlink()
            for p, data in kept.items():
                if not p.exists():
                    p.write_bytes(data)
    if len({run["table_sha256"] for run in runs}) != 1:
        raise SystemExit(f"the tables differ: {runs}")

    def best(with_rows: bool, key: str) -> float:
        return min(run[key] for run in runs if run["new_rows"] is with_rows)

    result = {"benchmark": "embed_growth_reads", "command": " ".join(sys.argv), "model": args.model, "n": n,
              "added": grown, "shard_rows": 2048, "reused_at_ingest": growth["reused"],
              "new_rows_files": len(new_rows), "new_rows_mb": round(sum(map(len, kept.values())) / 1e6, 2),
              "first_embed": first_embed, "runs": runs,
              "mb_read": {"with_new_rows": best(True, "mb_read"), "without": best(False, "mb_read")},
              "best_s": {"with_new_rows": best(True, "stage_s"), "without": best(False, "stage_s")}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "first_embed")}, indent=2))


if __name__ == "__main__":
    main()
