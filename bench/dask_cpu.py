"""The embed stage on the CPU: Prefect's default thread runner against local Dask clusters, on one pool.

The same flow (``tasks.embed.embed_with_counts``) runs the same shards of one pool of ~54 KB JPEGs
(bench/scale_pool.py), each arrangement in a fresh child process with a fresh store (nothing cached or reused),
the tower built before the clock starts. Recorded: the stage's seconds, the flow process's peak RSS and each Dask
worker's, the memory of the processes each of them started (``children_memory``: block and decode workers, peak
RSS and unique memory; one list per flow process or Dask worker), and the CPU seconds each thread of the flow
process (``threads``) or of each Dask worker spent in the stage (``cpu_by_thread``: the busiest threads by name;
the block worker processes not included):

- ``threads``: Prefect's thread pool, the pipeline's default (two shard tasks in flight, one block worker per
  core, shared by both);
- ``dask_<w>x1``: a local cluster of as many one-thread workers as cores (``dask_task_runner(workers=cores)``),
  each decoding and encoding its shard in its own process;
- ``dask_1x<c>``: one worker with all the cores (``dask_task_runner(workers=1)``): one block worker process per
  core, as in one process (the pipeline's local clusters' workers may fork; Dask's own are daemonic and may not).

Every arrangement keeps the runner's own defaults for threads and workers (``flows.runners.worker_env``). The
features of each are checked bitwise against the first.

    .venv/bin/python bench/dask_cpu.py [--model skmm-tiny-vit] [--n 10000] [--shard-rows 1000]
                                      [--arrangements threads,dask_2x1,dask_1x2] [--repeats 1]
→ bench/out/dask_cpu_<model>.json (or $SKMM_BENCH_OUT).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import tempfile
import time

import numpy as np
import scale_pool  # bench/ is the script's folder, so it is on the path
from _common import record
from _proc import peak_rss_mib
from scale import in_child


def _ingest(pool: str, store: str, shard_rows: int) -> dict:
    from tasks.ingest import run_ingest
    from tasks.store import store_spec

    return {"dataset": run_ingest({"kind": "folder", "path": pool, "shard_rows": shard_rows},
                                  store_spec(store))["dataset"]}


def _warm(model: dict) -> None:
    """What a worker's first task would otherwise pay for once: the task modules' imports and the tower."""
    import prefect.task_engine  # noqa: F401

    import tasks.embed  # noqa: F401
    from skmm.models.clip import ClipSpec, load_clip

    load_clip(ClipSpec(model["name"], init_seed=model["init_seed"]), "cpu")


def _peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _children_memory() -> list[dict]:
    """The live processes this one started, at any depth (the block and decode workers, which outlive the stage in
    a process-wide pool; Prefect's temporary server): each one's peak RSS (the kernel's ``VmHWM``, which counts the
    pages a forked worker still shares with its parent, and the shared libraries') and its unique memory now (USS),
    in MiB, and its command (a forked worker's is its parent's)."""
    import psutil  # distributed's dependency

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            peak = peak_rss_mib(child.pid)
            uss = child.memory_full_info().uss
            command = " ".join(child.cmdline())
        except (OSError, psutil.Error):  # it ended while being read
            continue
        out.append({"peak_rss_mib": round(peak, 1), "uss_mib": round(uss / 2**20, 1), "command": command[:100]})
    return sorted(out, key=lambda c: c["peak_rss_mib"])


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """This process's threads: native id -> (name, CPU seconds so far). Python threads by their ``threading``
    name, the others (OpenMP's, torch's, C libraries') by the kernel's ``comm``."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while being read
            continue
        tid = int(task.name)
        out[tid] = (names.get(tid, comm), (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def cpu_by_thread(before: dict, after: dict, top: int = 8) -> dict:
    """CPU seconds each thread spent between two :func:`_thread_cpu` snapshots (threads born in between count
    from zero), the busiest ``top`` by name, and the process's total."""
    spent = sorted(((after[t][1] - before.get(t, ("", 0.0))[1], after[t][0], t) for t in after), reverse=True)
    return {"total_s": round(sum(s for s, _, _ in spent), 2), "threads": len(spent),
            "busiest": [{"name": n, "tid": t, "cpu_s": round(s, 2)} for s, n, t in spent[:top]]}


def _features(store: str, embeddings: dict) -> np.ndarray:
    from storage.datasets import VectorTableRef, read_vectors
    from tasks.store import open_store, store_spec

    return read_vectors(open_store(store_spec(store)), VectorTableRef.from_dict(embeddings))[1]


def embed_flow(arrangement: str, dataset: dict, store: str, model: dict, prefect_home: str) -> dict:
    """The embed stage as a Prefect flow on ``arrangement``'s task runner; seconds from the warm tower to the
    combined features, and the features' sha256 (compared across arrangements)."""
    os.environ["PREFECT_HOME"] = prefect_home
    import hashlib

    from prefect import flow
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runners import dask_task_runner
    from tasks.embed import embed_with_counts
    from tasks.store import result_storage, store_spec

    spec = store_spec(store)
    workers = None if arrangement == "threads" else int(arrangement.split("_")[1].split("x")[0])
    runner = ThreadPoolTaskRunner() if workers is None else dask_task_runner(workers=workers)

    @flow(name=f"bench-embed-{arrangement}", task_runner=runner)
    def bench_embed() -> dict:
        if workers is None:
            _warm(model)
        else:
            client = FlowRunContext.get().task_runner.client  # starts the cluster
            client.wait_for_workers(workers, timeout=300)
            client.run(_warm, model)
        cpu_before = client.run(_thread_cpu) if workers else {"flow": _thread_cpu()}
        start = time.perf_counter()
        embeddings, counts = embed_with_counts(dataset, model, spec, {"result_storage": result_storage(spec)})
        seconds = time.perf_counter() - start
        cpu_after = client.run(_thread_cpu) if workers else {"flow": _thread_cpu()}
        workers_rss = (sorted(client.run(_peak_rss_mib).values()) if workers else [])
        children = client.run(_children_memory) if workers else {"flow": _children_memory()}
        cpu = [cpu_by_thread(cpu_before[w], cpu_after[w]) for w in sorted(cpu_after)]
        return {"stage_s": round(seconds, 2), "embeddings": embeddings, "worker_peak_rss_mib": workers_rss,
                "children_memory": [children[w] for w in sorted(children)], "cpu_by_thread": cpu, **counts}

    out = bench_embed()
    out["features_sha256"] = hashlib.sha256(np.ascontiguousarray(_features(store, out["embeddings"]))).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="skmm-tiny-vit")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--arrangements", default=None,
                        help="comma-separated; default threads,dask_<cores>x1,dask_1x<cores>")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all arrangements, alternating")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "skmm-dask-cpu")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    arrangements = (args.arrangements or f"threads,dask_{cores}x1,dask_1x{cores}").split(",")
    model = {"name": args.model, "pretrained": None, "init_seed": 0}

    master = args.work / "master"
    scale_pool.make_master(master, args.n)
    pool = scale_pool.make_pool(master, args.work / f"pool-{args.n}", 0, args.n)
    home = tempfile.mkdtemp(prefix="skmm-bench-prefect-")
    seconds: dict[str, list[float]] = {a: [] for a in arrangements}
    digests: dict[str, set[str]] = {a: set() for a in arrangements}
    runs = []
    try:
        for repeat in range(args.repeats):
            for arrangement in arrangements:
                store = args.work / f"store-{arrangement}"
                shutil.rmtree(store, ignore_errors=True)
                dataset = in_child(_ingest, str(pool), str(store), args.shard_rows)["dataset"]
                result = in_child(embed_flow, arrangement, dataset, str(store), model, home)
                seconds[arrangement].append(result["stage_s"])
                digests[arrangement].add(result["features_sha256"])
                runs.append({"repeat": repeat, "arrangement": arrangement, "stage_s": result["stage_s"],
                             "peak_rss_mib": result["peak_rss_mib"], "samples_embedded": result["samples_embedded"],
                             "worker_peak_rss_mib": result["worker_peak_rss_mib"],
                             "children_memory": result["children_memory"],
                             "cpu_by_thread": result["cpu_by_thread"]})
                print(runs[-1], flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    base = statistics.median(seconds[arrangements[0]])
    summary = {a: {"median_s": statistics.median(s), "images_per_s": round(args.n / statistics.median(s), 1),
                   "throughput_vs_" + arrangements[0]: round(base / statistics.median(s), 3)}
               for a, s in seconds.items()}
    shas = sorted(set().union(*digests.values()))
    same = len(shas) == 1
    result = {"model": model, "n": args.n, "shard_rows": args.shard_rows, "cores": cores, "runs": runs,
              "summary": summary, "features_bitwise_equal": same, "features_sha256": shas}
    print(record(f"dask_cpu_{args.model}", result))
    for a, s in summary.items():
        print(f"{a:>12}: {s}")
    if not same:
        raise SystemExit(f"features differ between arrangements: {digests}")


if __name__ == "__main__":
    main()
