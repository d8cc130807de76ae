"""An ingest of a million samples, end to end: WebDataset tar shards of N distinct tiny PNGs (8×8, ~100 bytes,
labels in ``.cls`` members, 3 classes), ingested by ``ingest_webdataset`` into a fresh local store in a fresh child
process: wall time, peak RSS (the process's high-water mark), samples. Tiny images keep the image bytes small, so
what grows with N is the per-sample bookkeeping; ``--code`` runs the same measurement against another checkout
(e.g. a ``git worktree`` of an older commit) for a before/after in one script.

    .venv/bin/python bench/ingest_million.py [--n 1000000] [--code /tmp/skmm-old]
    # → bench/results/ingest_million.json

``--growth``: the nightly case at this size instead. The pool is ingested once into a fresh store, grown by one new
tar of N/100 samples (1 %), and ingested again into that store (reuse on: the unchanged tars are not read) and,
with ``reuse=False``, into a copy of the first store (every tar read again); both grown datasets must be the same.

    .venv/bin/python bench/ingest_million.py --n 1000000 --growth    # → bench/results/ingest_million_growth.json
    .venv/bin/python bench/ingest_million.py --n 10000000 --growth --no-baseline \
        --out bench/results/ingest_ten_million_growth.json      # 10^7: ~20 GB of tars; without reuse=False

The tars are written by two processes (one tar each at a time).
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from scale import in_child

PER_TAR = 100_000


def make_tars(folder: pathlib.Path, n: int) -> list[str]:
    """N distinct 8×8 PNGs (pixels from the index) in tars of PER_TAR samples; reused when present."""

    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, n, PER_TAR)
    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(_tar, [folder / f"pool-{start // PER_TAR:05d}.tar" for start in starts],
                             [range(start, min(start + PER_TAR, n)) for start in starts]))


def _tar(path: pathlib.Path, indices: range) -> str:
    """One tar of the PNGs of ``indices`` (reused when present)."""
    import numpy as np
    from PIL import Image

    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in indices:
                pixels = np.frombuffer(i.to_bytes(8, "little") * 24, np.uint8).reshape(8, 8, 3)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                for name, data in ((f"{i:08d}.png", buf.getvalue()), (f"{i:08d}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return str(path)


def ingest(code: str, tars: list[str], store: str, reuse: bool = True) -> dict:
    sys.path.insert(0, code)
    import storage
    from storage.artifacts import ArtifactStore
    from storage.ingest import ingest_webdataset

    if not pathlib.Path(storage.__file__).resolve().is_relative_to(pathlib.Path(code).resolve()):
        raise RuntimeError(f"imported {storage.__file__}, not the checkout {code}")
    start = time.perf_counter()
    result = ingest_webdataset(ArtifactStore(store), tars, **({} if reuse else {"reuse": False}))
    return {"ingest_s": round(time.perf_counter() - start, 1), "n_samples": result.n_samples,
            "reused": getattr(result, "n_reused", 0), "kept": getattr(result, "n_kept", 0),
            "version": result.dataset.version, "code": code}


def growth(work: pathlib.Path, n: int, out: pathlib.Path, baseline: bool = True) -> None:
    """The nightly case (see the module docstring): first ingest, + 1 % in a new tar, again with reuse and (with
    ``baseline``) without."""
    import shutil

    code = str(pathlib.Path(__file__).resolve().parent.parent)
    tars = make_tars(work / "tars", n)
    grown = [*tars, _tar(work / "tars" / f"pool-growth-{n}.tar", range(n, n + n // 100))]  # beside the others
    time.sleep(2.5)  # files changed within 2 s of the listing are read, not keyed (storage/ingest/reuse.py)
    stores = [work / "growth-store", work / "growth-store-copy"]
    for store in stores:
        shutil.rmtree(store, ignore_errors=True)
    first = in_child(ingest, code, tars, str(stores[0]))
    print("first", first, flush=True)
    if baseline:
        shutil.copytree(stores[0], stores[1])
    rows = {"first": first, "growth": in_child(ingest, code, grown, str(stores[0]))}
    print("growth", rows["growth"], flush=True)
    if baseline:
        rows["growth_reuse_false"] = in_child(ingest, code, grown, str(stores[1]), False)
        print(rows, flush=True)
        if rows["growth"]["version"] != rows["growth_reuse_false"]["version"]:
            raise SystemExit(f"the grown datasets differ: {rows}")
    out.write_text(json.dumps({"benchmark": "ingest_million_growth", "n": n, "added": n // 100, **rows}, indent=2)
                   + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--code", action="append", default=[],
                        help="checkout(s) to measure (default: this one)")
    parser.add_argument("--work", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "skmm-ingest-million")
    parser.add_argument("--growth", action="store_true", help="the nightly case: + 1 %% with and without reuse")
    parser.add_argument("--no-baseline", action="store_true", help="--growth without the reuse=False ingest")
    parser.add_argument("--out", type=pathlib.Path, help="the result file (default: by mode, in bench/results)")
    args = parser.parse_args()
    results = pathlib.Path(__file__).resolve().parent / "results"
    if args.growth:
        growth(args.work, args.n, args.out or results / "ingest_million_growth.json", not args.no_baseline)
        return
    codes = args.code or [str(pathlib.Path(__file__).resolve().parent.parent)]
    start = time.perf_counter()
    tars = make_tars(args.work / "tars", args.n)
    print(f"tars ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for code in codes:
        store = args.work / f"store-{len(rows)}"
        if store.exists():
            import shutil

            shutil.rmtree(store)
        row = in_child(ingest, code, tars, str(store))
        print(row, flush=True)
        rows.append(row)
    if len({r["version"] for r in rows}) != 1:
        raise SystemExit(f"the checkouts ingested different datasets: {rows}")
    out = args.out or results / "ingest_million.json"
    out.write_text(json.dumps({"benchmark": "ingest_million", "n": args.n, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
