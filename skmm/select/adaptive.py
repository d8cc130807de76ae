"""Adaptive (randomly pivoted) sampling: pick a row ∝ its residual squared norm, project it out, repeat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from skmm.select.base import BaseSelector

__all__ = ["FLOAT64_CACHE_BYTES", "AdaptiveSampling", "randomly_pivoted_rows"]

# Bytes of float64 row blocks of X that randomly_pivoted_rows(block_rows=…) may keep across pivots instead of
# converting them again at each one. 0 by default: the selectors hold no float64 copy of the sketch (one block's
# buffer, reused); a caller with memory to spare passes ``cache_bytes`` (2× a float32 sketch, seeding ~2× faster).
FLOAT64_CACHE_BYTES = 0


def _block_matvec(X: np.ndarray, block_rows: int, residual: np.ndarray,
                  cache_bytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fill ``residual`` with X's float64 row norms² block by block; return direction ↦ X @ direction on the same
    blocks. Each block holds the rows of ``X[lo:lo + block_rows].astype(float64)`` — kept while the kept ones fit
    ``cache_bytes`` (a C-contiguous float64 X is used in place), else converted again per call into one reused
    buffer — and the product is that block's own matvec: the same BLAS call on the same rows as converting at every
    pivot, hence the same bits (one matvec over all N rows is not: its kernel groups some rows otherwise)."""
    N = X.shape[0]
    in_place = X.dtype == np.float64 and X.flags.c_contiguous
    blocks: list[tuple[int, np.ndarray | None]] = []
    kept = 0
    for lo in range(0, N, block_rows):
        block = X[lo:lo + block_rows] if in_place else X[lo:lo + block_rows].astype(np.float64)
        residual[lo:lo + block.shape[0]] = np.einsum("ij,ij->i", block, block)
        keep = in_place or kept + block.nbytes <= cache_bytes
        kept += block.nbytes if keep and not in_place else 0
        blocks.append((lo, block if keep else None))
        del block  # one float64 block alive at a time
    reuse = X.flags.c_contiguous and any(block is None for _, block in blocks)
    spare = np.empty((min(block_rows, N), X.shape[1])) if reuse else None

    def matvec(direction: np.ndarray) -> np.ndarray:
        out = np.empty(N)
        for lo, block in blocks:
            if block is None and spare is not None:  # the same C-ordered float64 rows, without a new allocation
                block = spare[:min(block_rows, N - lo)]
                np.copyto(block, X[lo:lo + block_rows])
            elif block is None:  # another layout: exactly the old conversion
                block = X[lo:lo + block_rows].astype(np.float64)
            out[lo:lo + block.shape[0]] = block @ direction
        return out

    return matvec


def _whole_matvec(X: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """direction ↦ X @ direction in X's arithmetic. For a C-contiguous X that numpy casts to float64 for that
    product (float32), the product copies X whole at every call: one float64 copy made once instead (the same
    peak memory, the same bits)."""
    if X.dtype != np.float64 and X.flags.c_contiguous and np.result_type(X.dtype, np.float64) == np.float64:
        X = X.astype(np.float64)
    return lambda direction: X @ direction


def _choice_by_residual(residual: np.ndarray, total: float, rng: np.random.Generator, buf: np.ndarray) -> int:
    """``rng.choice(N, p=residual / total)`` with the same uniform draw and the same cdf arithmetic — numpy's
    ``cdf = cumsum(p); cdf /= cdf[-1]; cdf.searchsorted(random(), side="right")`` — hence the same row and the same
    generator state, without the O(N) checks of p nor the division of the whole cdf: x ↦ fl(x / cdf[-1]) is
    monotone, so a binary search over fl(cdf[i] / cdf[-1]) > u finds the same index."""
    if not np.isfinite(total):
        raise ValueError("Probabilities contain NaN: the pool has non-finite entries")
    np.divide(residual, total, out=buf)
    np.cumsum(buf, out=buf)
    last = float(buf[-1])
    u = rng.random()
    lo, hi = 0, buf.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if float(buf[mid]) / last > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fill_uniformly(picked: list[int], N: int, k: int, rng: np.random.Generator,
                   exclude: np.ndarray | None = None) -> None:
    """Extend ``picked`` to k rows drawn uniformly from the rows neither picked nor excluded: the pivoted
    sampling's rule once every residual has vanished (rank exhausted)."""
    taken = np.zeros(N, dtype=bool)
    taken[picked] = True
    if exclude is not None:
        taken[exclude] = True
    picked.extend(rng.choice(np.flatnonzero(~taken), k - len(picked), replace=False).tolist())


def orthogonal_part(row: np.ndarray, basis: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """(``row`` in float64 less its components along ``basis[:rank]``, that remainder's norm): Gram–Schmidt twice,
    enough for orthogonality to machine precision."""
    q = row.astype(np.float64)
    for _ in range(2):
        q -= basis[:rank].T @ (basis[:rank] @ q)
    return q, float(np.linalg.norm(q))


def randomly_pivoted_rows(
    X: np.ndarray, k: int, rng: np.random.Generator, exclude: np.ndarray | None = None,
    block_rows: int | None = None, cache_bytes: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """Pick k rows by randomly pivoted sampling; return (rows, orthonormal basis of their span, k' × d).

    Residual norms are updated in place (O(N) memory); the residual matrix is never formed. When every
    residual vanishes (rank exhausted) the remaining rows are drawn uniformly from the unpicked ones.
    ``block_rows``: compute in float64 on row blocks of a float32 X (as if X were float64); None computes in X's
    own dtype, as the adaptive-sampling baseline always has. ``cache_bytes`` (default :data:`FLOAT64_CACHE_BYTES`):
    float64 blocks kept across pivots rather than converted at each. Whatever it is, the rows, basis and generator
    state are those of converting every block at every pivot and drawing with ``rng.choice(N, p=…)``.
    """
    N = X.shape[0]
    if block_rows is None:
        residual = np.einsum("ij,ij->i", X, X).astype(np.float64)
        matvec = _whole_matvec(X)
    else:
        residual = np.empty(N)
        budget = FLOAT64_CACHE_BYTES if cache_bytes is None else cache_bytes
        matvec = _block_matvec(X, block_rows, residual, budget)
    if exclude is not None:
        residual[exclude] = 0.0
    picked: list[int] = []
    basis = np.zeros((min(k, X.shape[1]), X.shape[1]))
    rank = 0
    scale = residual.max() if residual.size else 0.0
    buf = np.empty(N)
    for _ in range(k):
        total = residual.sum()
        if total <= 1e-12 * max(scale, 1e-300) or rank == basis.shape[0]:
            fill_uniformly(picked, N, k, rng, exclude)
            break
        p = _choice_by_residual(residual, total, rng, buf)
        q, norm = orthogonal_part(X[p], basis, rank)
        picked.append(p)
        residual[p] = 0.0
        if norm > 0:
            basis[rank] = q / norm
            along = matvec(basis[rank])
            np.square(along, out=along)
            np.subtract(residual, along, out=residual)
            np.maximum(residual, 0.0, out=residual)
            residual[picked] = 0.0
            rank += 1
    return picked, basis[:rank]


class AdaptiveSampling(BaseSelector):
    """Randomly pivoted (adaptive) sampling of n rows."""

    method = "adaptive"

    def _select(self, X, y, rng):
        rows, _ = randomly_pivoted_rows(X, self.n, rng)
        return np.array(rows), None, None, {}
