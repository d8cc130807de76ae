"""The model end in bounded memory (issue 8): evaluate(test) streamed vs the whole-split code, fresh processes.

JPEG pools of ~56 KB images (bench/scale_pool.py; default 10 000 and 20 000 images, default splits 70/15/15,
2 048 rows a shard), ingested into a local store, with synthetic 512-d features (a ViT-B/32's width) for every
sample as the embeddings table. Two models per pool: a last-layers model of the tiny tower (``skmm-tiny-vit``,
k = 1, trained on 64 train images for one epoch) and a linear probe (trained on 500 train rows' features). Then a
features-only pool (default 300 000 rows, 512-d features in row groups of 65 536) for the probe at a larger N.
For each model, three fresh (spawned) processes, one torch thread each:

- ``baseline``: imports the stack and loads the model, nothing else;
- ``old``: ``run_evaluate`` as it was before issue 8 (a frozen copy below: the split's ids, labels and — for the
  last-layers model — every image's bytes read at once, then one predict over the whole split; the probe reads
  the split's whole N × d feature matrix);
- ``new``: ``tasks.evaluate.run_evaluate`` (streamed: 256 images, or 8 192 feature rows, at a time).

Each reports its wall time for the evaluate call and its peak RSS (VmHWM of /proc/self/status; ru_maxrss is
not used because it survives exec, so a spawned child would report its parent's peak). The old and new metric
dicts are checked equal.

    nice -n 10 .venv/bin/python bench/model_end.py [--counts 10000,20000] [--feature-rows 300000]
        [--work /tmp/skmm-modelend] [--seed-master /tmp/skmm-metaread/master] [--out bench/results/model_end.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import time
from typing import Any

import scale_pool  # bench/ is the script's folder, so it is on the path
from _proc import peak_rss_mib

DIM = 512


def old_run_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict, split: str = "test") -> dict:
    """tasks.evaluate.run_evaluate before issue 8's model-end fix (frozen copy)."""
    from skmm.finetune import LastLayersFinetuner, LinearProbe, evaluate_predictions, model_format
    from skmm.gradients import normalize_features
    from storage.artifacts import ArtifactRef
    from storage.datasets import DatasetRef, VectorTableRef, read_vectors
    from tasks.sketch import split_columns
    from tasks.store import open_store

    st = open_store(store)
    data = st.get_bytes(ArtifactRef.from_dict(model))
    ds = DatasetRef.from_dict(dataset)
    last_layers = model_format(data) == "skmm-last-layers/1"
    rows = split_columns(st, ds, split, ["sample_id", "label", *(["data"] if last_layers else [])])
    ids, labels = rows["sample_id"], rows["label"]
    if not ids:
        raise ValueError(f"the dataset has no {split} split to evaluate on")
    if last_layers:
        pred = LastLayersFinetuner.from_bytes(data).predict(rows["data"])
        return {**evaluate_predictions("classification", labels, pred), f"n_{split}": len(ids)}
    probe = LinearProbe.from_bytes(data)
    _, X = read_vectors(st, VectorTableRef.from_dict(embeddings), sample_ids=ids)
    metrics = evaluate_predictions(probe.task, labels, probe.predict(normalize_features(X)))
    return {**metrics, f"n_{split}": len(ids)}


def _child(which: str, model: dict, emb: dict, dataset: dict, store: dict, conn: Any) -> None:
    import torch

    torch.set_num_threads(1)  # the shared 2-core machine: one thread, the same for every path
    from skmm.finetune import LastLayersFinetuner, LinearProbe, model_format
    from storage.artifacts import ArtifactRef
    from tasks.evaluate import run_evaluate
    from tasks.store import open_store

    out: dict[str, Any] = {}
    if which == "baseline":
        data = open_store(store).get_bytes(ArtifactRef.from_dict(model))
        (LastLayersFinetuner if model_format(data) == "skmm-last-layers/1" else LinearProbe).from_bytes(data)
    else:
        fn = old_run_evaluate if which == "old" else run_evaluate
        start = time.perf_counter()
        out["metrics"] = fn(model, emb, dataset, store)
        out["wall_s"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    conn.send(out)
    conn.close()


def in_child(which: str, model: dict, emb: dict, dataset: dict, store: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(which, model, emb, dataset, store, child))
    proc.start()
    child.close()
    out = parent.recv()
    proc.join()
    return out


def _seed_master(master: pathlib.Path, seed: pathlib.Path | None, count: int) -> int:
    """Hard-link the images another bench already made (the same pure function of the index) into ``master``."""
    if seed is None or not seed.is_dir():
        return 0
    linked = 0
    for i in range(count):
        src, dst = scale_pool._path(seed, i), scale_pool._path(master, i)
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
            linked += 1
    return linked


def _runs(models: dict, emb: dict, dataset: dict, store: dict) -> dict:
    """baseline / old / new children for each model; old and new metrics checked equal."""
    out = {}
    for kind, model in models.items():
        runs = {which: in_child(which, model, emb, dataset, store) for which in ("baseline", "old", "new")}
        out[kind] = {
            "identical_metrics": runs["old"]["metrics"] == runs["new"]["metrics"],
            "metrics": runs["new"]["metrics"],
            **{f"{w}_peak_rss_mib": r["peak_rss_mib"] for w, r in runs.items()},
            **{f"{w}_wall_s": r["wall_s"] for w, r in runs.items() if w != "baseline"},
            **{f"{w}_over_baseline_mib": round(r["peak_rss_mib"] - runs["baseline"]["peak_rss_mib"], 1)
               for w, r in runs.items() if w != "baseline"}}
        print(kind, json.dumps(out[kind]), flush=True)
    return out


def image_pool(work: pathlib.Path, count: int, seed_master: pathlib.Path | None) -> dict:
    """The JPEG pool of ``count`` images, its features, the two models, and their old / new / baseline runs."""
    import numpy as np
    import pyarrow as pa

    from skmm.finetune import LastLayersFinetuner, LinearProbe
    from skmm.gradients import normalize_features
    from skmm.models import TINY_MODEL, ClipSpec
    from storage.artifacts import ArtifactStore
    from storage.datasets import load_manifest, write_vectors
    from storage.ingest.folder import ingest_image_folder
    from storage.sample_reader import iter_metadata, read_images

    master, pool, store_path = work / "master", work / f"pool-{count}", str(work / f"store-{count}")
    start = time.perf_counter()
    linked = _seed_master(master, seed_master, count)
    scale_pool.make_master(master, count)
    scale_pool.make_pool(master, pool, 0, count)
    made = time.perf_counter() - start
    start = time.perf_counter()
    st = ArtifactStore(store_path)
    ds = ingest_image_folder(st, pool).dataset
    ingest_s = time.perf_counter() - start
    shards = load_manifest(st, ds).shards
    meta = pa.concat_tables(list(iter_metadata(st, ds)))
    ids = meta.column("sample_id").to_pylist()
    splits = meta.column("split").to_pylist()
    labels = meta.column("label").to_pylist()
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    test_ids = [i for i, s in zip(ids, splits, strict=True) if s == "test"]
    test_bytes = int(sum(len(b) for b in read_images(st, ds, test_ids).column("data").to_pylist()))

    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    emb = write_vectors(st, ids, features, {"model": "synthetic", "dim": DIM})
    train = [i for i, s in enumerate(splits) if s == "train"]
    lp = LinearProbe().fit(normalize_features(features[train[:500]]), [labels[i] for i in train[:500]])
    del features
    ft_images = read_images(st, ds, [ids[i] for i in train[:64]])
    label_of = {ids[i]: labels[i] for i in train[:64]}
    ft = LastLayersFinetuner(ClipSpec(TINY_MODEL), k=1, epochs=1, batch_size=32, device="cpu").fit(
        ft_images.column("data").to_pylist(), [label_of[s] for s in ft_images.column("sample_id").to_pylist()],
        classes=sorted(set(labels)))
    models = {"last_layers": st.put_bytes(ft.state_bytes(), "model", ".safetensors").to_dict(),
              "linear_probe": st.put_bytes(lp.to_bytes(), "model", ".safetensors").to_dict()}
    return {"count": count, "splits": counts, "shards": len(shards),
            "shard_bytes_total": sum(s.artifact.size for s in shards), "test_image_bytes": test_bytes,
            "pool_make_s": round(made, 1), "linked_from_seed_master": linked, "ingest_s": round(ingest_s, 1),
            **_runs(models, emb.to_dict(), ds.to_dict(), {"url": store_path})}


def feature_pool(work: pathlib.Path, rows: int) -> dict:
    """A features-only pool for the probe at a larger N: ``rows`` samples of 32 random bytes (the probe never
    reads them), splits 5/7 train, 1/7 val, 1/7 test, 3 labels, 512-d features written in row groups of 65 536."""
    import numpy as np

    from skmm.finetune import LinearProbe
    from skmm.gradients import normalize_features
    from storage.artifacts import ArtifactStore
    from storage.datasets import sample_id, write_samples, write_vector_chunks

    store_path = str(work / f"features-{rows}")
    st = ArtifactStore(store_path)
    start = time.perf_counter()
    records = [{"data": i.to_bytes(8, "little") * 4, "source_uri": f"synthetic://{i}", "label": "abc"[i % 3],
                "split": {0: "val", 1: "test"}.get(i % 7, "train")} for i in range(rows)]
    ds = write_samples(st, records)
    keyed = sorted((sample_id(r["data"]), r["label"]) for r in records)
    del records
    rng = np.random.default_rng(1)
    ids = np.array([k for k, _ in keyed], dtype="S64")
    emb = write_vector_chunks(st, ((ids[lo:lo + 65_536], rng.normal(size=(len(ids[lo:lo + 65_536]), DIM)))
                                   for lo in range(0, rows, 65_536)), {"model": "synthetic", "dim": DIM})
    made = time.perf_counter() - start
    probe = LinearProbe().fit(normalize_features(rng.normal(size=(500, DIM))), [k[1] for k in keyed[:500]])
    model = st.put_bytes(probe.to_bytes(), "model", ".safetensors").to_dict()
    n_test = sum(1 for i in range(rows) if i % 7 == 1)
    return {"rows": rows, "n_test": n_test, "test_features_mib": round(n_test * DIM * 4 / 2**20, 1),
            "make_s": round(made, 1), **_runs({"linear_probe": model}, emb.to_dict(), ds.to_dict(),
                                               {"url": store_path})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10000,20000", help="JPEG pool sizes, comma-separated")
    parser.add_argument("--feature-rows", type=int, default=300_000, help="rows of the features-only pool (0: none)")
    parser.add_argument("--work", default="/tmp/skmm-modelend")
    parser.add_argument("--seed-master", type=pathlib.Path, default=pathlib.Path("/tmp/skmm-metaread/master"))
    parser.add_argument("--out", default="bench/results/model_end.json")
    args = parser.parse_args()

    work = pathlib.Path(args.work)
    out: dict[str, Any] = {"dim": DIM, "python": platform.python_version(), "cpus": os.cpu_count(),
                           "torch_threads": 1, "image_pools": []}
    for count in (int(c) for c in args.counts.split(",")):
        out["image_pools"].append(image_pool(work, count, args.seed_master))
    if args.feature_rows:
        out["feature_pool"] = feature_pool(work, args.feature_rows)
    print(json.dumps(out, indent=2))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
