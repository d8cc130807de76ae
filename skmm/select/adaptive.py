"""Adaptive (randomly pivoted) sampling: pick a row ∝ its residual squared norm, project it out, repeat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from skmm.select.base import BaseSelector

__all__ = ["AdaptiveSampling", "randomly_pivoted_rows"]


def _rows_float64(X: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], block_rows: int) -> np.ndarray:
    """fn applied to X in row blocks upcast to float64, concatenated: float64 arithmetic without a float64 copy."""
    return np.concatenate([fn(X[lo:lo + block_rows].astype(np.float64)) for lo in range(0, X.shape[0], block_rows)])


def randomly_pivoted_rows(
    X: np.ndarray, k: int, rng: np.random.Generator, exclude: np.ndarray | None = None,
    block_rows: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """Pick k rows by randomly pivoted sampling; return (rows, orthonormal basis of their span, k' × d).

    Residual norms are updated in place (O(N) memory); the residual matrix is never formed. When every
    residual vanishes (rank exhausted) the remaining rows are drawn uniformly from the unpicked ones.
    ``block_rows``: compute in float64 on row blocks of a float32 X (as if X were float64, with no float64 copy
    of it); None computes in X's own dtype, as the adaptive-sampling baseline always has.
    """
    if block_rows is None:
        residual = np.einsum("ij,ij->i", X, X).astype(np.float64)
    else:
        residual = _rows_float64(X, lambda b: np.einsum("ij,ij->i", b, b), block_rows)
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
            direction = basis[rank]
            along = X @ direction if block_rows is None else _rows_float64(X, lambda b, d=direction: b @ d, block_rows)
            residual = np.maximum(residual - along**2, 0.0)
            residual[picked] = 0.0
            rank += 1
    return picked, basis[:rank]


class AdaptiveSampling(BaseSelector):
    """Randomly pivoted (adaptive) sampling of n rows."""

    method = "adaptive"

    def _select(self, X, y, rng):
        rows, _ = randomly_pivoted_rows(X, self.n, rng)
        return np.array(rows), None, None, {}
