"""The pipeline at real pool sizes: streaming ingest, the cache hit on an unchanged pool, incremental embedding,
and Dask scale-out, on synthetic ~54 KB JPEG pools (bench/scale_pool.py) in 3 class folders.

For each pool size N (default 10 000, 50 000, 200 000), every measurement runs in a fresh child process, whose
peak RSS (ru_maxrss, from wait4) is recorded with its wall time:

- ``ingest``: the real ``ingest`` Prefect task inside a flow (local store, its own temporary Prefect server),
  timed around the task call; the child's RSS just before the call is recorded too (Prefect's own share);
- ``cache_hit``: the same flow again on the unchanged pool: the task is Cached; timed the same way;
- at the pipeline sizes (default 10 000 and 50 000): ``embed`` (tiny tower, shard by shard, no Prefect), the LP
  ``sketch`` (m = 64) and ``select`` (SkMM, n = min(1 000, N/50)), each in its own child;
- ``growth``: the pool grown by 1 % (new files in the same folders), ingested again, then embedded: how many
  samples went through the tower, how many were reused from the feature catalog;
- ``dask``: at the first pipeline size, the embed stage as a Prefect flow on a local Dask cluster of 1 worker,
  then 2 workers (one thread each; fresh stores, so nothing is cached or reused): the throughput ratio; and the
  same shards on plain Dask tasks without Prefect (``plain_*``), the ratio the machine allows.

    .venv/bin/python bench/scale.py [--sizes 10000,50000,200000] [--pipeline-sizes 10000,50000]
                                    [--work /tmp/skmm-scale] [--out bench/results/scale.json]

The master pool (the largest size + 1 %) is generated once under --work and reused; pools are hard links to it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import scale_pool  # bench/ is the script's folder, so it is on the path

MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}


# ---------------------------------------------------------------------------------------------- child processes
def _child_main(conn: Any, fn: Callable[..., dict], args: tuple) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report, then let the parent raise
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def in_child(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` in a fresh process; its result plus wall seconds and peak RSS (MiB) of that process."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child_main, args=(child, fn, args))
    proc.start()
    child.close()
    status, value = parent.recv()
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its child process: {value}")
    return {**value, "process_wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _rss_now_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- measured steps
def ingest_with_prefect(pool: str, store: str, prefect_home: str) -> dict:
    """The ``ingest`` task inside a flow; timed around the task call (not the temporary server's start)."""
    os.environ["PREFECT_HOME"] = prefect_home
    from prefect import flow

    from tasks.ingest import ingest
    from tasks.store import result_storage, store_spec

    @flow(name="bench-ingest")
    def bench_ingest() -> dict:
        spec = store_spec(store)
        rss_before = _rss_now_mib()
        start = time.perf_counter()
        state = ingest.with_options(result_storage=result_storage(spec))(
            {"kind": "folder", "path": pool}, spec, return_state=True)
        wall = time.perf_counter() - start
        result = state.result()
        return {"task_s": round(wall, 2), "state": state.name, "n_samples": result["n_samples"],
                "dataset": result["dataset"], "rss_before_task_mib": round(rss_before, 1)}

    return bench_ingest()


def embed_plain(dataset: dict, store: str) -> dict:
    """Every shard through ``run_embed_shard`` (no Prefect), counting what went through the tower."""
    from tasks.embed import _release_catalogs, run_combine, run_embed_shard, shards_of
    from tasks.store import store_spec

    spec = store_spec(store)
    start = time.perf_counter()
    run = "bench"
    try:
        parts = [run_embed_shard(sh, MODEL, spec, catalog_run=run) for sh in shards_of(dataset, spec)]
    finally:
        _release_catalogs(run)
    combined = run_combine(parts, spec)
    return {"stage_s": round(time.perf_counter() - start, 2), "embeddings": combined,
            "embedded": sum(p["embedded"] for p in parts), "reused": sum(p["reused"] for p in parts)}


def sketch_plain(embeddings: dict, dataset: dict, store: str) -> dict:
    from tasks.sketch import run_sketch
    from tasks.store import store_spec

    start = time.perf_counter()
    sk = run_sketch(embeddings, dataset, store_spec(store), sketch_dim=64, seed=0)
    return {"stage_s": round(time.perf_counter() - start, 2), "sketch": sk}


def select_plain(sketch: dict, dataset: dict, store: str, budget: int) -> dict:
    from tasks.select import run_select
    from tasks.store import store_spec

    start = time.perf_counter()
    run_select(sketch, dataset, store_spec(store), "skmm", budget, 0)
    return {"stage_s": round(time.perf_counter() - start, 2), "n": budget}


def _warm_worker() -> None:
    """What a worker's first task would otherwise pay for once: the imports of the task's modules and Prefect's
    task engine, and the tower."""
    import prefect.task_engine  # noqa: F401

    import tasks.embed  # noqa: F401
    from skmm.models.clip import ClipSpec, load_clip

    load_clip(ClipSpec(MODEL["name"], init_seed=MODEL["init_seed"]), "cpu")


def embed_on_dask(dataset: dict, store: str, workers: int, prefect_home: str) -> dict:
    """The embed stage as a Prefect flow on the pipeline's own local Dask cluster (``dask_task_runner(workers=…)``,
    started inside the flow run, so its workers report to the flow's temporary server), one thread each: one
    torch thread and no decode worker process per Dask worker (set in the environment, which the runner passes on;
    a worker that forked decoders would use a second core, and 1 worker would not be one thread). The cluster is
    started and its workers build the tower before the clock starts."""
    os.environ.update(PREFECT_HOME=prefect_home, SKMM_DECODE_WORKERS="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    from prefect import flow
    from prefect.context import FlowRunContext

    from flows.runners import dask_task_runner
    from tasks.embed import embed_with_counts
    from tasks.store import result_storage, store_spec

    spec = store_spec(store)

    @flow(name="bench-embed-dask", task_runner=dask_task_runner(workers=workers))
    def bench_embed() -> dict:
        client = FlowRunContext.get().task_runner.client  # starts the cluster
        client.wait_for_workers(workers, timeout=300)
        client.run(_warm_worker)  # workers import open_clip and build the tower before the clock starts
        start = time.perf_counter()
        _, counts = embed_with_counts(dataset, MODEL, spec, {"result_storage": result_storage(spec)})
        return {"stage_s": round(time.perf_counter() - start, 2), **counts}

    return bench_embed()


def embed_on_plain_dask(dataset: dict, store: str, workers: int) -> dict:
    """The same shards' embedding (``run_embed_shard``, one Dask task each) on a local cluster of ``workers``
    processes, one thread each, **without Prefect**: the machine's own ceiling for the ratio, with no flow process
    or Prefect server sharing its cores."""
    env = {"SKMM_DECODE_WORKERS": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(env)
    from distributed import Client, LocalCluster

    from flows.runners import HTTP_ADDRESS, LOOPBACK
    from storage.datasets import DatasetRef, load_manifest
    from tasks.embed import run_embed_shard
    from tasks.store import open_store, store_spec

    spec = store_spec(store)
    shards = [sh.to_dict() for sh in load_manifest(open_store(spec), DatasetRef.from_dict(dataset)).shards]
    with LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None, env=env,
                      host=LOOPBACK, scheduler_kwargs={"dashboard_address": HTTP_ADDRESS}) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers, timeout=300)
        client.run(_warm_worker)
        start = time.perf_counter()
        done = client.gather([client.submit(run_embed_shard, sh, MODEL, spec, pure=False) for sh in shards])
        return {"stage_s": round(time.perf_counter() - start, 2), "samples_embedded": sum(d["embedded"] for d in done)}


# ---------------------------------------------------------------------------------------------- driver
def run_size(n: int, args: argparse.Namespace, pipeline: bool, dask: bool) -> dict:
    work = args.work
    pool = scale_pool.make_pool(args.master, work / f"pool-{n}", 0, n)
    store = work / f"store-{n}"
    home = tempfile.mkdtemp(prefix="skmm-bench-prefect-")
    shutil.rmtree(store, ignore_errors=True)
    out: dict[str, Any] = {"N": n, "image_bytes": sum(p.stat().st_size for p in pool.rglob("*.jpg"))}
    if not args.dask_only:
        measure_pool(n, args, pool, store, home, out, pipeline)
    if dask:
        out["dask"] = {}
        for workers in (1, 2):
            dstore = work / f"store-{n}-dask{workers}"
            shutil.rmtree(dstore, ignore_errors=True)
            ing = in_child(ingest_with_prefect_shards, str(pool), str(dstore), home)
            out["dask"][f"workers_{workers}"] = in_child(embed_on_dask, ing["dataset"], str(dstore), workers, home)
            print(f"[N={n}] dask {workers}: {out['dask'][f'workers_{workers}']}", flush=True)
        one, two = (out["dask"][f"workers_{w}"]["stage_s"] for w in (1, 2))
        out["dask"]["throughput_ratio_2_vs_1"] = round(one / two, 3)
        for workers in (1, 2):  # the same without Prefect: what the machine allows
            dstore = work / f"store-{n}-plain{workers}"
            shutil.rmtree(dstore, ignore_errors=True)
            ing = in_child(ingest_with_prefect_shards, str(pool), str(dstore), home)
            plain = in_child(embed_on_plain_dask, ing["dataset"], str(dstore), workers)
            out["dask"][f"plain_workers_{workers}"] = plain
            print(f"[N={n}] plain dask {workers}: {plain}", flush=True)
        one, two = (out["dask"][f"plain_workers_{w}"]["stage_s"] for w in (1, 2))
        out["dask"]["plain_throughput_ratio_2_vs_1"] = round(one / two, 3)
    shutil.rmtree(home, ignore_errors=True)
    return out


def measure_pool(n: int, args: argparse.Namespace, pool: pathlib.Path, store: pathlib.Path, home: str,
                 out: dict[str, Any], pipeline: bool) -> None:
    """Ingest, cache hit, and (``pipeline``) embed → sketch → select and 1 % growth, into ``out``."""
    out["ingest"] = in_child(ingest_with_prefect, str(pool), str(store), home)
    out["ingest"]["s_per_image_ms"] = round(1000 * out["ingest"]["task_s"] / n, 3)
    dataset = out["ingest"].pop("dataset")
    print(f"[N={n}] {out['ingest']}", flush=True)
    out["cache_hit"] = in_child(ingest_with_prefect, str(pool), str(store), home)
    out["cache_hit"]["share_of_first_ingest"] = round(out["cache_hit"]["task_s"] / out["ingest"]["task_s"], 4)
    out["cache_hit"].pop("dataset")
    print(f"[N={n}] cache hit {out['cache_hit']}", flush=True)
    if pipeline:
        emb = in_child(embed_plain, dataset, str(store))
        out["embed"] = {k: v for k, v in emb.items() if k != "embeddings"}
        print(f"[N={n}] embed {out['embed']}", flush=True)
        sk = in_child(sketch_plain, emb["embeddings"], dataset, str(store))
        out["sketch"] = {k: v for k, v in sk.items() if k != "sketch"}
        out["select"] = in_child(select_plain, sk["sketch"], dataset, str(store), min(1000, n // 50))
        print(f"[N={n}] sketch {out['sketch']} select {out['select']}", flush=True)
        grown = n // 100
        scale_pool.make_pool(args.master, pool, n, grown)  # 1 % new files in the same class folders
        again = in_child(ingest_with_prefect, str(pool), str(store), home)
        emb2 = in_child(embed_plain, again.pop("dataset"), str(store))
        out["growth"] = {"added": grown, "ingest": again,
                         "embed": {k: v for k, v in emb2.items() if k != "embeddings"},
                         "embedded_share_of_pool": round(emb2["embedded"] / (n + grown), 4)}
        print(f"[N={n}] growth {out['growth']}", flush=True)
        for i in range(n, n + grown):  # back to N files for the next runs
            scale_pool._path(pool, i).unlink()


def ingest_with_prefect_shards(pool: str, store: str, prefect_home: str) -> dict:
    """Plain ingest with 1 000-row shards (enough shards to spread over the Dask workers)."""
    os.environ["PREFECT_HOME"] = prefect_home
    from tasks.ingest import run_ingest
    from tasks.store import store_spec

    result = run_ingest({"kind": "folder", "path": pool, "shard_rows": 1000}, store_spec(store))
    return {"dataset": result["dataset"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--pipeline-sizes", default="10000,50000")
    parser.add_argument("--dask-size", type=int, default=10000)
    parser.add_argument("--dask-only", action="store_true", help="only the Dask comparison (at --dask-size)")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "skmm-scale")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "scale.json")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    pipeline = {int(x) for x in args.pipeline_sizes.split(",") if x}
    args.master = args.work / "master"
    scale_pool.make_master(args.master, max(sizes) + max(sizes) // 100)
    results = []
    for n in sizes:
        results.append(run_size(n, args, n in pipeline, n == args.dask_size))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "scale", "cores": os.cpu_count(), "sizes": results}, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
