"""SkMM off its tuning pool: the synthetic experiment over a family of generated GMM configurations (issue 10).

The family: ``FAMILY_SIZE`` configurations drawn with a fixed seed (N 2 000–8 000, r 1 000–8 000 with N·r capped
so that one run fits on one core, 5–40 clusters, std_max 0.02–0.2 log-uniform, sketch m 20–160, four budgets in
32–400, the smallest below m whenever m > 32), split by another fixed seed into a validation half (rules are
chosen on it) and a test half (reported only). The paper's configuration (SKMM.md §6) is its own row. Every
configuration runs ``skmm.synthetic.run_synthetic`` (the paper's generator and ridge fit): every method, 4 seeds.

    .venv/bin/python bench/robustness.py --half val --label now      # or test / paper / all
    .venv/bin/python bench/robustness.py --report --label now        # tables from the runs already written

Outputs under ``--out`` (default bench/results/robustness/<label>/): runs.csv (one row per method, n, seed and
configuration, appended as each configuration finishes), configs.json, and table.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

FAMILY_SEED = 2026  # draws the configurations
SPLIT_SEED = 7  # splits them into validation and test halves
FAMILY_SIZE = 16
# A second family from the same distribution, drawn with its own seed: more pools to choose rules on ("dev", like
# the validation half; added when the validation half's 24 cells at n <= 200 proved too few to tell rules apart)
DEV_FAMILY_SEED = 2027
MAX_CELLS = 2.0e7  # N·r: a float64 pool of at most 160 MB, so one configuration runs in about a minute on one core
SEEDS = (0, 1, 2, 3)
METHODS = ("skmm_best", "skmm", "skmm_v2", "uniform", "herding", "kcenter", "adaptive", "leverage", "ridge_leverage")
SKMM_BEST_ROWS = ("skmm_best", "skmm_best_val")
PAPER = {"name": "paper", "half": "paper", "n_samples": 3000, "dim": 5000, "n_clusters": 10, "std_max": 0.04,
         "sketch_dim": 40, "generator_seed": 0, "budgets": [32, 48, 64, 120, 200, 400]}
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "robustness"


def family(size: int = FAMILY_SIZE, seed: int = FAMILY_SEED, split_seed: int = SPLIT_SEED) -> list[dict[str, Any]]:
    """The generated configurations, each with its half ("val" or "test"); deterministic in the two seeds."""
    rng = np.random.default_rng(seed)
    configs: list[dict[str, Any]] = []
    while len(configs) < size:
        N = int(rng.integers(20, 81)) * 100
        r = int(rng.integers(10, 81)) * 100
        k = int(rng.integers(5, 41))
        std_max = round(float(np.exp(rng.uniform(np.log(0.02), np.log(0.2)))), 3)
        m = int(rng.integers(5, 41)) * 4
        gen_seed = int(rng.integers(1, 10_000))
        if N * r > MAX_CELLS:
            continue
        low = int(rng.integers(32, m)) if m > 33 else 32  # below m whenever the range allows it
        mid = int(rng.integers(max(low + 16, 64), 181))
        configs.append({"name": f"c{len(configs):02d}", "n_samples": N, "dim": r, "n_clusters": k, "std_max": std_max,
                        "sketch_dim": m, "generator_seed": gen_seed, "budgets": sorted({low, mid, 200, 400})})
    order = np.random.default_rng(split_seed).permutation(size)
    for rank, i in enumerate(order):
        configs[i]["half"] = "val" if rank < size // 2 else "test"
    return configs


def dev_family(size: int = FAMILY_SIZE) -> list[dict[str, Any]]:
    """The development family: :func:`family` drawn with ``DEV_FAMILY_SEED``, every configuration in half "dev"
    (names d00…), for choosing rules only, never reported as acceptance."""
    return [{**c, "name": "d" + c["name"][1:], "half": "dev"} for c in family(size, DEV_FAMILY_SEED)]


def all_configs() -> list[dict[str, Any]]:
    return [dict(PAPER), *family(), *dev_family()]


def make_pool(cfg: dict[str, Any]) -> Any:
    """A configuration's pool: the authors' generator with its N, r, cluster count, std_max and seed."""
    from skmm.synthetic.gmm import make_gmm

    return make_gmm(cfg["n_samples"], cfg["dim"], cfg["n_clusters"], cfg["std_max"], cfg["generator_seed"])


def run_config(cfg: dict[str, Any], seeds=SEEDS, methods=METHODS, max_n: int | None = None,
               alpha_grid: bool = False, shuffled_cv: bool = False) -> dict[str, Any]:
    """``max_n``: run only the budgets up to it (the acceptance looks at n <= 200); ``alpha_grid``: also record
    each coreset's risk at the best α of the ridge's grid (SyntheticConfig.alpha_grid); ``shuffled_cv``: also its
    CV risk as a set, folds shuffled (SyntheticConfig.shuffled_cv)."""
    from skmm.synthetic.benchmark import SyntheticConfig, run_synthetic

    config = SyntheticConfig(n_samples=cfg["n_samples"], dim=cfg["dim"], n_clusters=cfg["n_clusters"],
                             std_max=cfg["std_max"], generator_seed=cfg["generator_seed"],
                             budgets=[b for b in cfg["budgets"] if max_n is None or b <= max_n],
                             seeds=tuple(seeds), sketch_dim=cfg["sketch_dim"], methods=tuple(methods),
                             val_fraction=0.1, cache_scores=True, alpha_grid=alpha_grid, shuffled_cv=shuffled_cv)
    return run_synthetic(config)


def summary(rows: list[dict[str, Any]], column: str = "risk") -> dict[tuple[str, int], dict[str, float]]:
    """(config, n) → {method: mean risk} (``column="risk_best_alpha"``: the risk at each coreset's best α; rows
    without it are left out)."""
    risks: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.get(column) not in (None, ""):
            risks[(r["config"], int(r["n"]), r["method"])].append(float(r[column]))
    out: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for (name, n, method), values in risks.items():
        out[(name, n)][method] = float(np.mean(values))
    return out


def ratios(cells: dict[str, float], method: str) -> tuple[float, str]:
    """``method``'s mean risk over the best other method's (skmm_best rows never count as "other"), and that one."""
    others = {k: v for k, v in cells.items() if k not in SKMM_BEST_ROWS and k != method}
    best = min(others, key=others.get)
    return cells[method] / others[best], best


def best_other_means(rows: list[dict[str, Any]], column: str = "risk") -> dict[tuple[str, int], float]:
    """(config, n) → the lowest mean ``column`` of the methods in ``rows`` other than skmm_best's rows: the bar a
    selection at another setting (bench/auto_m.py's automatic m) is measured against."""
    return {key: min(v for k, v in cells.items() if k not in SKMM_BEST_ROWS)
            for key, cells in summary(rows, column).items()}


def mean_ratios(rows: list[dict[str, Any]], best: dict[tuple[str, int], float], columns: tuple[str, ...]
                ) -> dict[tuple[str, int], dict[str, float]]:
    """(config, n) → each of ``columns``' mean over the cell's ``rows`` (one dict per seed, e.g. bench/auto_m.py's)
    divided by ``best`` of that cell."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["config"], r["n"])].append(r)
    return {key: {c: float(np.mean([r[c] for r in cells[key]])) / best[key] for c in columns}
            for key in sorted(cells)}


def acceptance(rows: list[dict[str, Any]], configs: list[dict[str, Any]], half: str, max_n: int = 200,
               column: str = "risk") -> dict:
    """The issue's targets on one half: skmm_best (each rule) ≤ 1.1× best other in ≥ 90 % of cells, never > 2×;
    convex SkMM never > 3× the best of all methods. ``column``: as :func:`summary`."""
    names = {c["name"] for c in configs if c["half"] == half}
    table = {key: v for key, v in summary(rows, column).items() if key[0] in names and key[1] <= max_n}
    out: dict[str, Any] = {"half": half, "cells": len(table)}
    for method in SKMM_BEST_ROWS:
        rs = [ratios(v, method)[0] for v in table.values() if method in v]
        if rs:
            out[method] = {"within_1.1": float(np.mean(np.array(rs) <= 1.1)), "worst": float(max(rs)),
                           "median": float(np.median(rs))}
    convex = [v["skmm"] / min(v.values()) for v in table.values() if "skmm" in v]
    if convex:
        out["skmm_convex_worst_vs_best"] = float(max(convex))
    return out


def markdown(rows: list[dict[str, Any]], configs: list[dict[str, Any]], full: dict[str, float]) -> str:
    """Per half, per (configuration, n): every method's mean risk relative to the best method in that cell."""
    by_name = {c["name"]: c for c in configs}
    table = summary(rows)
    methods = [m for m in (*SKMM_BEST_ROWS, *METHODS[1:]) if any(m in v for v in table.values())]
    lines = []
    for half in ("paper", "val", "dev", "test"):
        keys = sorted(k for k in table if by_name[k[0]]["half"] == half)
        if not keys:
            continue
        lines += [f"\n### {half} half" if half != "paper" else "\n### the paper's configuration", "",
                  "Mean risk over 4 seeds relative to the lowest mean in the cell (1 = best); last column: the "
                  "lowest mean and the full-data ridge risk.", "",
                  "| config (N, r, k, std_max, m) | n | " + " | ".join(methods) + " | best risk (full data) |",
                  "|---|---|" + "---|" * (len(methods) + 1)]
        for name, n in keys:
            c, cells = by_name[name], table[(name, n)]
            best = min(cells.values())
            desc = f"{name} ({c['n_samples']}, {c['dim']}, {c['n_clusters']}, {c['std_max']}, {c['sketch_dim']})"
            vals = [(f"{cells[m] / best:.3g}" if m in cells else "") for m in methods]
            vals = [f"**{v}**" if v == "1" else v for v in vals]
            lines.append(f"| {desc} | {n}{' < m' if n < c['sketch_dim'] else ''} | " + " | ".join(vals)
                         + f" | {best:.3g} ({full.get(name, float('nan')):.3g}) |")
        if half != "paper":
            for column, what in (("risk", ""), ("risk_best_alpha", ", each coreset at its best α of the grid"),
                                 ("risk_shuffled_cv", ", each coreset as a set: shuffled CV folds")):
                acc = acceptance(rows, configs, half, column=column)
                if acc["cells"]:
                    lines.append(f"\nAcceptance on the {half} half (n ≤ 200, {acc['cells']} cells{what}): "
                                 + "; ".join(f"{m}: ≤ 1.1× best other in {100 * acc[m]['within_1.1']:.0f} % of "
                                             f"cells, median {acc[m]['median']:.3g}×, worst {acc[m]['worst']:.3g}×"
                                             for m in SKMM_BEST_ROWS if m in acc)
                                 + (f"; convex SkMM worst {acc['skmm_convex_worst_vs_best']:.3g}× the best"
                                    if "skmm_convex_worst_vs_best" in acc else ""))
    return "\n".join(lines) + "\n"


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]], configs: list[dict[str, Any]], half: str,
            max_n: int = 200) -> str:
    """Baseline against now on one half: the SkMM rows' mean risk over the best other method's, per (config, n);
    the other methods' rows are the same in both (their code did not change)."""
    by_name = {c["name"]: c for c in configs}
    old, new = summary(before), summary(after)
    rows = ["| config | n | skmm_best (proxy) | skmm_best_val | skmm (convex) | skmm_v2 | best other now |",
            "|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in new if by_name[k[0]]["half"] == half and k[1] <= max_n and k in old):
        cells = []
        for method in ("skmm_best", "skmm_best_val", "skmm", "skmm_v2"):
            a = ratios(old[key], method)[0] if method in old[key] else float("nan")
            b = ratios(new[key], method)[0] if method in new[key] else float("nan")
            cells.append(f"{a:.3g} → **{b:.3g}**" if b <= 1.1 else f"{a:.3g} → {b:.3g}")
        others = {k: v for k, v in new[key].items() if k not in (*SKMM_BEST_ROWS, "skmm", "skmm_v2")}
        best = min(others, key=others.get)
        name, n = key
        rows.append(f"| {name} (k={by_name[name]['n_clusters']}, m={by_name[name]['sketch_dim']}) | "
                    f"{n}{' < m' if n < by_name[name]['sketch_dim'] else ''} | " + " | ".join(cells)
                    + f" | {best} {others[best]:.3g} |")
    return "\n".join(rows) + "\n"


def read_label(label: str) -> list[dict[str, Any]]:
    """A run's rows by its label (a folder under bench/results/robustness/, or a path). ``A+B``: run A's rows,
    completed by run B's for the (configuration, method) pairs A did not run (as ``--reuse``). ``A|B``: the rows
    of runs A and B pooled — replicates with disjoint seeds read as one table with more seeds per cell (``+``
    binds tighter: ``A+B|C``)."""
    runs = []
    for run in label.split("|"):
        rows: list[dict[str, Any]] = []
        for part in run.split("+"):
            path = pathlib.Path(part)
            rows = completed(rows, read_runs((path if path.exists() else RESULTS / part) / "runs.csv"))
        runs.append(rows)
    return pooled(runs, lambda r: (r["config"], r["method"], r["n"], r["seed"]), label)


def pooled(groups: list[list[dict[str, Any]]], key: Callable[[dict[str, Any]], tuple], what: str
           ) -> list[dict[str, Any]]:
    """The rows of replicates as one list; refused when a ``key`` (configuration, n, seed, …) comes twice, since
    pooling is for disjoint seeds."""
    rows = [r for group in groups for r in group]
    keys = [key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"{what}: the pooled runs repeat rows (the same configuration, n and seed); pool runs with "
                         "disjoint seeds")
    return rows


def completed(rows: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` and the rows of ``other`` for the (configuration, method) pairs ``rows`` lacks."""
    have = {(r["config"], r["method"]) for r in rows}
    return rows + [r for r in other if (r["config"], r["method"]) not in have]


def read_runs(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=("val", "test", "paper", "dev", "all"), default="all",
                        help="all: the paper's configuration and both halves (dev only when named)")
    parser.add_argument("--configs", default="", help="comma-separated configuration names (default: the half's)")
    parser.add_argument("--label", default="now", help="results go to bench/results/robustness/<label>/")
    parser.add_argument("--out", default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-n", type=int, default=None, help="run only the budgets up to this one")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="comma-separated seeds (default 0,1,2,3); other seeds give a replicate of the table "
                             "with new sketches, selections and validation samples on the same pools")
    parser.add_argument("--alpha-grid", action="store_true",
                        help="also record each coreset's risk at the best α of the ridge's grid")
    parser.add_argument("--shuffled-cv", action="store_true",
                        help="also record each coreset's CV risk as a set (rows in pool order, shuffled folds)")
    parser.add_argument("--report", action="store_true", help="only rewrite table.md from runs.csv")
    parser.add_argument("--reuse", default=None,
                        help="a results folder whose rows complete the table for the methods this run did not "
                             "run (baselines whose code did not change: the same seeds give the same rows)")
    args = parser.parse_args()
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers; got {args.seeds!r}")
    out = pathlib.Path(args.out) if args.out else RESULTS / args.label
    out.mkdir(parents=True, exist_ok=True)
    configs = all_configs()
    (out / "configs.json").write_text(json.dumps(configs, indent=1) + "\n")
    runs_path, full_path = out / "runs.csv", out / "full_data_risk.json"
    full = json.loads(full_path.read_text()) if full_path.exists() else {}
    if not args.report:
        wanted = set(args.configs.split(",")) if args.configs else None
        todo = [c for c in configs if (wanted and c["name"] in wanted)
                or (not wanted and (args.half == c["half"] or (args.half == "all" and c["half"] != "dev")))]
        done = {r["config"] for r in read_runs(runs_path)}
        for cfg in todo:
            if cfg["name"] in done:
                print(f"{cfg['name']}: already in {runs_path}, skipped", flush=True)
                continue
            start = time.perf_counter()
            result = run_config(cfg, seeds=seeds, methods=args.methods.split(","), max_n=args.max_n,
                                alpha_grid=args.alpha_grid, shuffled_cv=args.shuffled_cv)
            full[cfg["name"]] = result["full_data_risk"]
            rows = [{"config": cfg["name"], "half": cfg["half"], **r} for r in result["rows"]]
            fields = list(dict.fromkeys(k for r in rows for k in r))  # skmm_best_val rows add their own keys
            new = not runs_path.exists()
            if not new:  # append under the file's own header, never a shifted one
                with runs_path.open(newline="") as fh:
                    header = next(csv.reader(fh), [])
                extra = sorted(set(fields) - set(header))
                if extra:
                    raise SystemExit(f"{runs_path} has columns {header}; this run adds {extra}: use another --label")
                fields = header
            with runs_path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                if new:
                    writer.writeheader()
                writer.writerows(rows)
            full_path.write_text(json.dumps(full, indent=1) + "\n")
            print(f"{cfg['name']} ({cfg['half']}): {time.perf_counter() - start:.0f} s", flush=True)
    rows = read_runs(runs_path)
    other: list[dict[str, Any]] = []
    if args.reuse:
        reuse = pathlib.Path(args.reuse)
        other = read_runs((reuse if reuse.is_absolute() or reuse.exists() else RESULTS / args.reuse) / "runs.csv")
        rows = completed(rows, other)
        if not full:
            other_full = (reuse if reuse.exists() else RESULTS / args.reuse) / "full_data_risk.json"
            full = json.loads(other_full.read_text()) if other_full.exists() else {}
    if rows and args.reuse:
        for half in ("paper", "val", "test"):
            text = compare(other, rows, configs, half, max_n=400 if half == "paper" else 200)
            (out / f"compare_{half}.md").write_text(text)
    if rows:
        text = markdown(rows, configs, full)
        (out / "table.md").write_text(text)
        print(text)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    with threadpool_limits(int(os.environ.get("SKMM_BENCH_THREADS", "1"))):  # one core per run, by design
        main()
