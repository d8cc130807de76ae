"""Adaptive (randomly pivoted) sampling: pick a row ∝ its residual squared norm, project it out, repeat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from skmm.select.base import BaseSelector

__all__ = ["AUTO_PIVOTING", "FLOAT64_CACHE_BYTES", "PIVOTINGS", "PIVOT_BAND", "AdaptiveSampling", "pivot_rule",
           "randomly_pivoted_rows", "selector_pivoting"]

# named pivot rules (pivot_rule); a number β > 0 samples ∝ residual^β
PIVOTINGS = ("sampled", "greedy", "banded", "directed", "greedy_signal", "banded_signal", "directed_signal")
PIVOT_BAND = 0.5  # "banded": draw among the rows whose residual is at least this fraction of the largest
# The selectors' default: each one's validated rule — convex SkMM greedy through the signal rank at a tight budget
# (skmm.select.spectrum.pivoting_for), "sampled" for SkMMv2 and SketchedPivots (bench/README.md §14)
AUTO_PIVOTING = "auto"

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


def pivot_rule(pivoting: str | float) -> tuple[float, float]:
    """(β, band) of a pivot rule: a row is drawn ∝ residual^β among the rows whose residual is at least
    band × the largest. "sampled" is (1, 0), randomly pivoted sampling (the authors' rule); "greedy" is β = ∞,
    the arg-max of the residual (greedy pivoted Cholesky, deterministic, no draw); "banded" is (1,
    :data:`PIVOT_BAND`): ∝ residual among the rows within a factor of the largest; "directed" is (∞, band): the
    direction of the largest residual, then a row drawn ∝ its squared projection on that direction among the rows
    within the band of the largest projection (a typical member of the cluster the arg-max points at, not its
    outlier; one more pass over X per pivot); a number β > 0 is (β, 0).
    Greedier rules pick less often where many rows with small residuals (a big cluster's noise) outweigh a few
    rows with a large one (an uncovered small cluster); "banded" still draws a typical row of that cluster where
    "greedy" takes its most outlying one. The "_signal" names apply the rule to the first pivots only (as many as
    the spectrum's signal rank, which the selectors pass as ``lead_pivots``), then sample ∝ residual."""
    if isinstance(pivoting, str):
        if pivoting not in PIVOTINGS:
            raise ValueError(f"pivoting must be one of {PIVOTINGS} or a number > 0; got {pivoting!r}")
        name = pivoting.removesuffix("_signal")
        return {"sampled": (1.0, 0.0), "greedy": (float("inf"), 0.0), "banded": (1.0, PIVOT_BAND),
                "directed": (float("inf"), PIVOT_BAND)}[name]
    if isinstance(pivoting, bool) or not isinstance(pivoting, int | float) or not pivoting > 0:
        raise ValueError(f"pivoting must be one of {PIVOTINGS} or a number > 0; got {pivoting!r}")
    return float(pivoting), 0.0


def selector_pivoting(pivoting: str | float) -> str | float:
    """The pivot rule a selector other than convex SkMM runs for its ``pivoting`` parameter: "auto" is "sampled";
    any other value is validated (:func:`pivot_rule`) and kept."""
    if isinstance(pivoting, str) and pivoting == AUTO_PIVOTING:
        return "sampled"
    pivot_rule(pivoting)
    return pivoting


def _pick_pivot(residual: np.ndarray, total: float, rule: tuple[float, float], rng: np.random.Generator,
                buf: np.ndarray) -> int:
    """The next pivot: drawn ∝ residual (rule (1, 0): exactly the draw of :func:`_choice_by_residual`),
    ∝ residual^β within the band, or the first arg-max (β = ∞, no draw from ``rng``)."""
    power, band = rule
    if power == 1.0 and band == 0.0:
        return _choice_by_residual(residual, total, rng, buf)
    if not np.isfinite(total):
        raise ValueError("Probabilities contain NaN: the pool has non-finite entries")
    if power == np.inf:
        return int(np.argmax(residual))
    top = float(residual.max())
    np.divide(residual, top, out=buf)  # in [0, 1]: no overflow for large β
    if band > 0:
        buf[buf < band] = 0.0
    if power != 1.0:
        np.power(buf, power, out=buf)
    weights = buf.copy()
    return _choice_by_residual(weights, float(weights.sum()), rng, buf)


def _directed_pivot(X: np.ndarray, top: int, residual: np.ndarray, basis: np.ndarray, rank: int,
                    matvec: Callable[[np.ndarray], np.ndarray], band: float, rng: np.random.Generator,
                    buf: np.ndarray) -> int:
    """A row drawn ∝ its squared projection on the residual direction of row ``top`` (the arg-max), among the
    rows with a positive residual whose projection is within ``band`` of the largest."""
    q, norm = orthogonal_part(X[top], basis, rank)
    if norm <= 0:
        return top
    proj = matvec(q / norm)
    np.square(proj, out=proj)
    proj[residual <= 0] = 0.0
    proj[proj < band * proj.max()] = 0.0
    return _choice_by_residual(proj, float(proj.sum()), rng, buf)


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
    block_rows: int | None = None, cache_bytes: int | None = None, pivoting: str | float = "sampled",
    lead_pivots: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """Pick k rows by randomly pivoted sampling; return (rows, orthonormal basis of their span, k' × d).

    Residual norms are updated in place (O(N) memory); the residual matrix is never formed. When every
    residual vanishes (rank exhausted) the remaining rows are drawn uniformly from the unpicked ones.
    ``block_rows``: compute in float64 on row blocks of a float32 X (as if X were float64); None computes in X's
    own dtype, as the adaptive-sampling baseline always has. ``cache_bytes`` (default :data:`FLOAT64_CACHE_BYTES`):
    float64 blocks kept across pivots rather than converted at each. Whatever it is, the rows, basis and generator
    state are those of converting every block at every pivot and drawing with ``rng.choice(N, p=…)``.
    ``pivoting`` (:func:`pivot_rule`): "sampled" (the default, the rule above), "greedy" (arg-max residual),
    "banded" or β; it picks the first ``lead_pivots`` rows (None: all of them), the rest are sampled ∝ residual.
    """
    rule = pivot_rule(pivoting)
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
    for i in range(k):
        total = residual.sum()
        if total <= 1e-12 * max(scale, 1e-300) or rank == basis.shape[0]:
            fill_uniformly(picked, N, k, rng, exclude)
            break
        rule_i = rule if lead_pivots is None or i < lead_pivots else (1.0, 0.0)
        p = _pick_pivot(residual, total, rule_i, rng, buf)
        if rule_i[0] == np.inf and rule_i[1] > 0:  # "directed": a typical row along the arg-max's direction
            p = _directed_pivot(X, p, residual, basis, rank, matvec, rule_i[1], rng, buf)
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
