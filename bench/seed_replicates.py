"""How far the robustness protocol's acceptance figures move with the seeds alone (issue 10).

Two runs of ``bench/robustness.py`` on the same configurations with disjoint seed sets (``--seeds``) are two
replicates of the protocol: the same pools and code, new sketches, selections and validation samples. This script
puts them side by side, for the authors' CV risk and, where both runs recorded them, each coreset's risk at its
best α (``--alpha-grid``) and its CV risk as a set (``--shuffled-cv``):

- the issue's acceptance figures (share of cells with skmm_best_val ≤ 1.1× the best other method, its worst ratio,
  convex SkMM's worst ratio to the best method) on each replicate and on the pooled seeds;
- how many cells change verdict (≤ 1.1× in one replicate, > 1.1× in the other);
- each method against itself: per cell, the larger of its two replicate means over the smaller. A ratio a method
  shows against an identical copy of itself is noise, so it bounds what a 4-seed table can tell apart.

    .venv/bin/python bench/seed_replicates.py --runs grid,replicate_s4_7 --half val
→ a markdown report on stdout and bench/out/seed_replicates_<half>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import robustness

COLUMNS = {"risk": "CV", "risk_best_alpha": "best α", "risk_shuffled_cv": "shuffled-fold CV (the coreset as a set)"}


def load(label: str, half: str, max_n: int) -> list[dict[str, Any]]:
    """One run's rows for ``half`` at n <= ``max_n`` (``robustness.read_label``: "A+B" completes run A with B's)."""
    names = {c["name"] for c in robustness.all_configs() if c["half"] == half}
    return [r for r in robustness.read_label(label) if r["config"] in names and int(r["n"]) <= max_n]


def self_ratios(a: dict, b: dict, method: str) -> list[float]:
    """Per cell present in both replicates: max(mean_a, mean_b) / min(mean_a, mean_b) of ``method``."""
    out = []
    for key in sorted(set(a) & set(b)):
        if method in a[key] and method in b[key]:
            x, y = a[key][method], b[key][method]
            out.append(max(x, y) / min(x, y))
    return out


def verdicts(rows: list[dict[str, Any]], column: str) -> dict[tuple[str, int], float]:
    """(config, n) → skmm_best_val's ratio to the best other method."""
    return {key: robustness.ratios(cells, "skmm_best_val")[0]
            for key, cells in robustness.summary(rows, column).items() if "skmm_best_val" in cells}


def cross_fitted(a: dict, b: dict) -> list[float]:
    """Per cell: skmm_best_val's mean on replicate b over the b-mean of the method that was the best other on
    replicate a — the best other chosen on one set of seeds and measured on the other, so that a lucky draw of a
    high-variance baseline does not set the bar it is then compared with (the minimum of seven noisy means is
    biased low)."""
    out = []
    for key in sorted(set(a) & set(b)):
        if "skmm_best_val" in a[key] and "skmm_best_val" in b[key]:
            _, best = robustness.ratios(a[key], "skmm_best_val")
            if best in b[key]:
                out.append(b[key]["skmm_best_val"] / b[key][best])
    return out


def compare(reps: dict[str, list[dict[str, Any]]], half: str, max_n: int) -> dict[str, Any]:
    configs = robustness.all_configs()
    seeds = {label: sorted({int(r["seed"]) for r in rows}) for label, rows in reps.items()}
    labels = list(reps)
    overlap = set(seeds[labels[0]]) & set(seeds[labels[1]])
    if overlap:
        raise SystemExit(f"the two runs share seeds {sorted(overlap)}: replicates need disjoint seed sets")
    pooled = reps[labels[0]] + reps[labels[1]]
    out: dict[str, Any] = {"half": half, "max_n": max_n, "seeds": seeds, "columns": {}}
    for column in COLUMNS:
        if not all(any(r.get(column) not in (None, "") for r in rows) for rows in reps.values()):
            continue
        res: dict[str, Any] = {}
        for label, rows in [*reps.items(), ("pooled", pooled)]:
            res[label] = robustness.acceptance(rows, configs, half, max_n, column)
        va, vb = (verdicts(reps[label], column) for label in labels)
        keys = sorted(set(va) & set(vb))
        res["cells"] = len(keys)
        res["verdict_flips"] = [f"{k[0]}:{k[1]}" for k in keys if (va[k] <= 1.1) != (vb[k] <= 1.1)]
        res["ratio_per_cell"] = {f"{k[0]}:{k[1]}": [va[k], vb[k]] for k in keys}
        sa, sb = (robustness.summary(reps[label], column) for label in labels)
        methods = sorted({m for cells in sa.values() for m in cells})
        res["cross_fitted"] = {}
        for x, y in ((0, 1), (1, 0)):
            rs = np.array(cross_fitted((sa, sb)[x], (sa, sb)[y]))
            res["cross_fitted"][f"best other chosen on {labels[x]}, measured on {labels[y]}"] = {
                "cells": int(rs.size), "within_1.1": float(np.mean(rs <= 1.1)), "worst": float(rs.max()),
                "median": float(np.median(rs))}
        res["self"] = {}
        for method in methods:
            rs = np.array(self_ratios(sa, sb, method))
            if rs.size:
                res["self"][method] = {"median": float(np.median(rs)), "worst": float(rs.max()),
                                       "above_1.1": float(np.mean(rs > 1.1)), "above_2": float(np.mean(rs > 2))}
        out["columns"][column] = res
    return out


def auto_m_rows(path: str, half: str, max_n: int) -> tuple[list[dict[str, Any]], str]:
    """bench/auto_m.py protocol rows (one rule) for ``half`` at n <= ``max_n``, and the risk they hold: "risk" (the
    authors' CV) or "risk_shuffled_cv" (auto_m.py --shuffled-cv). ``a.json|b.json`` pools files with disjoint
    seeds."""
    groups, columns = [], set()
    for part in path.split("|"):
        file = Path(part)
        file = file if file.exists() else robustness.RESULTS.parent / "auto_m" / part
        data = json.loads(file.read_text())
        groups.append([r for r in data["rows"] if r["half"] == half and r["n"] <= max_n])
        columns.add(data.get("column", "risk"))
    rows = robustness.pooled(groups, lambda r: (r["config"], r["n"], r["seed"]), path)
    rules = {r["rule"] for r in rows}
    if len(rules) != 1:
        raise SystemExit(f"{path}: expected the rows of one rule for half {half}; found {sorted(rules)}")
    if len(columns) > 1:
        raise SystemExit(f"{path}: the pooled files hold different risks (authors' CV and shuffled folds)")
    return rows, columns.pop()


def auto_m_ratios(auto: list[dict[str, Any]], others: list[dict[str, Any]], column: str = "risk"
                  ) -> dict[tuple[str, int], dict]:
    """(config, n) → skmm_best_val's and convex SkMM's mean ``column`` at the automatic m over the best other
    method's (every robustness row but skmm_best's, convex SkMM and SkMMv2 at the configured m included, as
    auto_m.py)."""
    return robustness.mean_ratios(auto, robustness.best_other_means(others, column), ("skmm_best_val", "skmm"))


def compare_auto_m(files: list[str], reps: dict[str, list[dict[str, Any]]], half: str, max_n: int
                   ) -> dict[str, Any]:
    """The acceptance figures at the pipeline's automatic m (bench/auto_m.py) per replicate and pooled; each
    replicate's bar is the robustness run with its seeds, in the risk the files hold."""
    (auto_a, column), (auto_b, column_b) = (auto_m_rows(f, half, max_n) for f in files)
    if column != column_b:
        raise SystemExit(f"{files}: the two replicates' automatic-m rows hold different risks {column}, {column_b}")
    labels = list(reps)
    autos = {labels[0]: auto_a, labels[1]: auto_b}
    for label, rows in autos.items():
        if {r["seed"] for r in rows} != {int(r["seed"]) for r in reps[label]}:
            raise SystemExit(f"the automatic-m rows and the robustness run {label} have different seeds")
    ratios = {label: auto_m_ratios(rows, reps[label], column) for label, rows in autos.items()}
    ratios["pooled"] = auto_m_ratios(auto_a + auto_b, reps[labels[0]] + reps[labels[1]], column)
    out: dict[str, Any] = {"files": files, "column": column}
    for label, cells in ratios.items():
        best = np.array([c["skmm_best_val"] for c in cells.values()])
        out[label] = {"cells": len(cells), "within_1.1": float(np.mean(best <= 1.1)), "worst": float(best.max()),
                      "convex_worst": float(max(c["skmm"] for c in cells.values()))}
    a, b = (ratios[label] for label in labels)
    out["verdict_flips"] = [f"{k[0]}:{k[1]}" for k in sorted(set(a) & set(b))
                            if (a[k]["skmm_best_val"] <= 1.1) != (b[k]["skmm_best_val"] <= 1.1)]
    return out


def markdown(out: dict[str, Any]) -> str:
    labels = list(out["seeds"])
    lines = [f"Half {out['half']}, n <= {out['max_n']}; seeds: "
             + "; ".join(f"{k} {v}" for k, v in out["seeds"].items()), ""]
    for column, res in out["columns"].items():
        lines += [f"**{COLUMNS[column]} risk**", "",
                  "| seeds | cells | skmm_best_val <= 1.1x | worst | convex SkMM worst |", "|---|---|---|---|---|"]
        for label in [*labels, "pooled"]:
            acc = res[label]
            best = acc.get("skmm_best_val", {})
            nan = float("nan")
            lines.append(f"| {label} | {acc['cells']} | {best.get('within_1.1', nan):.0%} | "
                         f"{best.get('worst', nan):.2f} | {acc.get('skmm_convex_worst_vs_best', nan):.2f} |")
        for name, c in res["cross_fitted"].items():
            lines.append(f"| skmm_best_val against the {name} | {c['cells']} | {c['within_1.1']:.0%} | "
                         f"{c['worst']:.2f} | |")
        lines += ["", f"Cells whose verdict (<= 1.1x) flips between the replicates: {len(res['verdict_flips'])} of "
                  f"{res['cells']} ({', '.join(res['verdict_flips']) or 'none'})", "",
                  "| method against itself | median | worst | cells > 1.1x | cells > 2x |", "|---|---|---|---|---|"]
        for method, s in res["self"].items():
            lines.append(f"| {method} | {s['median']:.2f} | {s['worst']:.2f} | {s['above_1.1']:.0%} | "
                         f"{s['above_2']:.0%} |")
        lines.append("")
    if "auto_m" in out:
        res = out["auto_m"]
        lines += [f"**{COLUMNS[res.get('column', 'risk')]} risk at the automatic m** (bench/auto_m.py rows; convex "
                  "SkMM against the best other)", "",
                  "| seeds | cells | skmm_best_val <= 1.1x | worst | convex SkMM worst |", "|---|---|---|---|---|"]
        for label in [*labels, "pooled"]:
            r = res[label]
            lines.append(f"| {label} | {r['cells']} | {r['within_1.1']:.0%} | {r['worst']:.2f} | "
                         f"{r['convex_worst']:.2f} |")
        lines += ["", f"Cells whose verdict flips: {len(res['verdict_flips'])} "
                  f"({', '.join(res['verdict_flips']) or 'none'})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True,
                        help="two robustness labels (or folders), comma-separated; A+B completes run A with B's "
                             "rows, A|B pools runs with disjoint seeds into one replicate")
    parser.add_argument("--half", default="val", choices=("val", "dev", "paper", "test"))
    parser.add_argument("--max-n", type=int, default=200)
    parser.add_argument("--auto-m", default="",
                        help="two bench/auto_m.py protocol files with the two runs' seeds, comma-separated (a|b "
                             "pools files): the figures at the automatic m too")
    args = parser.parse_args()
    labels = args.runs.split(",")
    if len(labels) != 2:
        parser.error("--runs takes exactly two labels")
    reps = {label: load(label, args.half, args.max_n) for label in labels}
    for label, rows in reps.items():
        if not rows:
            raise SystemExit(f"{label}: no rows for half {args.half} at n <= {args.max_n}")
    out = compare(reps, args.half, args.max_n)
    if args.auto_m:
        files = args.auto_m.split(",")
        if len(files) != 2:
            parser.error("--auto-m takes exactly two files")
        out["auto_m"] = compare_auto_m(files, reps, args.half, args.max_n)
    path = Path(os.environ.get("SKMM_BENCH_OUT", Path(__file__).parent / "out")) / f"seed_replicates_{args.half}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(markdown(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
