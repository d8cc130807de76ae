"""Sketch throughput for linear-head gradients (p − y) ⊗ φ with d=512, C=196 (r = 100 352) → m=512, rows/s:

- kronecker:     KroneckerProjector.project_factors — never forms the C·d gradient, O((C + d)·m) per row;
- dense_blocked: GaussianProjector on the formed gradient, Γ regenerated block by block from its seed
                 (cache off: the bounded-memory mode; and cache on: blocks kept after the first batch);
- materialised:  form the gradient, multiply by one stored dense Γ (r × m float32, 196 MiB).
Target: kronecker >= 20× materialised. Run: .venv/bin/python bench/sketch_throughput.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import record

from skmm.sketch import GaussianProjector, KroneckerProjector


def rows_per_second(fn, batch: int, seconds: float = 3.0, sync=lambda: None) -> float:
    fn()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += batch
    sync()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    C, d, m, B = 196, 512, 512, args.batch
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    residual = (torch.rand(B, C, generator=g) / C).to(dev)
    residual[torch.arange(B), torch.randint(0, C, (B,), generator=g)] -= 1.0
    phi = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1).to(dev)

    def formed() -> torch.Tensor:
        return (residual[:, :, None] * phi[:, None, :]).reshape(B, C * d)

    kron = KroneckerProjector(C, d, m, random_state=0).fit()
    dense_nocache = GaussianProjector(C * d, m, random_state=0, block_rows=4096, cache_bytes=0).fit()
    dense_cache = GaussianProjector(C * d, m, random_state=0, block_rows=4096, cache_bytes=2**30).fit()
    stored = torch.randn(C * d, m, generator=g).div_(m**0.5).to(dev)

    results = {
        "kronecker": rows_per_second(lambda: kron.project_factors(residual, phi), B, args.seconds, sync),
        "dense_blocked_regenerated": rows_per_second(lambda: dense_nocache.project(formed()), B,
                                                     args.seconds, sync),
        "dense_blocked_cached": rows_per_second(lambda: dense_cache.project(formed()), B, args.seconds, sync),
        "materialised": rows_per_second(lambda: formed() @ stored, B, args.seconds, sync),
    }
    record(f"sketch_throughput_{dev.type}", {
        "C": C, "d": d, "m": m, "batch": B, "device": str(dev),
        "rows_per_s": {k: round(v, 1) for k, v in results.items()},
        "kronecker_over_materialised": round(results["kronecker"] / results["materialised"], 1),
        "target": "kronecker_over_materialised >= 20",
    })


if __name__ == "__main__":
    main()
