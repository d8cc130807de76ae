"""Which clusters convex SkMM's seeding pivots miss in one protocol cell, per pivot rule (issue 10).

For a cell (configuration:n) of bench/robustness.py, at the configuration's own m (as robustness.py runs it), per
seed and pivot rule: the rule ``pivoting="auto"`` took, the signal rank of the sketch's spectrum, the clusters the
coreset misses (with their sizes and scales) and the protocol's risk.

    SKMM_BENCH_THREADS=1 .venv/bin/python bench/pivot_coverage.py --cell d10:40 --seeds 8
→ a table on stdout and bench/out/pivot_coverage_<config>_<n>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import robustness

    from skmm.select import SkMM
    from skmm.select.spectrum import signal_rank
    from skmm.synthetic.risk import ridge_risk

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", required=True, help="configuration:n, e.g. d10:40")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--pivotings", default="auto,greedy_signal,greedy,sampled")
    args = parser.parse_args()
    name, n = args.cell.split(":")
    configs = {c["name"]: c for c in robustness.all_configs()}
    if name not in configs:
        raise SystemExit(f"unknown configuration {name!r}")
    cfg, n = configs[name], int(n)
    pool = robustness.make_pool(cfg)
    present = np.flatnonzero(pool.sizes)
    rows = []
    for seed in range(args.seeds):
        for pivoting in args.pivotings.split(","):
            sel = SkMM(n, sketch_dim=cfg["sketch_dim"], random_state=seed, pivoting=pivoting).fit(pool.X)
            info = sel.selection_.info
            missed = np.setdiff1d(present, pool.cluster[sel.indices_])
            rows.append({"seed": seed, "pivoting": pivoting, "took": info.get("pivoting"),
                         "signal_rank": signal_rank(np.asarray(info["eigenvalues"])),
                         "missed": missed.tolist(), "missed_sizes": pool.sizes[missed].tolist(),
                         "missed_scales": pool.scales[missed].tolist(),
                         "risk": ridge_risk(pool.X, pool.y, sel.indices_)[0]})
            r = rows[-1]
            print(f"| {seed} | {pivoting} ({r['took']}) | {r['signal_rank']} | {r['missed']} | {r['missed_sizes']} | "
                  f"{r['risk']:.3g} |", flush=True)
    out = {"config": cfg, "n": n, "sizes": pool.sizes.tolist(), "scales": pool.scales.tolist(), "rows": rows}
    path = Path(os.environ.get("SKMM_BENCH_OUT", Path(__file__).parent / "out")) / f"pivot_coverage_{name}_{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    for piv in args.pivotings.split(","):
        sub = [r for r in rows if r["pivoting"] == piv]
        print(f"{piv}: seeds missing a cluster {sum(bool(r['missed']) for r in sub)} of {len(sub)}, "
              f"mean risk {np.mean([r['risk'] for r in sub]):.3g}")
    print("wrote", path)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    with threadpool_limits(int(os.environ.get("SKMM_BENCH_THREADS", "1"))):
        main()
