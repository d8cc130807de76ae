"""Block workers' own memory against the estimate that caps how many start (issue 12).

Embeds ``--n`` distinct ~56 KB JPEGs (bench/scale_pool.py's images) with ``--workers`` block workers for each
model in ``--models`` (random init, fp32, 64-image blocks) and samples every 20 ms each worker's private memory
(``Private_Clean + Private_Dirty`` of /proc/<pid>/smaps_rollup: the pages it does not share with the parent,
so the tower's weights, shared copy-on-write, are left out). Reports the peak per worker beside
``skmm.models.clip._block_worker_bytes`` for the same block, and asserts the estimate is not below what was
measured (the estimate exists so that many cores with a large tower cannot exhaust the memory).

    .venv/bin/python bench/block_worker_memory.py [--models ViT-S-32,ViT-B-32,RN50,RN101] [--n 384] [--workers 2]
→ bench/out/block_worker_memory.json (or $SKMM_BENCH_OUT)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import record, tree_pids
from embed_throughput import jpegs


def private_kib(pid: int) -> int:
    """Private_Clean + Private_Dirty of ``pid`` in KiB (0 once it is gone)."""
    total = 0
    try:
        for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except OSError:
        return 0
    return total


class Sampler(threading.Thread):
    """Peak private memory of each child process of this one while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop, self.peaks = threading.Event(), {}

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in tree_pids(os.getpid())[1:]:
                self.peaks[pid] = max(self.peaks.get(pid, 0), private_kib(pid))
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-S-32,ViT-B-32,RN50,RN101")
    parser.add_argument("--n", type=int, default=384)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch

    from skmm.models.clip import ClipSpec, _block_worker_bytes, _cached_model, embed_images, shutdown_worker_pools

    images = jpegs(args.n)
    results = {}
    for name in args.models.split(","):
        spec = ClipSpec(model=name)
        model, _ = _cached_model(spec, torch.device("cpu"))
        estimate = _block_worker_bytes(model, spec.block_rows)
        sampler = Sampler()
        sampler.start()
        start = time.perf_counter()
        embed_images(images, spec, device="cpu", encode_workers=args.workers)
        seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        shutdown_worker_pools()
        peaks = sorted(round(kib / 1024, 1) for kib in sampler.peaks.values() if kib)
        results[name] = {"block_rows": spec.block_rows, "worker_private_peak_mib": peaks,
                         "estimate_mib": None if estimate is None else round(estimate / 2**20, 1),
                         "seconds": round(seconds, 1)}
        print(name, results[name], flush=True)
    record("block_worker_memory", {"n_images": args.n, "workers": args.workers, "models": results})
    low = {name: r for name, r in results.items()
           if r["estimate_mib"] is not None and r["worker_private_peak_mib"]
           and r["estimate_mib"] < max(r["worker_private_peak_mib"])}
    assert not low, f"estimates below the measured peaks: {low}"


if __name__ == "__main__":
    main()
