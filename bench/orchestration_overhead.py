"""Prefect orchestration overhead: the curate stages called as plain functions, against the same stages as a
Prefect flow (cold, computing everything) and as a fully cached rerun of that flow.

Tiny open_clip tower on the bundled digits, budgets 50 and 100, methods skmm and uniform, one seed; the
temporary Prefect server is started before timing. The flow also writes lineage events, which the plain
functions do not: that is part of the overhead measured. Run:
    .venv/bin/python bench/orchestration_overhead.py [--model skmm-tiny-vit] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time

from _common import record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="skmm-bench-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def plain(store: dict, model: dict, budgets: list[int], methods: list[str]) -> None:
    from tasks.embed import run_embed
    from tasks.evaluate import run_evaluate
    from tasks.finetune import run_linear_probe
    from tasks.ingest import run_ingest
    from tasks.report import report
    from tasks.select import run_select
    from tasks.sketch import run_sketch

    ing = run_ingest({"kind": "digits"}, store)
    emb = run_embed(ing["dataset"], model, store)
    sk = run_sketch(emb, ing["dataset"], store, sketch_dim=64, seed=0)
    results = []
    for method, n in itertools.product(methods, budgets):
        sel = run_select(sk, ing["dataset"], store, method, n, 0)
        fit = run_linear_probe(emb, ing["dataset"], sel["selection"], store)
        results.append({"method": method, "n": n, "seed": 0, **run_evaluate(fit["model"], emb, ing["dataset"],
                                                                           store)})
    report.fn(results, store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="skmm-tiny-vit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from prefect import flow

    from flows.curate import ModelConfig, curate
    from tasks.store import store_spec

    budgets, methods = [50, 100], ["skmm", "uniform"]
    model = ModelConfig(name=args.model)

    @flow
    def warm_up() -> int:
        return 1

    warm_up()  # start the temporary server outside the timings
    times: dict[str, list[float]] = {"plain": [], "flow_cold": [], "flow_cached": []}
    for _ in range(args.repeats):
        store_a, store_b = tempfile.mkdtemp(), tempfile.mkdtemp()
        start = time.perf_counter()
        plain(store_spec(store_a), model.model_dump(), budgets, methods)
        times["plain"].append(time.perf_counter() - start)
        kwargs = {"budgets": budgets, "methods": methods, "seeds": [0], "model": model, "store_url": store_b}
        start = time.perf_counter()
        curate(**kwargs)
        times["flow_cold"].append(time.perf_counter() - start)
        start = time.perf_counter()
        curate(**kwargs)
        times["flow_cached"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    record("orchestration_overhead", {
        "model": args.model, "budgets": budgets, "methods": methods, "repeats": args.repeats,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "flow_cold_over_plain": round(med["flow_cold"] / med["plain"], 2),
        "flow_cold_overhead_s": round(med["flow_cold"] - med["plain"], 2),
        "flow_cached_over_plain": round(med["flow_cached"] / med["plain"], 2),
    })


if __name__ == "__main__":
    main()
