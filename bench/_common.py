"""Shared helpers for the benchmark scripts: timing, peak memory, and appending results to a JSON log."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

OUT = pathlib.Path(os.environ.get("SKMM_BENCH_OUT", pathlib.Path(__file__).resolve().parent / "out"))


def best_of(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(median, min) wall seconds of fn over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "processor": platform.processor() or platform.machine()}


def record(name: str, result: dict) -> pathlib.Path:
    """Write bench/out/<name>.json (atomically) and print it."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2))
    tmp.replace(path)
    print(json.dumps(result, indent=2))
    return path


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out
