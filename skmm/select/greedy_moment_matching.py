"""SkMMv2: greedy sketchy moment matching (SKMM.md §4), a V-optimal design in the sketched space.

On the sketch S = XΓ (N × m), with pool moment Σ̃ = SᵀS/N = RᵀR/N (R from QR of S):
1. seed min(n, m) rows by randomly pivoted sampling (∝ residual squared norm, orthogonalising as we go);
2. then add ``block_size`` rows per step, each scored by the drop it brings to the variance term
   tr(Σ̃ A⁻¹), A = S_selᵀS_sel + εI (Sherman–Morrison):

       score_i = ‖R A⁻¹ s_i‖² / (1 + s_iᵀ A⁻¹ s_i)     ("residual · Rᵀ" over "1 + cross-leverage")

   sampled by a softmax at ``temperature`` on the scores relative to the best (0 = greedy). The N × m state
   W = S A⁻¹ and U = W Rᵀ is updated by rank-one (Woodbury) steps in O(N·m) per row — never recomputed.
"""

from __future__ import annotations

import numpy as np

from skmm._validation import check_positive_int
from skmm.select.adaptive import randomly_pivoted_rows
from skmm.select.base import BaseSelector
from skmm.select.moment_matching import sketch_pool

__all__ = ["SkMMv2"]


class SkMMv2(BaseSelector):
    """Greedy sketchy moment matching.

    Parameters: ``n``; ``sketch_dim`` m (None: X as given); ``block_size`` rows added per step;
    ``temperature`` of the softmax sampler (0: greedy arg-max; the authors' default was 0.1); ``ridge`` ε
    relative to tr(Σ̃)/m, which damps the sketch's low-energy (noise) directions; ``random_state``.
    Defaults (ridge 0.1, temperature 0) were chosen on validation pools: bench/tune_synthetic.py.
    """

    method = "skmm_v2"

    def __init__(
        self,
        n: int,
        sketch_dim: int | None = None,
        block_size: int = 1,
        temperature: float = 0.0,
        ridge: float = 0.1,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(n, random_state)
        self.sketch_dim = sketch_dim
        self.block_size = block_size
        self.temperature = temperature
        self.ridge = ridge

    def _select(self, X, y, rng):
        block = check_positive_int(self.block_size, "block_size")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        S, spec = sketch_pool(X, self.sketch_dim, int(rng.integers(2**31)))
        S = S.astype(np.float64)
        N, m = S.shape
        R = np.linalg.qr(S / np.sqrt(N), mode="r")  # RᵀR = Σ̃
        eps = self.ridge * max(float(np.trace(R.T @ R)) / m, 1e-300)

        seeds, _ = randomly_pivoted_rows(S, min(self.n, m), rng)
        chosen = np.zeros(N, dtype=bool)
        chosen[seeds] = True
        order = list(seeds)
        A = S[seeds].T @ S[seeds] + eps * np.eye(m)
        W = np.linalg.solve(A, S.T).T  # S A⁻¹ (A symmetric)
        U = W @ R.T
        lev = np.einsum("ij,ij->i", W, S)

        while len(order) < self.n:
            score = np.einsum("ij,ij->i", U, U) / (1.0 + lev)
            score[chosen] = -np.inf
            take = min(block, self.n - len(order))
            picks = self._pick(score, take, rng)
            for p in picks:  # rank-b update as b rank-one Woodbury steps
                Sw = S @ W[p]  # S A⁻¹ s_p
                denom = 1.0 + lev[p]
                U -= np.outer(Sw, U[p] / denom)
                W -= np.outer(Sw, W[p] / denom)
                lev -= Sw**2 / denom
                chosen[p] = True
                order.append(int(p))
        return np.array(order), None, None, {"sketch": spec, "seeded": len(seeds)}

    def _pick(self, score: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        valid = np.flatnonzero(np.isfinite(score))
        s = score[valid]
        if self.temperature == 0:
            return valid[np.argsort(-s, kind="stable")[:k]]
        top = s.max()
        logits = (s / top - 1.0) / self.temperature if top > 0 else np.zeros_like(s)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        nonzero = int(np.count_nonzero(p))
        if nonzero < k:
            return valid[np.argsort(-s, kind="stable")[:k]]
        return valid[rng.choice(valid.size, size=k, replace=False, p=p)]
