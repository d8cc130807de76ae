"""SkMM end to end at N=1 000 000, m=64, n=10 000: wall time and peak memory (targets: < 2 min, < 4 GB).

The input is the pool's sketch G̃ (N × m, float32) — what the gradients + sketch stage hands to selection.
Timed: validation, eigendecomposition, P, the projected-gradient solve (default 500 steps) and the systematic
discretisation. Peak memory is the process's peak RSS (imports included) and the increase over the RSS
before selection. Run: .venv/bin/python bench/skmm_end_to_end.py [--n-samples N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import peak_rss_mb, record

from skmm.select import SkMM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--budget", type=int, default=10_000)
    parser.add_argument("--max-iter", type=int, default=500)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    N, m = args.n_samples, args.sketch_dim
    centers = (rng.standard_normal((50, m)) * rng.uniform(0.5, 5.0, (50, 1))).astype(np.float32)
    S = np.empty((N, m), dtype=np.float32)
    for lo in range(0, N, 65536):  # drawn in chunks so the input's own construction does not set the peak
        rows = min(65536, N - lo)
        S[lo:lo + rows] = centers[rng.integers(0, 50, rows)] + 0.3 * rng.standard_normal((rows, m), np.float32)
    before = peak_rss_mb()
    start = time.perf_counter()
    sel = SkMM(args.budget, max_iter=args.max_iter, random_state=0).fit(S)
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    record("skmm_end_to_end", {
        "N": N, "m": m, "n": args.budget, "steps": sel.selection_.info["steps"],
        "relative_objective": sel.selection_.info["relative_objective"],
        "wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "rss_before_selection_mb": round(before, 1),
        "rss_increase_mb": round(peak - before, 1),
        "input_mb": round(S.nbytes / 2**20, 1),
        "targets": {"wall_s": "< 120", "peak_rss_mb": "< 4096"},
    })


if __name__ == "__main__":
    main()
