"""Per-step cost of SkMM's moment matching at N=100 000, m=128, n=1 000, against two baselines:

(i)  the floor: one pass ``P.T @ w`` + ``P @ g`` in float32 numpy (the two products any first-order step needs);
(ii) the authors' per-step formulation: the m×m coreset moment Sᵀdiag(w)S recomputed every step in float64,
     rotated into the pool's eigenbasis, differentiated by autograd, one Adam step, clamp-and-renormalise.

Our per-step time = (time of K steps − time of 0 steps) / K, so the one-off setup (eigendecomposition, P) is
excluded, as it is for the baselines. Run: .venv/bin/python bench/moment_matching_step.py [--n-samples N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import best_of, record

from skmm.select.moment_matching import _eigen_moments, moment_matching_weights


def authors_step_factory(S: np.ndarray, n: int, seed: int = 0):
    """One step of the authors' formulation (sketchy_mm_selection in their synthetic notebook), float64."""
    g = torch.Generator().manual_seed(seed)
    St = torch.from_numpy(S.astype(np.float64))
    N, m = St.shape
    lam, V = _eigen_moments(S)
    eigval, eigvec = torch.from_numpy(lam), torch.from_numpy(V)
    selector = torch.zeros(N, dtype=torch.float64)
    selector[torch.randperm(N, generator=g)[:n]] = 1.0 / n
    selector.requires_grad_(True)
    multiplier = (1 / 0.999 + torch.rand(m, generator=g, dtype=torch.float64) * (1 - 1 / 0.999)).requires_grad_(True)
    opt = torch.optim.Adam([selector, multiplier], lr=1e-5)

    def step() -> None:
        opt.zero_grad()
        rotated = (((St.T * selector) @ St) @ eigvec * eigvec).sum(0)
        loss = (rotated - multiplier * eigval).pow(2).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            selector.clamp_(0, 1 / n)
            selector.div_(selector.sum())
            multiplier.clamp_(min=1 / 0.999)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-samples", type=int, default=100_000)
    parser.add_argument("--sketch-dim", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1_000)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    N, m, n, K = args.n_samples, args.sketch_dim, args.budget, args.steps
    rng = np.random.default_rng(0)
    S = (rng.standard_normal((N, m)) * np.linspace(3, 0.1, m)).astype(np.float32)
    S[: N // 10] *= 4.0  # a heavy cluster, so coverage constraints bind

    init = np.zeros(N)
    init[rng.choice(N, n, replace=False)] = 1.0 / n

    def ours(steps: int):
        return lambda: moment_matching_weights(S, n, max_iter=steps, tol=0.0, init=init)

    setup, _ = best_of(ours(0), repeats=3)
    total, _ = best_of(ours(K), repeats=3)
    _, info = moment_matching_weights(S, n, max_iter=K, tol=0.0, init=init)
    ours_step = (total - setup) / info["steps"]

    P = S.astype(np.float32) ** 2
    w = np.full(N, 1.0 / N, dtype=np.float32)
    gvec = np.ones(m, dtype=np.float32)
    floor_step, _ = best_of(lambda: (P.T @ w, P @ gvec), repeats=20)

    authors = authors_step_factory(S, n)
    start = time.perf_counter()
    for _ in range(5):
        authors()
    authors_step = (time.perf_counter() - start) / 5

    record("moment_matching_step", {
        "N": N, "m": m, "n": n, "steps_timed": info["steps"],
        "ours_ms_per_step": round(ours_step * 1e3, 3),
        "ours_setup_s": round(setup, 3),
        "floor_ms_per_step": round(floor_step * 1e3, 3),
        "authors_ms_per_step": round(authors_step * 1e3, 3),
        "ours_over_floor": round(ours_step / floor_step, 2),
        "authors_over_ours": round(authors_step / ours_step, 1),
        "targets": {"ours_over_floor": "<= 3", "authors_over_ours": ">= 20"},
    })


if __name__ == "__main__":
    main()
