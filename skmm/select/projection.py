"""Exact Euclidean projection onto the capped simplex {w : 0 <= w_i <= cap, Σ w_i = total}.

The projection of v is w = clip(v − τ, 0, cap) for the unique shift τ with Σ w = total (KKT conditions).
s(τ) = Σ clip(v − τ, 0, cap) is piecewise linear and decreasing, so a safeguarded Newton iteration (the
exact root of the current linear piece, bisection when it leaves the bracket) reaches the root in a few O(N)
passes, accepted once s(τ) = total to 1e-12. Not clamp-then-renormalise (that is not a projection).
"""

from __future__ import annotations

import numpy as np

__all__ = ["project_capped_simplex"]


def project_capped_simplex(
    v: np.ndarray, cap: float, total: float = 1.0, tau0: float | None = None, max_iter: int = 200
) -> tuple[np.ndarray, float]:
    """Return (w, τ): the Euclidean projection of ``v`` onto {0 <= w <= cap, Σ w = total} and its shift.

    ``tau0`` warm-starts the search (pass the previous τ inside an optimisation loop).
    """
    v = np.asarray(v)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"v must be a non-empty 1-D array; got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("v has NaN or inf entries")
    if not (np.isfinite(cap) and np.isfinite(total) and cap > 0 and total > 0):
        raise ValueError(f"cap and total must be positive finite numbers; got cap={cap}, total={total}")
    N = v.size
    if cap * N < total * (1 - 1e-12):
        raise ValueError(f"infeasible: {N} entries capped at {cap} cannot sum to {total}")
    if cap * N <= total * (1 + 1e-12):  # the set is the single point w = cap
        return np.full_like(v, cap, dtype=np.result_type(v, np.float64)), float(v.min() - cap)

    lo, hi = float(v.min()) - cap, float(v.max())  # s(lo) = N·cap > total, s(hi) = 0 < total
    warm = tau0 is not None and np.isfinite(tau0)
    tau = float(np.clip(tau0, lo, hi)) if warm else 0.5 * (lo + hi)
    shifted = np.empty_like(v, dtype=np.float64)
    for _ in range(max_iter):
        np.subtract(v, tau, out=shifted)
        upper = shifted >= cap
        free = shifted > 0
        free &= ~upper
        n_free = int(np.count_nonzero(free))
        n_upper = int(np.count_nonzero(upper))
        s = float(np.sum(shifted, where=free)) + cap * n_upper
        if s == total:
            break
        if s > total:
            lo = tau
        else:
            hi = tau
        if n_free:
            # Newton step = the exact root of s on the current linear piece; accept it when s(root) = total.
            newton = (float(np.sum(v, where=free)) + cap * n_upper - total) / n_free
            if lo < newton < hi:
                np.subtract(v, newton, out=shifted)
                np.clip(shifted, 0.0, cap, out=shifted)
                if abs(float(shifted.sum()) - total) <= 1e-12 * total:
                    tau = newton
                    break
                tau = newton
                continue
        tau = 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(lo), abs(hi)):
            break
    w = np.clip(v - tau, 0.0, cap)
    return w, float(tau)
