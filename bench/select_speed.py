"""A whole convex SkMM selection (pivoted seeding included) against the authors' formulation on the same pool.

N = 100 000, m = 128, n = 1 000, 50 clusters, one thread. The authors' step is timed over 5 steps (after one
warm-up) and scaled to 500 steps (our step count) and to 10^4 (their synthetic run, SKMM.md §6).
Run: .venv/bin/python bench/select_speed.py → bench/out/select_speed.json
"""

from __future__ import annotations

import json
import time

import numpy as np
from _common import OUT
from moment_matching_step import authors_step_factory
from threadpoolctl import threadpool_limits

from skmm.select import SkMM


def main() -> None:
    rng = np.random.default_rng(0)
    N, m, n = 100_000, 128, 1000
    centres = rng.normal(size=(50, m)) * 3
    S = (centres[rng.integers(0, 50, N)] + rng.normal(size=(N, m))).astype(np.float32)
    out: dict[str, float] = {}
    with threadpool_limits(1):
        for seeding in ("pivoted", "none"):
            start = time.perf_counter()
            sel = SkMM(n, seeding=seeding, random_state=0).fit(S)
            out[f"skmm_{seeding}_s"] = time.perf_counter() - start
            out[f"skmm_{seeding}_seeded"] = sel.selection_.info["seeded"]
        step = authors_step_factory(S, n)
        step()
        start = time.perf_counter()
        for _ in range(5):
            step()
        out["authors_step_s"] = (time.perf_counter() - start) / 5
    out["ratio_at_500_steps"] = out["authors_step_s"] * 500 / out["skmm_pivoted_s"]
    out["ratio_at_1e4_steps"] = out["authors_step_s"] * 1e4 / out["skmm_pivoted_s"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "select_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
