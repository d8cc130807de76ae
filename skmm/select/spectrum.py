"""Rules read off the sketched pool spectrum λ (eigenvalues of Σ̃ = SᵀS/N, descending): no tuning by the user.

- ``spectral_ridge``: the ridge ε at the spectrum's widest gap (in ratio), the geometric mean of the two
  eigenvalues on either side. Directions above it carry the pool's structure; the bulk below is the sketch's
  noise. SkMMv2 damps with it, and it decides how many directions count as signal.
- ``signal_rank``: how many eigenvalues lie above ε.
- ``ridge_for``: SkMMv2's ridge for a budget n: 0.1·tr(Σ̃)/m (the earlier, validated default) when n >= m; the
  spectral ridge when n < m.
- ``seed_count``: how many rows both SkMM variants take by randomly pivoted sampling before their own step:
  m when n >= m (as the authors' SkMMv2); when n < m, max(⌊n/2⌋, signal rank), capped at n — enough pivots to
  reach every signal direction (a small cluster is one), the rest of the budget left to the variant's own rule.
- ``auto_sketch_dim``: the sketch dimension m for a budget n, from the spectrum of a wider sketch.
The rules were chosen on the validation half of bench/robustness.py (bench/README.md, "SkMM off its tuning pool").
"""

from __future__ import annotations

import numpy as np

__all__ = ["AUTO_M_CAP", "AUTO_M_SHARE", "auto_sketch_dim", "ridge_for", "seed_count", "signal_rank",
           "spectral_ridge"]

AUTO_M_SHARE = 0.9  # automatic m: the smallest number of leading directions holding this share of the energy …
AUTO_M_CAP = 0.5  # … at most this fraction of the budget n (and at least AUTO_M_MIN)
AUTO_M_MIN = 8


def _check(lam: np.ndarray) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("the spectrum must be a non-empty 1-d array of finite eigenvalues")
    return np.sort(np.maximum(lam, 0.0))[::-1]


def spectral_ridge(lam: np.ndarray) -> float:
    """ε at the widest ratio gap λ_j/λ_{j+1} of the spectrum: √(λ_j λ_{j+1}); λ_1/10 for a single eigenvalue."""
    lam = _check(lam)
    if lam[0] <= 0:
        return 1e-300
    floor = lam[0] * 1e-12  # eigenvalues below this are round-off: they never define the gap
    clipped = np.maximum(lam, floor)
    if clipped.size == 1:
        return float(clipped[0] / 10)
    j = int(np.argmax(clipped[:-1] / clipped[1:]))
    return float(np.sqrt(clipped[j] * clipped[j + 1]))


def signal_rank(lam: np.ndarray, ridge: float | None = None) -> int:
    """The number of eigenvalues above ``ridge`` (default: :func:`spectral_ridge`)."""
    lam = _check(lam)
    eps = spectral_ridge(lam) if ridge is None else ridge
    return int(np.count_nonzero(lam > eps))


def ridge_for(lam: np.ndarray, n: int, relative: float = 0.1) -> float:
    """SkMMv2's ridge for budget n: ``relative``·tr(Σ̃)/m when n >= m, :func:`spectral_ridge` when n < m."""
    lam = _check(lam)
    if n >= lam.size:
        return float(relative * lam.sum() / lam.size)
    return spectral_ridge(lam)


def seed_count(n: int, m: int, rank: int) -> int:
    """Rows seeded by randomly pivoted sampling: m when n >= m, else min(n, max(⌊n/2⌋, rank))."""
    if n >= m:
        return m
    return min(n, max(n // 2, rank))


def auto_sketch_dim(lam: np.ndarray, n: int, share: float = AUTO_M_SHARE, cap: float = AUTO_M_CAP,
                    minimum: int = AUTO_M_MIN) -> int:
    """The smallest m whose leading eigenvalues hold ``share`` of the energy, capped at ``cap``·n, at least
    ``minimum`` (and never more than the spectrum has)."""
    lam = _check(lam)
    if not 0 < share <= 1 or not cap > 0:
        raise ValueError(f"share must lie in (0, 1] and cap be positive; got {share}, {cap}")
    total = lam.sum()
    energy_m = lam.size if total <= 0 else int(np.searchsorted(np.cumsum(lam) / total, share - 1e-12) + 1)
    return int(min(lam.size, max(minimum, min(energy_m, int(cap * n)))))
