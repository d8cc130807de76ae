"""Adaptive (randomly pivoted) sampling: pick a row ∝ its residual squared norm, project it out, repeat."""

from __future__ import annotations

import numpy as np

from skmm.select.base import BaseSelector

__all__ = ["AdaptiveSampling", "randomly_pivoted_rows"]


def randomly_pivoted_rows(
    X: np.ndarray, k: int, rng: np.random.Generator, exclude: np.ndarray | None = None
) -> tuple[list[int], np.ndarray]:
    """Pick k rows by randomly pivoted sampling; return (rows, orthonormal basis of their span, k' × d).

    Residual norms are updated in place (O(N) memory); the residual matrix is never formed. When every
    residual vanishes (rank exhausted) the remaining rows are drawn uniformly from the unpicked ones.
    """
    residual = np.einsum("ij,ij->i", X, X).astype(np.float64)
    if exclude is not None:
        residual[exclude] = 0.0
    picked: list[int] = []
    basis = np.zeros((min(k, X.shape[1]), X.shape[1]))
    rank = 0
    scale = residual.max() if residual.size else 0.0
    for _ in range(k):
        total = residual.sum()
        if total <= 1e-12 * max(scale, 1e-300) or rank == basis.shape[0]:
            taken = np.zeros(X.shape[0], dtype=bool)
            taken[picked] = True
            if exclude is not None:
                taken[exclude] = True
            free = np.flatnonzero(~taken)
            picked.extend(rng.choice(free, k - len(picked), replace=False).tolist())
            break
        p = int(rng.choice(X.shape[0], p=residual / total))
        q = X[p].astype(np.float64)
        for _ in range(2):  # Gram–Schmidt twice: enough for orthogonality to machine precision
            q -= basis[:rank].T @ (basis[:rank] @ q)
        norm = np.linalg.norm(q)
        picked.append(p)
        residual[p] = 0.0
        if norm > 0:
            basis[rank] = q / norm
            residual = np.maximum(residual - (X @ basis[rank]) ** 2, 0.0)
            residual[picked] = 0.0
            rank += 1
    return picked, basis[:rank]


class AdaptiveSampling(BaseSelector):
    """Randomly pivoted (adaptive) sampling of n rows."""

    method = "adaptive"

    def _select(self, X, y, rng):
        rows, _ = randomly_pivoted_rows(X, self.n, rng)
        return np.array(rows), None, None, {}
