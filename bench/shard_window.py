"""The embed stage with a window of shard tasks in flight against every shard at once (Prefect's unbounded
thread pool, the behaviour before tasks/shard_window.py): wall time, concurrent embed calls, live worker processes
and the process tree's memory.

A pool of ``--n`` distinct ~56 KB JPEGs (bench/scale_pool.py) in ``--shard-rows`` shards is written to a fresh
local store for every run, then embedded by ``tasks.embed.embed_with_counts`` inside a Prefect flow (the temporary
server started before the timings), once with ``$SKMM_SHARD_TASKS`` unset (the default window, 2) and once with it
set to the shard count (all shards at once, as before), alternating over ``--repeats``. A sampler thread reads,
every 50 ms, how many worker processes this process has (the temporary server left out) and the tree's
proportional set size (PSS, from /proc/<pid>/smaps_rollup: shared pages split among the processes that map them).
The features of both arms are asserted bitwise equal.

    .venv/bin/python bench/shard_window.py [--n 2048] [--shard-rows 128] [--model ViT-S-32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="skmm-bench-prefect-"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np
from _common import record, tree_pids
from scale_pool import image_bytes

import skmm.models.clip as clip
import tasks.embed as embed_module
from storage.datasets import VectorTableRef, read_vectors, write_samples
from tasks.shard_window import SHARD_TASKS_ENV
from tasks.store import open_store, result_storage, store_spec


def pss_kib(pid: int) -> int:
    try:
        for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def is_prefect_server(pid: int) -> bool:
    try:
        return b"prefect.server" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Sampler(threading.Thread):
    """Peak child-process count and peak tree PSS while running, leaving out the temporary Prefect server."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop, self.peak_children, self.peak_pss_mib = threading.Event(), 0, 0.0
        self.server = {p for p in tree_pids(os.getpid()) if is_prefect_server(p)}

    def run(self) -> None:
        while not self.stop.is_set():
            pids = [p for p in tree_pids(os.getpid()) if p not in self.server]
            self.peak_children = max(self.peak_children, len(pids) - 1)
            self.peak_pss_mib = max(self.peak_pss_mib, sum(map(pss_kib, pids)) / 1024)
            time.sleep(0.05)


class Calls:
    """Peak number of concurrent embed_images calls (the real function runs)."""

    def __init__(self) -> None:
        self.lock, self.now, self.peak = threading.Lock(), 0, 0

    def wrap(self, fn):
        def counted(*args, **kwargs):
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1
        return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--shard-rows", type=int, default=128)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--windows", default="default,all",
                        help="comma-separated arms: 'default' ($SKMM_SHARD_TASKS unset), 'all' (the shard count) "
                             "or a number")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    args = parser.parse_args()

    from prefect import flow

    model = {"name": args.model, "pretrained": None, "init_seed": 0}
    records = [{"data": image_bytes(i), "label": str(i % 10), "source_uri": f"mem://pool/{i}.jpg"}
               for i in range(args.n)]
    shards = -(-args.n // args.shard_rows)
    calls = Calls()
    embed_module.embed_images = calls.wrap(embed_module.embed_images)

    @flow(name="bench-shard-window")
    def embed_flow(dataset: dict, store: dict) -> tuple[dict, dict]:
        return embed_module.embed_with_counts(dataset, model, store, {"result_storage": result_storage(store)})

    def run(window: str | None, root: str) -> tuple[float, dict, np.ndarray]:
        if window is None:
            os.environ.pop(SHARD_TASKS_ENV, None)
        else:
            os.environ[SHARD_TASKS_ENV] = window
        store = store_spec(tempfile.mkdtemp(dir=root))
        dataset = write_samples(open_store(store), records, shard_rows=args.shard_rows)
        calls.peak = 0
        getattr(clip, "shutdown_worker_pools", lambda: None)()  # every run starts its workers (none lingers)
        sampler = Sampler()
        sampler.start()
        start = time.perf_counter()
        combined, counts = embed_flow(dataset.to_dict(), store)
        seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        _, rows = read_vectors(open_store(store), VectorTableRef.from_dict(combined))
        assert counts["samples_embedded"] == args.n, counts
        return seconds, {"concurrent_embed_calls": calls.peak, "peak_worker_processes": sampler.peak_children,
                         "peak_tree_pss_mib": round(sampler.peak_pss_mib, 1)}, rows

    names = {"default": "window_default", "all": "all_at_once"}
    arms = {names.get(w, f"window_{w}"): (None if w == "default" else str(shards) if w == "all" else str(int(w)))
            for w in args.windows.split(",")}
    results: dict[str, dict] = {name: {"seconds": [], "runs": []} for name in arms}
    features: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="skmm-bench-window-") as root:
        run(None, root)  # warm-up: the temporary Prefect server, the model cache
        for _ in range(args.repeats):
            for name, window in arms.items():
                seconds, stats, rows = run(window, root)
                results[name]["seconds"].append(round(seconds, 2))
                results[name]["runs"].append(stats)
                features[name] = rows
    first = next(iter(features.values()))
    equal = all(np.array_equal(first, rows) for rows in features.values())
    summary = {name: {"median_seconds": statistics.median(r["seconds"]),
                      "concurrent_embed_calls": max(s["concurrent_embed_calls"] for s in r["runs"]),
                      "peak_worker_processes": max(s["peak_worker_processes"] for s in r["runs"]),
                      "peak_tree_pss_mib": max(s["peak_tree_pss_mib"] for s in r["runs"])}
               for name, r in results.items()}
    ratio = ({"ratio_seconds_all_at_once_over_window": round(summary["all_at_once"]["median_seconds"]
                                                             / summary["window_default"]["median_seconds"], 3)}
             if {"all_at_once", "window_default"} <= summary.keys() else {})
    record("shard_window" + args.tag, {
        "model": args.model, "n_images": args.n, "shard_rows": args.shard_rows, "shards": shards,
        "cores": os.cpu_count(), "repeats": args.repeats, "load_average": list(os.getloadavg()), "arms": results,
        "summary": summary, "features_bitwise_equal": equal, **ratio})
    assert equal, "the window changed the features"


if __name__ == "__main__":
    main()
