"""Decoding in threads (issue 12): how far Pillow's decoding and resizing and torch's preprocessing ops release the
GIL. Where a process may not fork (a daemonic Dask worker) and a GPU encodes, ``skmm.models.clip`` decodes in
threads instead of worker processes; this measures what threads give over one thread, on ~56 KB 256×256 JPEGs
(bench/scale_pool.py's images) with ViT-S-32's preprocessing, in the embed stage's 64-image decode jobs.

    .venv/bin/python bench/decode_threads.py [--n 512] [--threads 2] [--repeats 3] [--torch-threads 1]
→ bench/out/decode_threads[_torchN].json (or $SKMM_BENCH_OUT). Asserted: the threads' tensors equal one thread's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import record
from embed_throughput import jpegs

from skmm.models.clip import DECODE_JOB_ROWS, MAX_PIXELS, ClipSpec, _cached_model, _decode_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's intra-op threads during the decode (the stage sets 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)  # 1 as in the stage: the parallelism is the decode threads'
    _, preprocess = _cached_model(ClipSpec("ViT-S-32", init_seed=0), torch.device("cpu"))
    images = jpegs(args.n)
    starts = range(0, args.n, DECODE_JOB_ROWS)

    def job(start: int) -> torch.Tensor:
        return _decode_stack(images[start:start + DECODE_JOB_ROWS], start, preprocess, MAX_PIXELS)

    one, many = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        serial = torch.cat([job(s) for s in starts])
        one.append(time.perf_counter() - t)
        with ThreadPoolExecutor(args.threads) as pool:
            t = time.perf_counter()
            threaded = torch.cat(list(pool.map(job, starts)))
            many.append(time.perf_counter() - t)
        assert torch.equal(serial, threaded), "threads changed the decoded tensors"
    result = {"n": args.n, "threads": args.threads, "torch_threads": args.torch_threads, "repeats": args.repeats,
              "cores": len(os.sched_getaffinity(0)),
              "load_average": list(os.getloadavg()),
              "seconds_one_thread": [round(x, 3) for x in one], "seconds_threads": [round(x, 3) for x in many],
              "images_per_s_one_thread": round(args.n / statistics.median(one), 1),
              "images_per_s_threads": round(args.n / statistics.median(many), 1),
              "speedup_median": round(statistics.median(one) / statistics.median(many), 3)}
    record("decode_threads" + ("" if args.torch_threads == 1 else f"_torch{args.torch_threads}"), result)


if __name__ == "__main__":
    main()
