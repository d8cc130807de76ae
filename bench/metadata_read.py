"""Reading metadata without the image bytes: the old whole-shard path vs ``storage.sample_reader``, same process.

On a pool of ~56 KB JPEGs (bench/scale_pool.py, default 10 000 images, ingested with the default 2 048 rows a
shard), through a local store whose fsspec filesystem counts the bytes read from the files it opens:

- ``train_split``: the train split's ids + labels (what select reads) — old: ``read_shard`` of every shard (whole
  object fetched and hashed, then projected), as ``tasks.select.train_split`` did; new: ``train_split`` (the id,
  label and split columns only, verified by the dataset version);
- ``finetune_images``: finetune's read for n chosen train samples (default 200) + the val split — old: the
  ``_selected_images`` that read ``read_samples(..., columns=[sample_id, data, label, split])``; new:
  ``tasks.finetune._selected_images`` (metadata, then ``read_images`` of the chosen + val ids). Results are
  checked identical; the bytes each path holds when done (Arrow + Python bytes) are reported, and each path's
  peak RSS is measured once more in a fresh child process.

The shard memo of ``read_shard`` is cleared before every old-path repeat (it would otherwise serve the shards
from memory); the OS page cache is warm for both paths (the first repeat of each is dropped).

    nice -n 10 .venv/bin/python bench/metadata_read.py [--count 10000] [--n 200] [--repeats 3]
        [--work /tmp/skmm-metaread] [--out bench/results/metadata_read.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import random
import statistics
import time
from typing import Any

import scale_pool  # bench/ is the script's folder, so it is on the path
from _proc import peak_rss_mib as vmhwm_mib


def _counting_store(path: str) -> Any:
    """An ArtifactStore on ``path`` whose (real, local) fsspec filesystem counts the bytes read through it."""
    from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

    from storage.artifacts import ArtifactStore

    class Opener(LocalFileOpener):
        def read(self, *args: Any) -> bytes:
            out = super().read(*args)
            self.fs.bytes_read += len(out)
            return out

        def readinto(self, buf: Any) -> int:
            n = super().readinto(buf)
            self.fs.bytes_read += n or 0
            return n

    class CountingFS(LocalFileSystem):
        cachable = False

        def __init__(self) -> None:
            super().__init__()
            self.bytes_read = 0

        def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
            if "r" in mode:
                return Opener(self._strip_protocol(path), mode, fs=self, **kwargs)
            return super()._open(path, mode, block_size, **kwargs)

    store = ArtifactStore(path)
    store.fs = CountingFS()
    return store


def old_train_split(store: Any, dataset: Any) -> tuple[Any, Any]:
    """tasks.select.train_split before issue 8: every shard read whole (read_shard), then projected."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from storage.datasets import ID_DTYPE, load_manifest, read_shard, sample_id_array

    ids, labels = [], []
    for shard in load_manifest(store, dataset).shards:
        rows = read_shard(store, shard, columns=["sample_id", "label", "split"])
        train = rows.filter(pc.equal(rows.column("split"), "train"))
        ids.append(sample_id_array(train.column("sample_id")))
        labels.extend(train.column("label").chunks)
    return (np.concatenate(ids) if ids else np.empty(0, ID_DTYPE)), pa.chunked_array(labels, pa.string())


def old_selected_images(st: Any, ds: Any, chosen: list[str]) -> tuple:
    """tasks.finetune._selected_images before issue 8: every row of the pool, image bytes included, in memory."""
    from storage.datasets import read_samples

    table = read_samples(st, ds, columns=["sample_id", "data", "label", "split"])
    rows = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    splits, labels, data = (table.column(c).to_pylist() for c in ("split", "label", "data"))
    images, ys = [data[rows[s]] for s in chosen], [labels[rows[s]] for s in chosen]
    val = [i for i, s in enumerate(splits) if s == "val"]
    classes = sorted({label for label in labels if label is not None})
    return images, ys, [data[i] for i in val], [labels[i] for i in val], classes


def _clear_memo() -> None:
    from storage import datasets

    with datasets._SHARD_LOCK:
        datasets._SHARD_CACHE.clear()


def _timed(fn: Any, store_path: str, *args: Any) -> tuple[float, int, Any]:
    store = _counting_store(store_path)
    _clear_memo()
    start = time.perf_counter()
    out = fn(store, *args)
    return time.perf_counter() - start, store.fs.bytes_read, out


def _held(images: tuple) -> int:
    return sum(len(b) for b in images[0]) + sum(len(b) for b in images[2])


def _peak_child(which: str, store_path: str, dataset: dict, chosen: list[str], conn: Any) -> None:
    from storage.datasets import DatasetRef
    from tasks.finetune import _selected_images

    if which != "baseline":  # baseline: the imports only
        fn = old_selected_images if which == "old" else _selected_images
        fn(_counting_store(store_path), DatasetRef.from_dict(dataset), chosen)
    conn.send(vmhwm_mib())  # VmHWM, not ru_maxrss: the latter survives exec
    conn.close()


def peak_rss_mib(which: str, store_path: str, dataset: dict, chosen: list[str]) -> float:
    """Peak RSS (MiB, VmHWM) of a fresh process that imports the stack and runs one finetune image read."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(which, store_path, dataset, chosen, child))
    proc.start()
    child.close()
    value = parent.recv()
    proc.join()
    return round(value, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/skmm-metaread")
    parser.add_argument("--out", default="bench/results/metadata_read.json")
    args = parser.parse_args()

    from storage.artifacts import ArtifactStore
    from storage.datasets import load_manifest
    from storage.ingest.folder import ingest_image_folder
    from tasks.finetune import _selected_images
    from tasks.select import train_split

    work = pathlib.Path(args.work)
    master, pool, store_path = work / "master", work / f"pool-{args.count}", str(work / f"store-{args.count}")
    start = time.perf_counter()
    scale_pool.make_master(master, args.count)
    scale_pool.make_pool(master, pool, 0, args.count)
    made = time.perf_counter() - start
    start = time.perf_counter()
    result = ingest_image_folder(ArtifactStore(store_path), pool)
    ingest_s = time.perf_counter() - start
    ds = result.dataset
    shards = load_manifest(ArtifactStore(store_path), ds).shards
    total = sum(s.artifact.size for s in shards)

    out: dict[str, Any] = {"count": args.count, "n": args.n, "repeats": args.repeats, "shards": len(shards),
                           "shard_bytes_total": total, "pool_make_s": round(made, 2), "ingest_s": round(ingest_s, 2)}
    # train split ids + labels
    runs: dict[str, list[tuple[float, int]]] = {"old": [], "new": []}
    results = {}
    for _ in range(args.repeats + 1):
        for name, fn in (("old", old_train_split), ("new", train_split)):
            wall, nbytes, results[name] = _timed(fn, store_path, ds)
            runs[name].append((wall, nbytes))
    same = (results["old"][0] == results["new"][0]).all() and results["old"][1].equals(results["new"][1])
    out["train_split"] = {
        "n_train": len(results["new"][0]), "identical": bool(same),
        **{f"{k}_s_median": round(statistics.median(w for w, _ in v[1:]), 4) for k, v in runs.items()},
        **{f"{k}_bytes_read": v[-1][1] for k, v in runs.items()}}

    # finetune: n chosen train samples + the val split
    train_ids = [s.decode() for s in results["new"][0]]
    chosen = random.Random(0).sample(train_ids, args.n)
    runs = {"old": [], "new": []}
    for _ in range(args.repeats + 1):
        for name, fn in (("old", old_selected_images), ("new", _selected_images)):
            wall, nbytes, results[name] = _timed(fn, store_path, ds, chosen)
            runs[name].append((wall, nbytes))
    out["finetune_images"] = {
        "n_chosen": args.n, "n_val": len(results["new"][2]), "identical": results["old"] == results["new"],
        "image_bytes_returned": _held(results["new"]),
        **{f"{k}_s_median": round(statistics.median(w for w, _ in v[1:]), 4) for k, v in runs.items()},
        **{f"{k}_bytes_read": v[-1][1] for k, v in runs.items()},
        **{f"{k}_peak_rss_mib": peak_rss_mib(k, store_path, ds.to_dict(), chosen) for k in ("baseline", "old", "new")}}
    del results
    print(json.dumps(out, indent=2))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
