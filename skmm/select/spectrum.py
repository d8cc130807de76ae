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
- ``pivoting_for``: convex SkMM's pivot rule for the seeding ("auto"): greedy through the signal rank when the
  budget is under 5 × the signal rank, where sampled pivots can miss a small cluster; sampled otherwise.
- ``auto_sketch_dim``: the sketch dimension m, from the spectrum of a wider sketch: max(64, 2 × signal rank),
  at most the spectrum's size. The budget does not enter (budgets below m are the seeding rule's business).
The rules were chosen on the validation half of bench/robustness.py (bench/README.md, "SkMM off its tuning pool");
the automatic m also on digits' val split (bench/auto_m.py), where energy-share rules failed: the moment is
uncentred, so its mean direction alone holds 98 % of the energy of CLIP-like features, and on the protocol's
pools a small cluster's direction carries almost no energy but decides the risk.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AUTO_M_FLOOR", "AUTO_M_RANK_MULTIPLE", "TIGHT_BUDGET_MULTIPLE", "TIGHT_PIVOTING", "auto_sketch_dim",
           "pivoting_for", "ridge_for", "seed_count", "signal_rank", "spectral_ridge"]

AUTO_M_FLOOR = 64  # automatic m: at least this many leading directions …
AUTO_M_RANK_MULTIPLE = 2  # … and at least this multiple of the signal rank (many clusters need more)
TIGHT_BUDGET_MULTIPLE = 5  # pivoting="auto": a budget below this multiple of the signal rank is "tight"
TIGHT_PIVOTING = "greedy_signal"  # … and takes these pivots (bench/auto_m.py compares others on the protocol)


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


def pivoting_for(n: int, rank: int) -> str:
    """Convex SkMM's ``pivoting="auto"``: ``TIGHT_PIVOTING`` ("greedy_signal") when the budget is tight, n < 5 × the
    signal rank — a few rows per signal direction (a cluster), where sampled pivots can leave a small cluster out
    and the coreset has no estimate of its label — else "sampled" (the authors' rule; greedy pivots at every budget
    lost where the budget leaves room: once each cluster has a row the arg-max takes the noisiest ones). The
    multiple was chosen among 1.5, 2, 3, 5 and ∞ (always greedy) on the protocol's validation half and development
    family (bench/README.md §14, "Convex SkMM at a tight budget")."""
    return TIGHT_PIVOTING if n < TIGHT_BUDGET_MULTIPLE * rank else "sampled"


def auto_sketch_dim(lam: np.ndarray, floor: int = AUTO_M_FLOOR, rank_multiple: int = AUTO_M_RANK_MULTIPLE) -> int:
    """m = max(``floor``, ``rank_multiple`` × :func:`signal_rank`), never more than the spectrum has.

    Why not an energy share: energy follows the mean direction and the large clusters, while the risk depends
    on covering the small ones (bench/README.md, "The automatic sketch dimension")."""
    lam = _check(lam)
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1 or not rank_multiple > 0:
        raise ValueError(f"floor must be a positive integer and rank_multiple positive; got {floor}, {rank_multiple}")
    return int(min(lam.size, max(floor, int(np.ceil(rank_multiple * signal_rank(lam))))))
