"""SkMM: sketchy moment matching in its convex form (SKMM.md §3).

1. Sketch the gradients G (N × r) to G̃ = GΓ (N × m) with a seeded Gaussian projector (skipped when m >= r or
   when the caller passes an already-sketched G̃).
2. Eigendecompose the pool moment Σ̃ = G̃ᵀG̃/N = V diag(λ) Vᵀ; precompute P = (G̃V)² (N × m).
3. Minimise f(w) = Σ_j max(0, λ_j/c_S − (Pᵀw)_j)² over the capped simplex {0 <= w <= 1/n, Σw = 1}: every
   eigen-direction of the pool must be covered by the coreset at least to the fraction 1/c_S. Accelerated
   projected gradient (FISTA, step 1/L with L = 2‖P‖²) with the exact capped-simplex projection, keeping the
   best iterate: O(N·m) per step, independent of r.
4. Discretise w to n rows: top-n, sampling ∝ w, or per-class top-n/K.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skmm._validation import check_positive_int
from skmm.select._torch_ops import device_label, fista_on_device, pivoted_rows_on_device, resolve_device
from skmm.select.adaptive import AUTO_PIVOTING, pivot_rule, randomly_pivoted_rows
from skmm.select.auto_sketch import BLOCK_ROWS, add_gram, auto_projection, eigen_moments, project_rows, row_blocks
from skmm.select.base import BaseSelector, discretize
from skmm.select.projection import project_capped_simplex
from skmm.select.spectrum import pivoting_for, seed_count, signal_rank
from skmm.sketch import GaussianProjector

__all__ = ["AUTO_M_MAX", "SkMM", "gram", "moment_matching_weights", "selection_sketch", "sketch_pool"]

AUTO_M_MAX = 256  # sketch_dim="auto": a wider pool is first sketched to this many columns

DISCRETIZATIONS = ("topk", "sample", "systematic", "per_class")


def sketch_pool(
    X: np.ndarray, sketch_dim: int | None, random_state: int, batch_rows: int = 8192
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Return (XΓ, spec dict) with a seeded Gaussian sketch, or (X, None) when no sketch is needed."""
    if sketch_dim is None or sketch_dim >= X.shape[1]:
        return X, None
    proj = GaussianProjector(X.shape[1], check_positive_int(sketch_dim, "sketch_dim m"), random_state,
                             dtype="float32" if X.dtype == np.float32 else "float64").fit()
    out = np.empty((X.shape[0], sketch_dim), dtype=X.dtype)
    for lo in range(0, X.shape[0], batch_rows):
        out[lo:lo + batch_rows] = proj.project(X[lo:lo + batch_rows])
    return out, proj.spec.to_dict()


def selection_sketch(
    X: np.ndarray, sketch_dim: int | str | None, random_state: int
) -> tuple[np.ndarray, dict[str, Any] | None, dict[str, Any] | None]:
    """(S, sketch spec, automatic-m record) that an SkMM variant selects on: :func:`sketch_pool`, or with
    ``sketch_dim="auto"`` the rule of :func:`skmm.select.spectrum.auto_sketch_dim` — X (already a sketch, or
    Gaussian-sketched to ``AUTO_M_MAX`` columns first when wider) is projected onto the leading m eigenvectors of
    its moment XᵀX/N, m = max(64, 2 × the spectrum's signal rank), at most m_max. One pass for the m_max × m_max
    moment, one for the projection: no second sketch of the pool. The steps are those of
    :mod:`skmm.select.auto_sketch`, which a stored sketch streams through to the same bits."""
    if isinstance(sketch_dim, str):
        if sketch_dim != "auto":
            raise ValueError(f"sketch_dim must be a positive integer, None or 'auto'; got {sketch_dim!r}")
        S, spec = sketch_pool(X, AUTO_M_MAX, random_state)
        lam, V = _eigen_moments(S)
        V, auto = auto_projection(lam, V, S.dtype)
        out = project_rows(row_blocks(S, BLOCK_ROWS), V, np.empty((S.shape[0], V.shape[1]), dtype=S.dtype))
        return out, spec, auto
    S, spec = sketch_pool(X, sketch_dim, random_state)
    return S, spec, None


def gram(S: np.ndarray, batch_rows: int = BLOCK_ROWS) -> np.ndarray:
    """SᵀS accumulated in float64 batch by batch: never a float64 copy of S."""
    sigma = np.zeros((S.shape[1], S.shape[1]))
    for _, block in row_blocks(S, batch_rows):
        add_gram(sigma, block)
    return sigma


def _eigen_moments(S: np.ndarray, batch_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs (descending) of Σ̃ = SᵀS/N, accumulated in float64 batch by batch."""
    return eigen_moments(gram(S, batch_rows), S.shape[0])


def moment_matching_weights(
    S: np.ndarray,
    n: int,
    c_s: float = 0.999,
    max_iter: int = 500,
    tol: float = 1e-10,
    init: np.ndarray | None = None,
    dtype: Any = np.float32,
    ridge: float | None = None,
    device: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Solve the convex moment-matching problem on a sketch S (N × m); return (w, info).

    ``ridge`` ε (absolute, in units of Σ̃'s eigenvalues; None: the paper's absolute objective): measure each
    direction's gap relative to λ_j + ε, i.e. minimise Σ_j max(0, λ_j/c_S − d_j)²/(λ_j + ε)². Every direction
    well above ε then counts equally — a small cluster's direction as much as a large one's — while directions
    below ε (the sketch's noise) count little. Without it the objective is dominated by the largest λ_j, and
    small clusters are left uncovered (bench/README.md, "SkMM off its tuning pool").

    ``device`` (a ``torch.device``; None: numpy): build P and run the solver there as torch ops — the same steps
    and dtypes, equal to the numpy result to rounding (where it can differ: skmm/select/_torch_ops.py).

    ``info`` records the objective of the returned (best) iterate, its relative value f/‖λ/c_S‖², the steps
    taken, the eigenvalues λ and ``strata``: per row, the eigen-direction it covers most (relative to λ).
    """
    N, m = S.shape
    if not 0 < c_s <= 1:
        raise ValueError(f"c_s must lie in (0, 1] (coverage γ >= 1/c_s); got {c_s}")
    lam, V = _eigen_moments(S)
    rel = np.where(lam > 0, 1.0 / np.where(lam > 0, lam, 1.0), 0.0)
    target = lam / c_s
    scale_j = None
    if ridge is not None:
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0; got {ridge}")
        scale_j = 1.0 / np.maximum(lam + ridge, 1e-300)
        target = target * scale_j
    scale = float(target @ target) or 1.0
    if device is not None:  # the same steps as torch ops on the device (skmm/select/_torch_ops.py)
        best_w, best_f, steps, strata = fista_on_device(S, n, V, rel, target, scale_j, init, max_iter, tol, dtype,
                                                        device)
        return best_w, {"objective": best_f, "relative_objective": best_f / scale, "steps": steps,
                        "eigenvalues": lam.tolist(), "strata": strata}
    P = np.empty((N, m), dtype=dtype)
    strata = np.empty(N, dtype=np.int64)
    for lo in range(0, N, 65536):
        H = S[lo:lo + 65536].astype(np.float64) @ V
        P[lo:lo + 65536] = H * H
        strata[lo:lo + 65536] = np.argmax(H * H * rel, axis=1)  # the direction each row covers most
    if scale_j is not None:
        for lo in range(0, N, 65536):
            P[lo:lo + 65536] *= scale_j.astype(dtype)
    cap = 1.0 / n
    # Lipschitz constant of ∇f: 2‖P‖₂², by power iteration (P >= 0, so it converges fast).
    u = np.full(m, 1.0 / np.sqrt(m), dtype=dtype)
    for _ in range(30):
        u = P.T @ (P @ u)
        u /= np.linalg.norm(u)
    L = 2.0 * float(np.linalg.norm(P @ u)) ** 2 * 1.05 + 1e-300

    def moments(w: np.ndarray) -> np.ndarray:  # d(w) = Pᵀw, the coreset's moment per eigen-direction
        return (P.T @ w.astype(dtype, copy=False)).astype(np.float64)

    def objective(d: np.ndarray) -> float:
        gap = np.maximum(target - d, 0.0)
        return float(gap @ gap)

    # FISTA with adaptive restart. d(·) is linear, so the moments of the extrapolated point z come free from
    # those of the iterates: each step costs one Pᵀw and one P·g — the same two products as the floor.
    w = init if init is not None else np.full(N, 1.0 / N)
    w, tau = project_capped_simplex(w, cap)
    d_w = moments(w)
    f = objective(d_w)
    best_w, best_f, steps = w, f, 0
    z, d_z, t = w, d_w, 1.0
    for step in range(1, max_iter + 1):
        if best_f <= tol * scale:
            break
        steps = step
        gap_z = np.maximum(target - d_z, 0.0)
        grad = P @ (-2.0 * gap_z).astype(dtype)
        w_next, tau = project_capped_simplex(z - grad / L, cap, tau0=tau)
        d_next = moments(w_next)
        f_next = objective(d_next)
        if f_next > f:  # restart momentum when the objective goes up
            z, d_z, t = w_next, d_next, 1.0
        else:
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_next
            z, d_z, t = w_next + beta * (w_next - w), d_next + beta * (d_next - d_w), t_next
        w, d_w, f = w_next, d_next, f_next
        if f < best_f:
            best_w, best_f = w, f
    info = {"objective": best_f, "relative_objective": best_f / scale, "steps": steps,
            "eigenvalues": lam.tolist(), "strata": strata}
    return best_w, info


class SkMM(BaseSelector):
    """Sketchy moment matching, convex form.

    Parameters: ``n`` budget; ``sketch_dim`` m (None: use X as given, e.g. an already-sketched G̃);
    ``c_s`` coverage (γ >= 1/c_s; the authors' synthetic setting 0.999, real data 0.6–0.9); ``max_iter``;
    ``discretization`` "systematic" (inclusion probability n·w, stratified by eigen-direction; the default,
    chosen on validation pools), "sample" (successive draws ∝ w), "topk" or "per_class" (needs y);
    ``seeding`` "pivoted" (the default): first take :func:`~skmm.select.spectrum.seed_count` rows by randomly
    pivoted sampling on the sketch, then discretise the moment-matching weights over the other rows for the rest
    of the budget — the relaxed solution covers every direction fractionally, but allots each cluster budget in
    proportion to its share of the pool, so discretising it alone drops the small clusters (the collapse of
    bench/README.md, "SkMM off its tuning pool"); "none": the paper's discretisation of w alone. ``per_class``
    never seeds (the class quotas fix the whole budget). ``random_state`` seeds the sketch, the initial
    n-subset and the sampling. ``device``: where the moment-matching solver and the pivoted seeding run — None
    (the default) numpy; "auto" CUDA when torch sees it, else numpy; "cpu", "cuda" or "cuda:k" torch on that
    device (equal to the numpy weights to rounding; see skmm/select/_torch_ops.py). Recorded as ``info["device"]``.
    ``pivoting``: how the seeding picks each pivot (:func:`~skmm.select.adaptive.pivot_rule`) — "auto" (the
    default): "greedy_signal" at a tight budget, n < 5 × the signal rank, else "sampled"
    (:func:`~skmm.select.spectrum.pivoting_for`; recorded as ``info["pivoting"]``); "sampled" ∝ residual (the
    default before; at a tight budget it leaves small clusters out: 130× the best method's risk on the
    validation half); "greedy_signal" the largest residual for the first signal-rank pivots, then ∝ residual (as
    the default at every budget it lost on the paper's pool: it takes the noisiest rows once every cluster has
    one; bench/README.md §14, "Budgets about equal to the cluster count" and "Convex SkMM at a tight budget");
    "greedy", "banded", "directed", their ``*_signal`` forms, or a number β.
    """

    method = "skmm"

    def __init__(
        self,
        n: int,
        sketch_dim: int | None = None,
        c_s: float = 0.999,
        max_iter: int = 500,
        discretization: str = "systematic",
        seeding: str = "pivoted",
        random_state: int | None = 0,
        device: str | None = None,
        pivoting: str | float = AUTO_PIVOTING,
    ) -> None:
        super().__init__(n, random_state)
        self.sketch_dim = sketch_dim
        self.c_s = c_s
        self.max_iter = max_iter
        self.discretization = discretization
        self.seeding = seeding
        self.device = device
        self.pivoting = pivoting

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return self.discretization == "per_class"

    def _select(self, X, y, rng):
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(f"unknown discretisation {self.discretization!r}; expected 'topk', 'sample', "
                             "'systematic' or 'per_class'")
        if self.seeding not in ("pivoted", "none"):
            raise ValueError(f"seeding must be 'pivoted' or 'none'; got {self.seeding!r}")
        if self.pivoting != AUTO_PIVOTING:
            pivot_rule(self.pivoting)  # validates it
        device = resolve_device(self.device)
        seed = int(rng.integers(2**31))
        S, spec, auto = selection_sketch(X, self.sketch_dim, seed)
        init = np.zeros(X.shape[0])
        init[rng.choice(X.shape[0], self.n, replace=False)] = 1.0 / self.n
        w, info = moment_matching_weights(S, self.n, self.c_s, check_positive_int(self.max_iter, "max_iter"),
                                          init=init, device=device)
        strata = info.pop("strata")
        lam = np.asarray(info["eigenvalues"])
        n_seed = 0
        rank = signal_rank(lam)
        pivoting = pivoting_for(self.n, rank) if self.pivoting == AUTO_PIVOTING else self.pivoting
        if self.seeding == "pivoted" and self.discretization != "per_class":  # class quotas fix the whole budget
            n_seed = seed_count(self.n, S.shape[1], rank)
        lead = rank if str(pivoting).endswith("_signal") else None
        if n_seed == 0:
            idx = discretize(w, self.n, self.discretization, rng, y, strata=strata)
        else:
            if device is None:
                seeds, _ = randomly_pivoted_rows(S, n_seed, rng, block_rows=65536, pivoting=pivoting,
                                                 lead_pivots=lead)
            else:
                seeds = pivoted_rows_on_device(S, n_seed, rng, device, pivoting=pivoting, lead_pivots=lead)
            idx = np.asarray(seeds, dtype=np.int64)
            if n_seed < self.n:  # the rest of the budget by moment matching, over the rows not seeded
                rest = self.n - n_seed
                v = w / w.sum()
                v[idx] = -1.0  # projected to exactly 0: a seed is never drawn twice
                w_rest, _ = project_capped_simplex(v, 1.0 / rest)
                w_rest[idx] = 0.0
                w_rest /= w_rest.sum()
                idx = np.concatenate([idx, discretize(np.minimum(w_rest, 1.0 / rest), rest, self.discretization,
                                                      rng, y, strata=strata)])
        info["seeded"] = n_seed
        info["pivoting"] = pivoting
        info["sketch"] = spec
        info["auto_sketch"] = auto
        info["device"] = device_label(device)
        weights = w[idx] / w[idx].sum() if w[idx].sum() > 0 else None
        return idx, weights, w, info
