"""skmm_best_val with a third candidate (convex SkMM with ``pivoting="greedy_signal"``) on the paper's configuration
at its own m = 40 — the check that rejected greedy_signal as a default (bench/README.md §14).

For each seed and budget it reproduces ``SkMMBest``'s two candidates on the same sketch (asserted equal to the
library's), adds the third on that sketch with the same seed, and applies the pipeline's rule: the lowest ridge risk
on the 10 % validation sample (``skmm.synthetic.benchmark.validation_rows``) wins, convex SkMM on ties. Ratios are
to the best other method of the protocol's rows (bench/results/robustness: the "now" SkMM rows, the baseline's
others), as in the tables of §14.

    SKMM_BENCH_THREADS=1 .venv/bin/python bench/third_candidate.py   # → bench/results/auto_m/third_candidate_paper.json
    SKMM_BENCH_THREADS=1 .venv/bin/python bench/third_candidate.py --four  # + SkMM's pivoted seeding alone as a
                                                                  # fourth → .../four_candidates_paper.json
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from robustness import PAPER, RESULTS, SEEDS, SKMM_BEST_ROWS, make_pool

from skmm.select import SkMM, SkMMBest, SkMMv2
from skmm.select.base import check_random_state
from skmm.select.moment_matching import selection_sketch
from skmm.select.sketched_pivots import SketchedPivots
from skmm.synthetic.benchmark import SyntheticConfig, validation_rows
from skmm.synthetic.risk import ridge_risk_on_rows

FOURTH = "--four" in sys.argv  # also the fourth candidate: randomly pivoted sampling on the sketch


def best_other(config: str) -> dict[int, float]:
    """The lowest mean risk per budget among the other methods (SkMM rows from "now", the rest from "baseline")."""
    rows = []
    for label, keep in (("now", ("skmm", "skmm_v2")), ("baseline", None)):
        with open(RESULTS / label / "runs.csv") as fh:
            for r in csv.DictReader(fh):
                if r["config"] != config or r["method"] in SKMM_BEST_ROWS:
                    continue
                if (keep is None and r["method"] in ("skmm", "skmm_v2")) or (keep and r["method"] not in keep):
                    continue
                rows.append((r["method"], int(r["n"]), float(r["risk"])))
    means: dict[tuple[str, int], list[float]] = {}
    for method, n, risk in rows:
        means.setdefault((method, n), []).append(risk)
    out: dict[int, float] = {}
    for (_, n), risks in means.items():
        out[n] = min(out.get(n, np.inf), float(np.mean(risks)))
    return out


def main() -> None:
    cfg = PAPER
    config = SyntheticConfig(n_samples=cfg["n_samples"], dim=cfg["dim"], n_clusters=cfg["n_clusters"],
                             std_max=cfg["std_max"], sketch_dim=cfg["sketch_dim"],
                             generator_seed=cfg["generator_seed"])
    params = {**config.method_params("skmm_best"), "pivoted_candidate": FOURTH}  # the default lists the fourth
    pool = make_pool(cfg)
    start, rows = time.perf_counter(), []
    for seed in SEEDS:
        val = validation_rows(pool.X.shape[0], config.val_fraction, seed)
        for n in cfg["budgets"]:
            library = SkMMBest(n, random_state=seed, **params).fit(
                pool.X).selection_.info["candidates"]  # the fourth changes none of the others
            rng = check_random_state(seed)  # SkMMBest._select's draws, in order
            S, _, _ = selection_sketch(pool.X, params["sketch_dim"], int(rng.integers(2**31)))
            inner = int(rng.integers(2**31))
            convex = SkMM(n, None, discretization=params["discretization"], random_state=inner).fit(S).indices_
            greedy = SkMMv2(n, None, ridge=params["ridge"], temperature=params["temperature"],
                            random_state=inner).fit(S).indices_
            assert convex.tolist() == library["skmm"] and greedy.tolist() == library["skmm_v2"], (seed, n)
            third = SkMM(n, None, discretization=params["discretization"], random_state=inner,
                         pivoting="greedy_signal").fit(S).indices_
            cands = {"skmm": convex, "skmm_v2": greedy, "skmm_gsignal": third}
            if FOURTH:  # SkMM's seeding step alone for the whole budget, on the same sketch and seed
                cands["pivoted"] = SketchedPivots(n, None, random_state=inner).fit(S).indices_
                assert cands["pivoted"].tolist() == library["skmm_pivoted"], (seed, n)
            risks = {v: ridge_risk_on_rows(pool.X, pool.y, idx, (None, val))[0] for v, idx in cands.items()}
            two = min(("skmm", "skmm_v2"), key=lambda v: (risks[v][1], v != "skmm"))
            three = min(("skmm", "skmm_v2", "skmm_gsignal"), key=lambda v: (risks[v][1], v != "skmm"))
            four = min(cands, key=lambda v: (risks[v][1], v != "skmm"))
            rows.append({"seed": seed, "n": n, "two": risks[two][0], "two_chosen": two, "three": risks[three][0],
                         "three_chosen": three, "four": risks[four][0], "four_chosen": four,
                         **{v: r[0] for v, r in risks.items()}})
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    best = best_other("paper")
    table = []
    for n in cfg["budgets"]:
        mine = [r for r in rows if r["n"] == n]
        table.append({"n": n, "best_other": best[n],
                      **{k: float(np.mean([r[k] for r in mine]) / best[n])
                         for k in ("two", "three", "four", "skmm", "skmm_v2", "skmm_gsignal", "pivoted")
                         if k in mine[0]},
                      "three_chosen": [r["three_chosen"] for r in mine],
                      "four_chosen": [r["four_chosen"] for r in mine]})
        print(n, {k: round(v, 3) if isinstance(v, float) else v for k, v in table[-1].items()})
    name = "four_candidates_paper.json" if FOURTH else "third_candidate_paper.json"
    out = pathlib.Path(__file__).resolve().parent / "results" / "auto_m" / name
    out.write_text(json.dumps({"config": cfg, "rows": rows, "ratios": table,
                               "wall_s": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
