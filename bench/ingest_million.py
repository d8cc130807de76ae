"""An ingest of a million samples, end to end: WebDataset tar shards of N distinct tiny PNGs (8×8, ~100 bytes,
labels in ``.cls`` members, 3 classes), ingested by ``ingest_webdataset`` into a fresh local store in a fresh child
process: wall time, peak RSS (the process's high-water mark), samples. Tiny images keep the image bytes small, so
what grows with N is the per-sample bookkeeping; ``--code`` runs the same measurement against another checkout
(e.g. a ``git worktree`` of an older commit) for a before/after in one script.

    .venv/bin/python bench/ingest_million.py [--n 1000000] [--code /tmp/skmm-old]
    # → bench/results/ingest_million.json
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
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n, PER_TAR):
        path = folder / f"pool-{start // PER_TAR:05d}.tar"
        paths.append(str(path))
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + PER_TAR, n)):
                pixels = np.frombuffer(i.to_bytes(8, "little") * 24, np.uint8).reshape(8, 8, 3)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                for name, data in ((f"{i:08d}.png", buf.getvalue()), (f"{i:08d}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return paths


def ingest(code: str, tars: list[str], store: str) -> dict:
    sys.path.insert(0, code)
    import storage
    from storage.artifacts import ArtifactStore
    from storage.ingest import ingest_webdataset

    if not pathlib.Path(storage.__file__).resolve().is_relative_to(pathlib.Path(code).resolve()):
        raise RuntimeError(f"imported {storage.__file__}, not the checkout {code}")
    start = time.perf_counter()
    result = ingest_webdataset(ArtifactStore(store), tars)
    return {"ingest_s": round(time.perf_counter() - start, 1), "n_samples": result.n_samples,
            "version": result.dataset.version, "code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--code", action="append", default=[],
                        help="checkout(s) to measure (default: this one)")
    parser.add_argument("--work", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "skmm-ingest-million")
    args = parser.parse_args()
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
    out = pathlib.Path(__file__).resolve().parent / "results" / "ingest_million.json"
    out.write_text(json.dumps({"benchmark": "ingest_million", "n": args.n, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
