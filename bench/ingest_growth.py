"""A nightly growth run's ingest: the pool grown by 1 %, ingested again into the store that holds yesterday's
dataset, three ways:

- ``growth``: what the ingest does now — files unchanged since the store's last ingest of the folder are not read
  (storage/ingest/reuse.py: their bytes come from yesterday's shards); only the new files are read and checked;
- ``growth_reread``: ``reuse=False`` on a copy of the same store — every file is read and hashed again, only the new
  ones decoded (the store's decode-check record, storage/ingest/checked.py): the behaviour before reuse;
- ``growth_unrecorded``: the grown pool into a fresh store — every file read and decoded (the behaviour before
  the decode-check record).

Each in a fresh child process: wall time of the ingest call, peak RSS, files read and images decoded (the real
functions, counted by wrappers), and the sample shards each one wrote (the growth keeps yesterday's unchanged
shards and writes only a new run: storage/ingest/writer.py). The three grown datasets must hold the same rows
(version, ids and source URIs), or the script fails.

    .venv/bin/python bench/ingest_growth.py [--sizes 10000,30000] [--work /tmp/skmm-growth] [--cold]
    # → bench/results/ingest_growth.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import shutil
import sys
import time

import scale_pool  # bench/ is on the path when run as a script
from scale import in_child

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from storage.ingest.reuse import SETTLE_NS  # after the path insert above


def ingest_counted(pool: str, store: str, reuse: bool = True) -> dict:
    """``ingest_image_folder`` of ``pool`` into ``store``: seconds, files read, decode checks run, dataset
    identity."""
    import hashlib

    import storage.ingest.checked as checked
    import storage.ingest.folder as folder
    from storage.artifacts import ArtifactStore
    from storage.sample_reader import read_metadata

    decode, read = checked.decode_problem, folder.read_and_check
    decodes, reads, read_bytes = itertools.count(), itertools.count(), []

    def counted_decode(data: bytes, max_pixels: int) -> str | None:
        next(decodes)  # atomic under the GIL: the read pool's threads call this concurrently
        return decode(data, max_pixels)

    def counted_read(*args, **kwargs):
        next(reads)
        sid, data, problem = read(*args, **kwargs)
        read_bytes.append(len(data or b""))  # list.append is atomic under the GIL
        return sid, data, problem

    checked.decode_problem, folder.read_and_check = counted_decode, counted_read
    st = ArtifactStore(store)
    shards_before = set(st.list_paths("objects/samples"))
    start = time.perf_counter()
    result = folder.ingest_image_folder(st, pool, reuse=reuse)
    seconds = time.perf_counter() - start
    written = sorted(set(st.list_paths("objects/samples")) - shards_before)
    rows = read_metadata(st, result.dataset, ["sample_id", "source_uri"])
    digest = hashlib.sha256()
    for column in ("sample_id", "source_uri"):
        digest.update("\n".join(rows[column].to_pylist()).encode())
    return {"ingest_s": round(seconds, 2), "read": next(reads), "source_mb_read": round(sum(read_bytes) / 1e6, 1),
            "decoded": next(decodes), "reused": result.n_reused, "kept": getattr(result, "n_kept", 0),
            "shards_written": len(written),
            "mb_written": round(sum(os.path.getsize(st._path(rel)) for rel in written) / 1e6, 1),
            "n_samples": result.n_samples, "version": result.dataset.version, "rows_sha256": digest.hexdigest()}


def evict(*roots: pathlib.Path) -> int:
    """Drop every file under ``roots`` from the page cache (written back first), as for a pool far larger than
    memory, whose files a nightly run finds on disk, not in RAM; the number of files."""
    n = 0
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                finally:
                    os.close(fd)
    return n


def run_size(n: int, work: pathlib.Path, cold: bool = False) -> dict:
    grown = n // 100
    master = work / "master"
    scale_pool.make_master(master, n + grown)
    pool = work / f"pool-{n}"
    shutil.rmtree(pool, ignore_errors=True)
    scale_pool.make_pool(master, pool, 0, n)
    time.sleep(SETTLE_NS / 1e9 + 0.5)  # files changed within 2 s of the listing are read, not keyed (reuse.py)
    stores = [work / f"store-{n}-{k}" for k in ("a", "b", "c")]
    for s in stores:
        shutil.rmtree(s, ignore_errors=True)
    out: dict = {"n": n, "added": grown, "page_cache": "evicted before each growth run" if cold else "warm"}
    out["first"] = in_child(ingest_counted, str(pool), str(stores[0]))
    print(f"[N={n}] first {out['first']['ingest_s']} s, read {out['first']['read']}", flush=True)
    shutil.copytree(stores[0], stores[1])  # yesterday's store, twice
    scale_pool.make_pool(master, pool, n, grown)
    for key, store, reuse in (("growth", stores[0], True), ("growth_reread", stores[1], False),
                              ("growth_unrecorded", stores[2], True)):
        if cold:
            evict(master, pool, *(s for s in stores if s.exists()))
        out[key] = in_child(ingest_counted, str(pool), str(store), reuse)
    runs = [out[k] for k in ("growth", "growth_reread", "growth_unrecorded")]
    if len({(r["version"], r["rows_sha256"]) for r in runs}) != 1:
        raise SystemExit(f"N={n}: the grown datasets differ between the three runs")
    a, b, c = runs
    out["speedup_vs_reread"] = round(b["ingest_s"] / a["ingest_s"], 2)
    out["speedup_vs_unrecorded"] = round(c["ingest_s"] / a["ingest_s"], 2)
    print(f"[N={n}] growth {a['ingest_s']} s (read {a['read']}: {a['source_mb_read']} MB, reused {a['reused']}, "
          f"kept {a['kept']}, wrote {a['shards_written']} shards: {a['mb_written']} MB) "
          "vs reread "
          f"{b['ingest_s']} s (read {b['read']}, decoded {b['decoded']}) vs unrecorded {c['ingest_s']} s "
          f"(decoded {c['decoded']}): {out['speedup_vs_reread']}× / {out['speedup_vs_unrecorded']}×", flush=True)
    for s in stores:
        shutil.rmtree(s, ignore_errors=True)
    shutil.rmtree(pool, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,30000")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/skmm-growth"))
    parser.add_argument("--cold", action="store_true",
                        help="evict the pool's and the stores' files from the page cache before each growth run")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "ingest_growth.json")
    args = parser.parse_args()
    results = [run_size(int(s), args.work, args.cold) for s in args.sizes.split(",")]
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
