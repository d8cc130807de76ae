"""What a grown pool's feature lookups read from the feature catalog: the new run's shard (new samples, found in
no table, plus a few rows of changed shards, found) and an unchanged shard (its own table).

A catalog like a pool's first embed run is written: ``--tables`` tables of 2 048 rows of ``--dim`` float32 features
(ViT-B-32: 512), each a contiguous id range, as the shards of a sorted dataset are. A 1 % growth's new run then
holds ``--new`` new ids spread over the whole id range (so every table's range meets them), alone or with the
other rows of ``--changed`` changed shards (one file of each removed: their rows are written again in the new
run). Each lookup runs on a fresh :class:`~storage.feature_catalog.FeatureCatalog` (one per run in the pipeline)
through a store whose real local filesystem counts the bytes read; ``--repeats`` times, best wall time. Run it on
the code before and after a change (``PYTHONPATH`` to each checkout) with the same ``--work``:

    PYTHONPATH=. .venv/bin/python bench/catalog_probe.py --label after     # → bench/results/catalog_probe.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
from metadata_read import _counting_store  # bench/ is on the path when run as a script

ROWS = 2048


def ids_of(prefix: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]


def build(store_dir: pathlib.Path, tables: int, dim: int) -> list[str]:
    """The catalog of a first embed run (written once per ``--work``); the catalogued ids, sorted."""
    from storage.artifacts import ArtifactStore
    from storage.datasets import producer_digest, write_vectors
    from storage.feature_catalog import FeatureCatalog

    ids = sorted(ids_of("pool", tables * ROWS))
    marker = store_dir / f"built-{tables}-{dim}"
    if marker.exists():
        return ids
    store = ArtifactStore(store_dir)
    rng = np.random.default_rng(0)
    producer = {"model": "bench", "dim": dim}
    catalog = FeatureCatalog(store, "embeddings", producer_digest(producer), "bench")
    for t in range(tables):
        part = ids[t * ROWS:(t + 1) * ROWS]
        catalog.register(write_vectors(store, part, rng.standard_normal((ROWS, dim)).astype(np.float32), producer),
                         part)
    marker.write_text("ok")
    return ids


def lookup(store_dir: pathlib.Path, dim: int, wanted: list[str]) -> dict:
    from storage.datasets import producer_digest
    from storage.feature_catalog import FeatureCatalog

    store = _counting_store(str(store_dir))
    catalog = FeatureCatalog(store, "embeddings", producer_digest({"model": "bench", "dim": dim}), "bench")
    start = time.perf_counter()
    got = catalog.lookup(wanted)
    return {"s": round(time.perf_counter() - start, 3), "mb_read": round(store.fs.bytes_read / 1e6, 2),
            "found": len(got.vectors), "tables_read": got.tables, "probed": getattr(got, "probed", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=50)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--changed", type=int, default=2, help="changed shards whose rows join the new run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="now")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "skmm-catalog")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "catalog_probe.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ids = build(args.work, args.tables, args.dim)
    rng = np.random.default_rng(1)
    changed = [sid for t in sorted(rng.choice(args.tables, args.changed, replace=False))
               for sid in ids[t * ROWS + 1:(t + 1) * ROWS]]  # a changed shard: one file gone, its other rows moved
    new = ids_of("new", args.new)
    cases = {"new_only": sorted(new), "new_and_changed_shards": sorted(new + changed),
             "unchanged_shard": ids[5 * ROWS:6 * ROWS]}
    vector_mb = round(sum(p.stat().st_size for p in (args.work / "objects").rglob("*.parquet")) / 1e6, 2)
    rows = {}
    for name, wanted in cases.items():
        runs = [lookup(args.work, args.dim, wanted) for _ in range(args.repeats)]
        rows[name] = {**min(runs, key=lambda r: r["s"]), "wanted": len(wanted)}
        print(args.label, name, rows[name], flush=True)
    result = {"benchmark": "catalog_probe", "command": " ".join(sys.argv), "label": args.label,
              "tables": args.tables, "rows_per_table": ROWS, "dim": args.dim, "catalog_mb": vector_mb, **rows}
    log = json.loads(args.out.read_text()) if args.out.exists() else []
    log = [r for r in log if r.get("label") != args.label] + [result]
    args.out.write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
