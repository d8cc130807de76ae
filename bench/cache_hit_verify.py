"""What a rerun's cache hits cost when they name large tables: hashing every artifact again in every flow run (the
memo off, as before) against hashing only what changed since this machine hashed it (storage/verify_memo.py).

The LP gradients + sketch stage of bench/lp_sketch_growth.py (N samples, d-dim float32 features, m = 256) runs once
in a flow, then again three times, each a cache hit in a fresh process with its own flow run: with the memo off,
then on twice (the first of those hashes and records, the second finds every state unchanged). Measured: the
stage's wall time and the bytes the hits hashed (every verification hashes through ``storage.artifacts.sha256_file``).

    PYTHONPATH=. .venv/bin/python bench/cache_hit_verify.py --n 200000   # → bench/results/cache_hit_verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

from lp_sketch_growth import build, sketch_stage  # bench/ is on the path when run as a script
from scale import in_child


def hit(store: str, prefect_home: str, refs: dict, m: int, memo: str) -> dict:
    """The stage in a flow with ``SKMM_CACHE_DIR=memo``, counting the bytes hashed."""
    os.environ["SKMM_CACHE_DIR"] = memo
    import storage.artifacts

    real, hashed = storage.artifacts.sha256_file, []

    def counting(path):
        digest, size = real(path)
        hashed.append(size)
        return digest, size

    storage.artifacts.sha256_file = counting
    out = sketch_stage(store, prefect_home, refs, m)
    return {"sketch_stage_s": out["sketch_stage_s"], "objects_hashed": len(hashed), "bytes_hashed": sum(hashed),
            "sketch_digest": out["sketch_digest"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "cache_hit_verify.json")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="skmm-cache-hit-verify-"))
    try:
        store, home, memo = str(work / "store"), str(work / "prefect"), str(work / "memo")
        refs = in_child(build, store, args.n, 1, args.dim)["first"]
        first = in_child(hit, store, home, refs, args.m, "off")
        runs = {"first (computed)": first}
        for label, memo_dir in (("hit, memo off", "off"), ("hit, memo on (records)", memo),
                                ("hit, memo on (remembered)", memo), ("hit, memo off again", "off")):
            runs[label] = in_child(hit, store, home, refs, args.m, memo_dir)
            print(label, runs[label], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"benchmark": "cache_hit_verify", "command": " ".join(sys.argv), "n": args.n, "dim": args.dim, "m": args.m,
           "runs": runs}
    args.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
