"""The ingest's per-sample bookkeeping at 10^6 and 10^7 samples: the writer's sample id → (label, split) map as a
Python dict (the code before) against :class:`storage.ingest.id_codes.IdCodes`, and the decode check's fresh
digests as a list then ``np.unique`` (before) against the real ``CheckedImages`` (a bytearray, sorted in place by
``commit()``, which writes the record into a temporary store).

Each variant runs in a fresh child process: N distinct 32-byte ids are looked up and set (code = i % 40: the
writer's duplicate check and insert), then all are read back in id order (the writer's pass 2). Recorded:
the child's peak RSS over its RSS before the first insert (MiB, and bytes per sample) and the seconds.

    .venv/bin/python bench/ingest_bookkeeping.py [--sizes 1000000,10000000]   # → bench/results/ingest_bookkeeping.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from scale import in_child


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ids(n: int, start: int = 0):
    import numpy as np

    rng = np.random.default_rng(start)
    for block in range(0, n, 65536):
        raw = rng.bytes(32 * min(65536, n - block))
        yield from (raw[i:i + 32] for i in range(0, len(raw), 32))


def run(kind: str, n: int) -> dict:
    import resource

    import numpy as np

    from storage.ingest.id_codes import DIGEST, IdCodes

    before = _rss_mib()
    start = time.perf_counter()
    if kind in ("dict", "idcodes"):
        table: dict | IdCodes = {} if kind == "dict" else IdCodes()
        for i, key in enumerate(ids(n)):  # the writer's one lookup-or-insert per sample
            if kind == "dict":
                assert table.get(key) is None
                table[key] = i % 40  # type: ignore[index]
            else:
                assert table.setdefault(key, i % 40) is None  # type: ignore[union-attr]
        inserted = time.perf_counter() - start
        total = 0
        if kind == "dict":
            for key in sorted(table):  # type: ignore[arg-type]
                total += table[key]  # type: ignore[index]
        else:
            for keys, codes in table.buckets():  # type: ignore[union-attr]
                total += int(table.codes_of(keys).sum())  # type: ignore[union-attr]
                assert len(keys) == len(codes)
    elif kind == "list":  # the decode check's fresh digests as before: a list, then one unique copy
        fresh = []
        for key in ids(n):
            fresh.append(key)
        inserted = time.perf_counter() - start
        total = len(np.unique(np.array(fresh, DIGEST)).tobytes())
    else:  # the real CheckedImages: its bytearray filled as check() fills it, then commit() into a store
        import tempfile

        from storage.artifacts import ArtifactStore
        from storage.ingest.checked import CheckedImages

        checker = CheckedImages(ArtifactStore(tempfile.mkdtemp(prefix="skmm-bookkeeping-")))
        for key in ids(n):
            checker._fresh += key
        inserted = time.perf_counter() - start
        total = checker.commit() is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "n": n, "insert_s": round(inserted, 2), "total_s": round(time.perf_counter() - start, 2),
            "rss_before_mib": round(before, 1), "peak_over_before_mib": round(peak - before, 1),
            "bytes_per_sample": round((peak - before) * 2**20 / n, 1), "check": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for kind in ("dict", "idcodes", "list", "checked"):
            row = in_child(run, kind, n)
            print(row, flush=True)
            rows.append(row)
    out = pathlib.Path(__file__).resolve().parent / "results" / "ingest_bookkeeping.json"
    out.write_text(json.dumps({"benchmark": "ingest_bookkeeping", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
