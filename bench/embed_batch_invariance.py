"""Batch invariance of the embed stage: are an image's features the same bits whatever the batch size, shard
split and row order, and what does making them so cost?

Images: the first N sklearn digits as PNGs at the model's input size (as in embed_throughput.py). Model: random
init, seed 0, fp32. Ways to encode, each checked against its own reference (one shard, batch size 64):

- ``batched``: the embed stage before the fix: each ``batch_size`` chunk is one forward pass, so a shard's last
  (short) batch has another shape;
- ``pad_batch`` (a): every chunk zero-padded to ``batch_size`` rows, pad rows dropped;
- ``batched_deterministic``, ``batched_onednn_off`` (c): ``batched`` under ``torch.use_deterministic_algorithms``
  or with oneDNN (mkldnn) off;
- ``block`` (b): ``embed_images`` as it is now: fixed blocks of ``spec.block_rows`` images (the device's
  ``default_block_rows``, or ``--block-rows``) whatever ``batch_size``.

Checks: 3 and 7 contiguous shards, batch sizes 1 and 7, a random row order, and (``block`` only) 1 thread;
each gives the rows bitwise equal (out of N) and the max |difference|. Then throughput, decode + preprocess +
encode: ``block`` (``embed_images``) against ``batched`` at batch size 64, alternating runs (and who goes
first) after a warm-up; best-of and median images/s, and CPU seconds. Other jobs on a shared 2-core machine
move single runs by ±15%: read the ratio of medians beside the best-of one. About 4 minutes for ViT-S-32 on the
2-core CPU, 20 s for the tiny tower.

    .venv/bin/python bench/embed_batch_invariance.py [--model ViT-S-32] [--n 500] [--n-check 133]
                                                     [--repeats 5] [--device cpu] [--block-rows 64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.use_deterministic_algorithms (the ``batched_deterministic`` way) needs cuBLAS's fixed workspace on CUDA, set
# before CUDA starts: without it the first matmul raises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import peak_rss_mb, record
from embed_throughput import digit_pngs

from skmm._cuda_math import ieee_fp32
from skmm.models import ClipSpec, embed_images, load_clip
from skmm.models import clip as clip_module


def batched(model, preprocess, images: list[bytes], batch_size: int, device: torch.device,
            pad: bool = False) -> np.ndarray:
    """The former embed_images loop (one forward pass per chunk); ``pad`` zero-pads each chunk to batch_size."""
    rows = []
    with ieee_fp32(device), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = torch.stack([clip_module._decode(b, start + i, preprocess) for i, b in enumerate(chunk)])
            n = len(x)
            if pad and n < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
            f = torch.nn.functional.normalize(model.encode_image(x.to(device)).float(), dim=-1)
            rows.append(f[:n].cpu().numpy())
    return np.concatenate(rows)


@contextlib.contextmanager
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"rows_bitwise_equal": int((a == b).all(axis=1).sum()), "max_abs_diff": float(np.abs(a - b).max())}


def invariance(fn: Callable[[list[bytes], int], np.ndarray], images: list[bytes], extra: dict | None = None) -> dict:
    """fn(images, batch_size) → features; every check against fn(images, 64)."""
    reference = fn(images, 64)
    idx = np.arange(len(images))
    out = {}
    for k in (3, 7):
        parts = [fn([images[i] for i in part], 64) for part in np.array_split(idx, k)]
        out[f"shards_{k}"] = compare(np.concatenate(parts), reference)
    for bs in (1, 7):
        out[f"batch_size_{bs}"] = compare(fn(images, bs), reference)
    order = np.random.default_rng(0).permutation(len(images))
    out["row_order"] = compare(fn([images[i] for i in order], 64), reference[order])
    for name, other in (extra or {}).items():
        out[name] = compare(other(), reference)
    out["all_bitwise"] = all(v["max_abs_diff"] == 0.0 for v in out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--n", type=int, default=500, help="images for the throughput runs")
    parser.add_argument("--n-check", type=int, default=133,
                        help="images for the invariance checks (133 = 2·64 + 5: a short last batch, as digits' "
                             "1797 = 28·64 + 5 in one shard)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-rows", type=int, default=None,
                        help="another fixed block size (ClipSpec.block_rows; default: the device's, "
                             "default_block_rows)")
    args = parser.parse_args()

    device = torch.device(args.device)
    block_rows = args.block_rows if args.block_rows is not None else clip_module.default_block_rows(device)
    spec = ClipSpec(args.model, init_seed=0, block_rows=block_rows)
    images = digit_pngs(max(args.n, args.n_check), spec.image_size)
    check = images[: args.n_check]
    model, preprocess = load_clip(spec, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def old(ims, bs):
        return batched(model, preprocess, ims, bs, device)

    def new(ims, bs):
        return embed_images(ims, spec, batch_size=bs, device=device)

    def onednn_off(ims, bs):
        with torch.backends.mkldnn.flags(enabled=False):
            return old(ims, bs)

    def det(ims, bs):
        with deterministic():
            return old(ims, bs)

    checks = {
        "batched": invariance(old, check),
        "pad_batch": invariance(lambda ims, bs: batched(model, preprocess, ims, bs, device, pad=True), check),
        "batched_deterministic": invariance(det, check),
        "batched_onednn_off": invariance(onednn_off, check),
        "block": invariance(new, check, {"threads_1": lambda: embed_images(
            check, spec, batch_size=64, device=device, num_threads=1)}),
    }
    for name, result in checks.items():
        summary = {k: v["rows_bitwise_equal"] for k, v in result.items() if isinstance(v, dict)}
        print(f"{name:>22}: all bitwise {result['all_bitwise']!s:5}  rows equal of {len(check)}: {summary}",
              flush=True)

    run_images = images[: args.n]
    runs = {"batched": lambda: old(run_images, 64), "block": lambda: new(run_images, 64)}
    for fn in runs.values():  # warm-up (embed_images loads and caches its model here)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:  # alternate who goes first
            fn = runs[name]
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ips = {k: args.n / min(v) for k, v in times.items()}
    suffix = f"_{args.model}" + (f"_{device.type}" if device.type != "cpu" else "")
    suffix += f"_block{args.block_rows}" if args.block_rows is not None else ""
    record(f"embed_batch_invariance{suffix}", {
        "model": args.model, "pretrained": None, "init_seed": 0, "image_size": spec.image_size,
        "device": str(device), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "n_check": args.n_check, "checks": checks,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),  # every way ran under it
        "n_images": args.n, "batch_size": 64, "block_rows": spec.block_rows,
        "padded_rows_per_call": -args.n % spec.block_rows, "repeats": args.repeats,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "cpu_seconds": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
        "batched_images_per_s": round(ips["batched"], 1), "block_images_per_s": round(ips["block"], 1),
        "ratio_block_over_batched": round(ips["block"] / ips["batched"], 3),
        "ratio_of_medians": round(statistics.median(times["batched"]) / statistics.median(times["block"]), 3),
        "ratio_of_cpu_seconds": round(min(cpu["batched"]) / min(cpu["block"]), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })


if __name__ == "__main__":
    main()
