"""A whole convex SkMM selection (pivoted seeding included) against the authors' formulation on the same pool.

N = 100 000, m = 128, n = 1 000, 50 clusters, one thread. The authors' step is timed over 5 steps (after one
warm-up) and scaled to 500 steps (our step count) and to 10^4 (their synthetic run, SKMM.md §6).
The seeding alone (randomly pivoted rows, float64 blocks) is timed on the same pool; wall and CPU seconds (one
thread: CPU seconds do not count the other processes of a shared machine) and the load average are recorded.
Run: .venv/bin/python bench/select_speed.py → bench/out/select_speed.json (SKMM_BENCH_OUT=bench/results to publish)
"""

from __future__ import annotations

import inspect
import json
import os
import time

import numpy as np
from _common import OUT
from moment_matching_step import authors_step_factory
from threadpoolctl import threadpool_limits

from skmm.select import SkMM
from skmm.select.adaptive import randomly_pivoted_rows


def main() -> None:
    rng = np.random.default_rng(0)
    N, m, n = 100_000, 128, 1000
    centres = rng.normal(size=(50, m)) * 3
    S = (centres[rng.integers(0, 50, N)] + rng.normal(size=(N, m))).astype(np.float32)
    out: dict[str, object] = {"load_average_start": list(os.getloadavg())}
    with threadpool_limits(1):
        for seeding in ("pivoted", "none"):
            start, cpu = time.perf_counter(), time.process_time()
            sel = SkMM(n, seeding=seeding, random_state=0).fit(S)
            out[f"skmm_{seeding}_s"] = time.perf_counter() - start
            out[f"skmm_{seeding}_cpu_s"] = time.process_time() - cpu
            out[f"skmm_{seeding}_seeded"] = sel.selection_.info["seeded"]
        start, cpu = time.perf_counter(), time.process_time()  # the seeding alone: the pool is the selection sketch
        randomly_pivoted_rows(S, out["skmm_pivoted_seeded"], np.random.default_rng(0), block_rows=65536)
        out["seeding_s"] = time.perf_counter() - start
        out["seeding_cpu_s"] = time.process_time() - cpu
        if "cache_bytes" in inspect.signature(randomly_pivoted_rows).parameters:  # float64 blocks kept: 2x the sketch
            start, cpu = time.perf_counter(), time.process_time()
            randomly_pivoted_rows(S, out["skmm_pivoted_seeded"], np.random.default_rng(0), block_rows=65536,
                                  cache_bytes=1 << 30)
            out["seeding_kept_blocks_s"] = time.perf_counter() - start
            out["seeding_kept_blocks_cpu_s"] = time.process_time() - cpu
        step = authors_step_factory(S, n)
        step()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(5):
            step()
        out["authors_step_s"] = (time.perf_counter() - start) / 5
        out["authors_step_cpu_s"] = (time.process_time() - cpu) / 5
    out["seeding_share"] = out["seeding_s"] / out["skmm_pivoted_s"]
    out["seeding_share_cpu"] = out["seeding_cpu_s"] / out["skmm_pivoted_cpu_s"]
    out["ratio_at_500_steps_cpu"] = out["authors_step_cpu_s"] * 500 / out["skmm_pivoted_cpu_s"]
    out["ratio_at_500_steps"] = out["authors_step_s"] * 500 / out["skmm_pivoted_s"]
    out["ratio_at_1e4_steps"] = out["authors_step_s"] * 1e4 / out["skmm_pivoted_s"]
    out["load_average_end"] = list(os.getloadavg())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "select_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
