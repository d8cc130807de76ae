"""SkMMv2: greedy sketchy moment matching (SKMM.md §4), a V-optimal design in the sketched space.

On the sketch S = XΓ (N × m), with pool moment Σ̃ = SᵀS/N:
1. seed min(n, m) rows by randomly pivoted sampling (∝ residual squared norm, orthogonalising as we go);
2. then add ``block_size`` rows per step, each scored by the drop it brings to the variance term
   tr(Σ̃ A⁻¹), A = S_selᵀS_sel + εI (Sherman–Morrison):

       score_i = s_iᵀA⁻¹Σ̃A⁻¹s_i / (1 + s_iᵀA⁻¹s_i)     ("residual" over "1 + cross-leverage")

   sampled by a softmax at ``temperature`` on the scores relative to the best (0 = greedy).

Memory is the sketch plus O(N): numerator and leverage are kept per row and updated by the rank-one
(Sherman–Morrison) recurrences, so a step is one pass over S — two float64 products S·(A⁻¹s_p) and
S·(A⁻¹Σ̃A⁻¹s_p), computed on float64 row blocks of the (float32) sketch — and never an N × m state.
"""

from __future__ import annotations

import numpy as np

from skmm._validation import check_positive_int
from skmm.select._torch_ops import device_label, greedy_on_device, resolve_device
from skmm.select.adaptive import AUTO_PIVOTING, randomly_pivoted_rows, selector_pivoting
from skmm.select.base import BaseSelector
from skmm.select.moment_matching import gram, selection_sketch
from skmm.select.spectrum import ridge_for, seed_count, signal_rank, spectral_ridge

__all__ = ["SkMMv2", "top_k"]

BLOCK_ROWS = 4096  # float64 row blocks of the sketch: 2 MiB at m = 64, cache-sized and below BLAS threading


def _products(S: np.ndarray, M: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """S @ M in float64 (M: m × k), over float64 row blocks of S (N × k)."""
    out = np.empty((S.shape[0], M.shape[1]))
    M = np.ascontiguousarray(M, dtype=np.float64)
    block = np.empty((min(block_rows, S.shape[0]), S.shape[1]))
    for lo in range(0, S.shape[0], block_rows):
        rows = block[:min(block_rows, S.shape[0] - lo)]
        rows[...] = S[lo:lo + block_rows]
        np.matmul(rows, M, out=out[lo:lo + block_rows])
    return out


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries' indices, as ``np.argsort(-score, kind="stable")[:k]`` (ties by index) in O(N)."""
    if k >= score.size:
        return np.argsort(-score, kind="stable")[:k]
    if k == 1:
        return np.array([int(np.argmax(score))])
    kth = np.partition(score, score.size - k)[score.size - k]  # the k-th largest value
    above = np.flatnonzero(score > kth)
    rows = np.sort(np.concatenate([above, np.flatnonzero(score == kth)[:k - above.size]]))
    return rows[np.argsort(-score[rows], kind="stable")]


def _initial_scores(S: np.ndarray, A: np.ndarray, sigma: np.ndarray,
                    block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per row: numerator s_iᵀA⁻¹Σ̃A⁻¹s_i and leverage s_iᵀA⁻¹s_i, block by block."""
    num, lev = np.empty(S.shape[0]), np.empty(S.shape[0])
    for lo in range(0, S.shape[0], block_rows):
        block = S[lo:lo + block_rows].astype(np.float64)
        W = np.linalg.solve(A, block.T).T  # block A⁻¹ (A symmetric)
        lev[lo:lo + block_rows] = np.einsum("ij,ij->i", W, block)
        num[lo:lo + block_rows] = np.einsum("ij,ij->i", W @ sigma, W)
    return num, lev


class SkMMv2(BaseSelector):
    """Greedy sketchy moment matching.

    Parameters: ``n``; ``sketch_dim`` m (None: X as given); ``block_size`` rows added per step;
    ``temperature`` of the softmax sampler (0: greedy arg-max; the authors' default was 0.1); ``ridge`` ε, which
    damps the sketch's low-energy (noise) directions: "auto" (the default) is :func:`~skmm.select.spectrum.ridge_for`
    — 0.1·tr(Σ̃)/m when n >= m, and the widest gap of Σ̃'s spectrum when n < m, where the greedy step must see the
    small clusters' directions that 0.1·tr(Σ̃)/m would damp; "spectral" is the gap always; a number is relative to
    tr(Σ̃)/m; ``seed_rows``: rows seeded by randomly pivoted sampling (None: :func:`~skmm.select.spectrum.seed_count`
    — m when n >= m, else max(⌊n/2⌋, signal rank) — so with n < m the greedy step still chooses part of the
    budget); ``random_state``. Temperature 0 was chosen on validation pools (bench/tune_synthetic.py), the
    spectral ridge and seeding rule on the validation half of bench/robustness.py. ``device``: where the seeding
    and the greedy steps' passes over the sketch run — None (the default) numpy; "auto" CUDA when torch sees it,
    else numpy; "cpu", "cuda" or "cuda:k" torch on that device, in float64 as the numpy path (equal to it but for
    rounding in another order: skmm/select/_torch_ops.py). Recorded as ``info["device"]``. ``pivoting``: how the
    seeding picks each pivot (:func:`~skmm.select.adaptive.pivot_rule`; "auto", the default, is "sampled": ∝
    residual; "greedy_signal" the largest residual for the first signal-rank pivots, then ∝ residual).
    """

    method = "skmm_v2"

    def __init__(
        self,
        n: int,
        sketch_dim: int | None = None,
        block_size: int = 1,
        temperature: float = 0.0,
        ridge: float | str = "auto",
        seed_rows: int | None = None,
        random_state: int | None = 0,
        device: str | None = None,
        pivoting: str | float = AUTO_PIVOTING,
    ) -> None:
        super().__init__(n, random_state)
        self.sketch_dim = sketch_dim
        self.block_size = block_size
        self.temperature = temperature
        self.ridge = ridge
        self.seed_rows = seed_rows
        self.device = device
        self.pivoting = pivoting

    def _select(self, X, y, rng):
        block = check_positive_int(self.block_size, "block_size")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        pivoting = selector_pivoting(self.pivoting)  # validates it
        device = resolve_device(self.device)
        S, spec, auto = selection_sketch(X, self.sketch_dim, int(rng.integers(2**31)))
        N, m = S.shape
        sigma = gram(S, BLOCK_ROWS) / N  # Σ̃
        lam = np.linalg.eigvalsh(sigma)[::-1]
        if self.ridge in ("auto", "spectral"):
            eps = max(ridge_for(lam, self.n) if self.ridge == "auto" else spectral_ridge(lam), 1e-300)
        elif isinstance(self.ridge, str) or not self.ridge >= 0:
            raise ValueError(f"ridge must be 'auto', 'spectral' or a number >= 0; got {self.ridge!r}")
        else:
            eps = self.ridge * max(float(np.trace(sigma)) / m, 1e-300)
        rank = signal_rank(lam)
        if self.seed_rows is None:
            n_seed = seed_count(self.n, m, rank)
        else:
            if isinstance(self.seed_rows, bool) or not isinstance(self.seed_rows, int) or self.seed_rows < 0:
                raise ValueError(f"seed_rows must be None or an integer >= 0; got {self.seed_rows!r}")
            n_seed = min(self.seed_rows, self.n, m)
        lead = rank if str(pivoting).endswith("_signal") else None
        if device is not None:
            order, seeded = greedy_on_device(S, sigma, eps, n_seed, self.n, block,
                                             None if self.temperature == 0 else self._pick, rng, device,
                                             pivoting=pivoting, lead_pivots=lead)
            return np.array(order), None, None, {"sketch": spec, "seeded": seeded, "ridge": eps, "signal_rank": rank,
                                                 "auto_sketch": auto, "device": device_label(device)}
        seeds, _ = (randomly_pivoted_rows(S, n_seed, rng, block_rows=BLOCK_ROWS, pivoting=pivoting,
                                          lead_pivots=lead) if n_seed else ([], None))
        chosen = np.zeros(N, dtype=bool)
        chosen[seeds] = True
        order = list(seeds)
        seeded = S[seeds].astype(np.float64)
        A = seeded.T @ seeded + eps * np.eye(m)
        num, lev = _initial_scores(S, A, sigma)

        while len(order) < self.n:
            score = num / (1.0 + lev)
            score[chosen] = -np.inf
            take = min(block, self.n - len(order))
            picks = self._pick(score, take, rng)
            del score
            for p in picks:  # rank-b update as b rank-one Sherman–Morrison steps
                s_p = S[p].astype(np.float64)
                a = np.linalg.solve(A, s_p)  # A⁻¹ s_p
                Sw, t = _products(S, np.column_stack([a, np.linalg.solve(A, sigma @ a)])).T
                denom = 1.0 + lev[p]
                # u_i ← u_i − Sw_i·u_p/denom (u_i = Σ̃^½A⁻¹s_i), so ‖u_i‖² gains Sw_i·(Sw_i‖u_p‖²/denom − 2t_i)/denom
                num += Sw * (Sw * (num[p] / denom) - 2.0 * t) / denom
                lev -= Sw**2 / denom
                A += np.outer(s_p, s_p)
                chosen[p] = True
                order.append(int(p))
        return np.array(order), None, None, {"sketch": spec, "seeded": len(seeds), "ridge": eps,
                                             "signal_rank": rank, "auto_sketch": auto, "device": "numpy"}

    def _pick(self, score: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        valid = np.flatnonzero(np.isfinite(score))
        s = score[valid]
        if self.temperature == 0:
            return valid[top_k(s, k)]
        top = s.max()
        logits = (s / top - 1.0) / self.temperature if top > 0 else np.zeros_like(s)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        nonzero = int(np.count_nonzero(p))
        if nonzero < k:
            return valid[top_k(s, k)]
        return valid[rng.choice(valid.size, size=k, replace=False, p=p)]
