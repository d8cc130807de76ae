"""Tune SkMM's hyper-parameters on *validation* pools (generator seeds 1 and 2), never on the evaluation pool.

The evaluation table (`skmm bench synthetic`) uses generator seed 0; the settings it ships with were chosen
here, by mean validation risk over n in {64, 120} and 4 selection seeds. Usage:
    .venv/bin/python bench/tune_synthetic.py [--out bench/out/tune_synthetic.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import pathlib
import time

import numpy as np

from skmm.select import SkMM, SkMMv2
from skmm.synthetic import make_gmm, ridge_risk

GRID_V2 = [{"ridge": r, "temperature": t} for r, t in itertools.product([1e-6, 1e-3, 1e-2, 1e-1, 1.0], [0.1, 0.0])]
GRID_CONVEX = [
    {"c_s": c, "discretization": d}
    for c, d in itertools.product([0.999, 0.9, 0.7], ["sample", "systematic", "topk"])
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out/tune_synthetic.csv")
    args = parser.parse_args()
    rows = []
    for gen_seed in (1, 2):
        pool = make_gmm(seed=gen_seed)
        for variant, grid in (("skmm_v2", GRID_V2), ("skmm", GRID_CONVEX)):
            for params in grid:
                for n in (64, 120):
                    risks = []
                    start = time.perf_counter()
                    for s in range(4):
                        cls = SkMMv2 if variant == "skmm_v2" else SkMM
                        sel = cls(n, sketch_dim=40, random_state=s, **params).fit(pool.X)
                        risks.append(ridge_risk(pool.X, pool.y, sel.indices_)[0])
                    row = {"variant": variant, **{"ridge": "", "temperature": "", "c_s": "", "discretization": ""},
                           **params, "generator_seed": gen_seed, "n": n, "mean_risk": float(np.mean(risks)),
                           "seconds": time.perf_counter() - start}
                    rows.append(row)
                    print(row, flush=True)
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["variant"], row["ridge"], row["temperature"], row["c_s"], row["discretization"])
        groups.setdefault(key, []).append(row["mean_risk"])
    for variant in ("skmm_v2", "skmm"):
        ranked = sorted((float(np.mean(v)), k) for k, v in groups.items() if k[0] == variant)
        print(f"best {variant} by mean validation risk: {ranked[0][1]} ({ranked[0][0]:.4g}); all: {ranked}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
