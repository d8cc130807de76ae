"""Leverage-score sampling baselines: truncated, ridge, and sketched ridge leverage.

Scores are computed from a (randomised) SVD of X with at most ``max_rank`` components — never an N×N matrix —
then n rows are sampled without replacement ∝ score.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.extmath import randomized_svd

from skmm._validation import check_positive_int
from skmm.select.base import BaseSelector
from skmm.select.moment_matching import sketch_pool

__all__ = ["Leverage", "RidgeLeverage", "SketchedRidgeLeverage", "ridge_leverage_scores"]


def _top_svd(X: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_k, σ_k) of X: exact through the d×d Gram when d is small, randomised SVD otherwise."""
    N, d = X.shape
    k = min(k, N, d)
    if d <= 1024:
        gram = X.T.astype(np.float64) @ X
        lam, V = np.linalg.eigh(gram)
        order = np.argsort(-lam)[:k]
        sigma = np.sqrt(np.maximum(lam[order], 0.0))
        # eigh(XᵀX) resolves σ only down to ≈ √eps·σ_max: smaller ones are round-off, not rank.
        keep = sigma > sigma.max() * 1e-6 if sigma.size and sigma.max() > 0 else np.zeros(k, bool)
        U = (X @ V[:, order[keep]]) / sigma[keep]
        return U, sigma[keep]
    U, sigma, _ = randomized_svd(X, k, n_oversamples=20, n_iter=7, random_state=seed)
    return U, sigma


def ridge_leverage_scores(X: np.ndarray, alpha: float, max_rank: int = 1024, seed: int = 0) -> np.ndarray:
    """ℓ_i = Σ_j U_ij² σ_j²/(σ_j² + α) = x_iᵀ(XᵀX + αI)⁻¹x_i.

    The top components are computed with a growing rank (64, 128, … up to ``max_rank``) until σ_k² falls
    below α/100; the energy left outside them is then counted at the rate 1/(α + σ_k²), which is within 1%
    of its exact contribution. Exact whenever rank(X) is reached first.
    """
    if not alpha > 0:
        raise ValueError(f"ridge alpha must be positive; got {alpha}")
    k = min(64, max_rank)
    while True:
        U, sigma = _top_svd(X, k, seed)
        s2 = sigma**2
        if U.shape[1] < k or k >= min(max_rank, *X.shape) or s2[-1] <= alpha / 100:
            break
        k = min(2 * k, max_rank)
    scores = (U**2) @ (s2 / (s2 + alpha))
    if U.shape[1] < min(X.shape):
        tail = np.maximum(np.einsum("ij,ij->i", X, X) - (U**2) @ s2, 0.0)
        scores += tail / (alpha + (s2[-1] if s2.size else 0.0))
    return scores


def _sample(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    positive = np.flatnonzero(scores > 0)
    if positive.size < n:
        raise ValueError(f"only {positive.size} rows have a positive leverage score; cannot sample n={n}")
    p = scores[positive] / scores[positive].sum()
    return positive[rng.choice(positive.size, size=n, replace=False, p=p)]


class Leverage(BaseSelector):
    """Truncated leverage: ℓ_i = ‖U_{i,1:k}‖² from the top-k SVD of X; sample ∝ ℓ. k defaults to n."""

    method = "leverage"

    def __init__(self, n: int, rank: int | None = None, random_state: int | None = 0) -> None:
        super().__init__(n, random_state)
        self.rank = rank

    def _select(self, X, y, rng):
        k = check_positive_int(self.rank if self.rank is not None else self.n, "rank")
        U, _ = _top_svd(X, k, int(rng.integers(2**31)))
        scores = np.einsum("ij,ij->i", U, U)
        return _sample(scores, self.n, rng), None, scores, {"rank": int(U.shape[1])}


class RidgeLeverage(BaseSelector):
    """Ridge leverage ℓ_i = x_iᵀ(XᵀX + αI)⁻¹x_i; sample ∝ ℓ. ``alpha=None``: α = ‖X‖_F² / n."""

    method = "ridge_leverage"

    def __init__(self, n: int, alpha: float | None = None, max_rank: int = 1024,
                 random_state: int | None = 0) -> None:
        super().__init__(n, random_state)
        self.alpha = alpha
        self.max_rank = max_rank

    def _pool(self, X, rng):
        return X, None

    def _select(self, X, y, rng):
        Z, spec = self._pool(X, rng)
        alpha = self.alpha if self.alpha is not None else float(np.einsum("ij,ij->", Z, Z)) / self.n
        scores = ridge_leverage_scores(Z, alpha, check_positive_int(self.max_rank, "max_rank"),
                                       int(rng.integers(2**31)))
        return _sample(scores, self.n, rng), None, scores, {"alpha": alpha, "sketch": spec}


class SketchedRidgeLeverage(RidgeLeverage):
    """Ridge leverage of the Gaussian sketch XΓ (m = ``sketch_dim`` columns)."""

    method = "sketched_ridge_leverage"

    def __init__(self, n: int, sketch_dim: int = 64, alpha: float | None = None, max_rank: int = 1024,
                 random_state: int | None = 0) -> None:
        super().__init__(n, alpha, max_rank, random_state)
        self.sketch_dim = sketch_dim

    def _pool(self, X, rng):
        return sketch_pool(X, check_positive_int(self.sketch_dim, "sketch_dim"), int(rng.integers(2**31)))
