"""MKL's reproducible mode (CNR, ``MKL_CBWR=AUTO``): what it fixes and what it costs.

Each arm runs in a fresh interpreter, since MKL reads its mode at its first call: ``off`` starts MKL before
importing skmm (the mode stays off, as before skmm set it), ``auto`` imports skmm first (the default now).
Measured in each: how many of 8 192 rows change bits when shifted by three places in an 8192×64 by 64×N product
(N = 1–16); ViT-S-32's features of --n ~56 KB JPEGs (bench/scale_pool.py's images) in the calling process
(2 torch threads, no worker processes), best of --repeats; the tiny tower's FT gradient sketch (10 classes,
k = 1, m = 64) of the same images. Their sha256 tells whether the mode changed the bits.

    .venv/bin/python bench/mkl_cnr.py [--n 256] [--repeats 3]
→ bench/out/mkl_cnr.json (or $SKMM_BENCH_OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from _common import record

CHILD = """
import hashlib, json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
if {off}:
    torch.randn(8, 4) @ torch.randn(4, 6)  # MKL starts before skmm: its reproducible mode stays off
sys.path.insert(0, {bench!r})
import numpy as np
from embed_throughput import jpegs
from skmm.gradients.clip_ft import ft_gradient_sketch
from skmm.mkl_reproducibility import mkl_cnr_branch
from skmm.models import TINY_MODEL, ClipSpec, embed_images

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
moved = {{}}
for n in range(1, 17):
    X, P = torch.randn(8192, 64, generator=g), torch.randn(64, n, generator=g)
    moved[n] = int((X @ P != torch.roll(torch.roll(X, 3, 0) @ P, -3, 0)).any(1).sum())
images = jpegs({n})
spec = ClipSpec("ViT-S-32", init_seed=0)
embed_images(images[:64], spec, device="cpu", decode_workers=0, encode_workers=0)  # the tower, built once
embed_s = []
for _ in range({repeats}):
    t = time.perf_counter()
    features = embed_images(images, spec, device="cpu", decode_workers=0, encode_workers=0)
    embed_s.append(time.perf_counter() - t)
ids = [str(i) for i in range(len(images))]
ft_s = []
for _ in range({repeats}):
    t = time.perf_counter()
    rows, _ = ft_gradient_sketch(images, ids, ClipSpec(TINY_MODEL, init_seed=0), k=1, num_classes=10,
                                 sketch_dim=64, seed=0, batch_size=32, device="cpu")
    ft_s.append(time.perf_counter() - t)
sha = lambda a: hashlib.sha256(np.ascontiguousarray(a)).hexdigest()
print(json.dumps({{"mkl_cnr_branch": mkl_cnr_branch(), "rows_moved_by_a_shift": moved,
                   "embed_vit_s_32_s": [round(x, 3) for x in embed_s], "features_sha256": sha(features),
                   "ft_sketch_tiny_s": [round(x, 3) for x in ft_s], "ft_rows_sha256": sha(rows)}}))
"""


def arm(off: bool, n: int, repeats: int) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = CHILD.format(off=off, bench=os.path.dirname(os.path.abspath(__file__)), n=n, repeats=repeats)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    arms = {}
    for name in ("off", "auto", "off", "auto"):  # alternating, twice
        result = arm(name == "off", args.n, args.repeats)
        arms.setdefault(name, []).append(result)
        print(name, result, flush=True)
    best = {name: {key: min(min(r[key]) for r in runs) for key in ("embed_vit_s_32_s", "ft_sketch_tiny_s")}
            for name, runs in arms.items()}
    summary = {"time_auto_over_off": {key: round(best["auto"][key] / best["off"][key], 3)
                                      for key in best["off"]},
               "features_bitwise_equal": len({r["features_sha256"] for runs in arms.values() for r in runs}) == 1,
               "ft_rows_bitwise_equal": len({r["ft_rows_sha256"] for runs in arms.values() for r in runs}) == 1}
    print(record("mkl_cnr", {"n": args.n, "repeats": args.repeats, "cores": len(os.sched_getaffinity(0)),
                             "arms": arms, "best_s": best, **summary}))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
