"""FT gradients + sketch on the CPU: shard calls one at a time against two at once (issue 12).

The FT sketch stage submits one task per shard through a window of 2 (tasks/shard_window.py), and Prefect's
thread pool runs them in threads of one process. On the CPU each call then computes its per-sample gradients with
all of torch's threads, beside the other call's: two OpenMP teams on the same cores. This script times
``--shards`` shards of ``--shard-rows`` distinct ~56 KB JPEGs (bench/scale_pool.py's images) through
``skmm.gradients.clip_ft.ft_gradient_sketch`` on the CPU, as the stage calls it (default batch and decode
workers), alternating two arms over ``--repeats``:

- ``one_at_a_time``: the shards in one thread, one after another;
- ``two_at_once``: a pool of 2 threads over the shards (the stage's default window).

The rows of both arms are asserted bitwise equal.

    .venv/bin/python bench/ft_concurrent.py [--model ViT-S-32] [--shards 4] [--shard-rows 64] [--repeats 3]
→ bench/out/ft_concurrent_<model>.json (or $SKMM_BENCH_OUT)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _common import record
from embed_throughput import jpegs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--sketch-dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=196)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    args = parser.parse_args()

    import torch

    from skmm.gradients.clip_ft import ft_gradient_sketch
    from skmm.models.clip import ClipSpec
    from storage.datasets import sample_id

    images = jpegs(args.shards * args.shard_rows)
    ids = [sample_id(b) for b in images]
    shards = [(images[i:i + args.shard_rows], ids[i:i + args.shard_rows])
              for i in range(0, len(images), args.shard_rows)]
    spec = ClipSpec(model=args.model)

    def call(shard: tuple[list[bytes], list[str]]) -> np.ndarray:
        rows, _ = ft_gradient_sketch(shard[0], shard[1], spec, k=args.k, num_classes=args.classes,
                                     sketch_dim=args.sketch_dim, seed=0, device="cpu")
        return rows

    def one_at_a_time() -> list[np.ndarray]:
        return [call(shard) for shard in shards]

    def two_at_once() -> list[np.ndarray]:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(call, shards))

    arms = {"one_at_a_time": one_at_a_time, "two_at_once": two_at_once}
    call(shards[0])  # warm-up: the model, the projector's cache, the kernels
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    rows: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            out = fn()
            seconds[name].append(round(time.perf_counter() - start, 2))
            rows[name] = np.concatenate(out)
    equal = np.array_equal(rows["one_at_a_time"], rows["two_at_once"])
    median = {name: statistics.median(s) for name, s in seconds.items()}
    n = len(images)
    result = {"model": args.model, "k": args.k, "sketch_dim": args.sketch_dim, "classes": args.classes,
              "shards": args.shards, "shard_rows": args.shard_rows, "cores": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "seconds": seconds,
              "median_seconds": median,
              "rows_per_s": {name: round(n / s, 1) for name, s in median.items()},
              "ratio_two_at_once_over_one_at_a_time": round(median["two_at_once"] / median["one_at_a_time"], 3),
              "rows_bitwise_equal": equal, "load_average": list(os.getloadavg())}
    print(result)
    record("ft_concurrent_" + args.model + args.tag, result)
    assert equal, "running two calls at once changed the rows"


if __name__ == "__main__":
    main()
