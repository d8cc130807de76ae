"""The ridge's α at small budgets (issue 10): is a cell's risk ratio the coreset or the α its 2-fold CV picked?

For each named protocol cell (configuration:n), 4 seeds, the SkMM candidates on the pipeline's automatic-m sketch
(convex SkMM with its default pivoting, SkMMv2, the pivoted seeding alone) and k-center, adaptive sampling and
uniform on the pool: the risk at the α the authors' 2-fold CV picks (the protocol's risk), the risk at the best α of
the same grid (``skmm.synthetic.risk.ridge_risks_by_alpha``), the α picked per seed, the clusters missed, and the
CV risk of the same set in pool order and with shuffled folds (the authors' folds follow the listing order).

    SKMM_BENCH_THREADS=1 .venv/bin/python bench/alpha_lottery.py --cells c14:32,paper:64,c10:68
→ bench/out/alpha_lottery<tag>.json and a table on stdout (ratios to the lowest mean in the cell, per column).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cell(cfg: dict, n: int, seeds: int) -> dict:
    import robustness
    from auto_m import protocol_sketch, reduced

    from skmm.select import SkMM, SkMMv2, make_selector
    from skmm.select.sketched_pivots import SketchedPivots
    from skmm.select.spectrum import auto_sketch_dim
    from skmm.synthetic.risk import DEFAULT_ALPHAS, cv_errors, ridge_risk, ridge_risks_by_alpha

    pool = robustness.make_pool(cfg)
    present = np.flatnonzero(pool.sizes)
    out: dict[str, list[dict]] = {}
    for seed in range(seeds):
        S, lam, V = protocol_sketch(pool.X, seed)  # as bench/auto_m.py, then the leading m directions
        X = reduced(S, lam, V, auto_sketch_dim(lam))
        coresets = {"skmm": SkMM(n, random_state=seed).fit(X).indices_,
                    "skmm_v2": SkMMv2(n, random_state=seed).fit(X).indices_,
                    "skmm_pivoted": SketchedPivots(n, random_state=seed).fit(X).indices_}
        for method in ("kcenter", "adaptive", "uniform"):
            coresets[method] = make_selector(method, n, random_state=seed).fit(pool.X).indices_
        for method, idx in coresets.items():
            risk, alpha = ridge_risk(pool.X, pool.y, idx)
            grid = ridge_risks_by_alpha(pool.X, pool.y, idx)
            errors = cv_errors(pool.X, pool.y, idx)
            shuffled_risk, shuffled_alpha = ridge_risk(pool.X, pool.y, idx, fold_seed=seed)
            scale = pool.scales[pool.cluster[idx]]
            out.setdefault(method, []).append({
                "seed": seed, "risk": risk, "alpha": alpha, "risk_best_alpha": float(grid.min()),
                # the same set in pool order, and as a set with shuffled folds (the authors' CV follows the order)
                "risk_pool_order": ridge_risk(pool.X, pool.y, np.sort(idx))[0],
                "risk_shuffled_cv": shuffled_risk, "alpha_shuffled_cv": shuffled_alpha,
                "best_alpha": float(DEFAULT_ALPHAS[int(np.argmin(grid))]),
                # how far apart the CV's errors over the α grid are (a tie when tiny), and whether the listing puts
                # the large-scale clusters in its first fold (mean cluster scale a_c of the first half over the second)
                "cv_error_spread": float((errors.max() - errors.min()) / errors.min()),
                "fold_scale_ratio": float(scale[:len(idx) // 2].mean() / scale[len(idx) // 2:].mean()),
                "clusters_missed": int(np.setdiff1d(present, pool.cluster[idx]).size)})
    return out


def main() -> None:
    import robustness

    from skmm.synthetic.risk import DEFAULT_ALPHAS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", required=True, help="comma-separated configuration:n, e.g. c14:32,paper:64")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--tag", default="", help="suffix of the output file's name")
    args = parser.parse_args()
    configs = {c["name"]: c for c in robustness.all_configs()}
    result = {}
    lines = ["| cell | method | CV risk / best | pool order / best | shuffled folds / best | best-α risk / best | "
             "α picked per seed | seeds at α = 100 as listed / shuffled | CV error spread, largest | "
             "fold scale ratio, median | clusters missed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in args.cells.split(","):
        name, n = spec.split(":")
        if name not in configs:
            raise SystemExit(f"unknown configuration {name!r}")
        runs = cell(configs[name], int(n), args.seeds)
        result[spec] = runs
        cols = {c: {m: np.mean([r[c] for r in rs]) for m, rs in runs.items()}
                for c in ("risk", "risk_pool_order", "risk_shuffled_cv", "risk_best_alpha")}
        for m, rs in runs.items():
            alphas = ", ".join(f"{r['alpha']:.3g}" for r in rs)
            missed = sum(r["clusters_missed"] for r in rs)
            ratios = " | ".join(f"{v[m] / min(v.values()):.2f}" for v in cols.values())
            top = DEFAULT_ALPHAS[-1]
            picks = f"{sum(r['alpha'] == top for r in rs)} / {sum(r['alpha_shuffled_cv'] == top for r in rs)}"
            spread = max(r["cv_error_spread"] for r in rs)
            folds = np.median([r["fold_scale_ratio"] for r in rs])
            lines.append(f"| {spec} | {m} | {ratios} | {alphas} | {picks} | {spread:.1e} | {folds:.2f} | {missed} |")
        print(spec, "done", flush=True)
    path = Path(os.environ.get("SKMM_BENCH_OUT", Path(__file__).parent / "out")) / f"alpha_lottery{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    print("wrote", path)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    with threadpool_limits(int(os.environ.get("SKMM_BENCH_THREADS", "1"))):
        main()
