"""SkMM as shipped: run both variants on one sketch and keep the coreset with the smaller variance proxy.

The rule looks at no label and no risk: it compares the label-free variance term of the paper's bound,
tr(Σ̃ (Σ̃_S + εI)⁻¹) on the sketch (Σ̃ the pool moment, Σ̃_S the coreset moment), and keeps the lower.
"""

from __future__ import annotations

import numpy as np

from skmm.select.adaptive import AUTO_PIVOTING
from skmm.select.base import BaseSelector
from skmm.select.greedy_moment_matching import BLOCK_ROWS, SkMMv2
from skmm.select.moment_matching import SkMM, gram, selection_sketch
from skmm.select.sketched_pivots import SketchedPivots

__all__ = ["SkMMBest", "variance_proxy"]


def variance_proxy(S: np.ndarray, indices: np.ndarray, ridge: float = 1e-6, pool: np.ndarray | None = None) -> float:
    """tr(Σ̃ (Σ̃_S + εI)⁻¹) / m with ε = ridge · tr(Σ̃)/m: how poorly the coreset covers the pool's moments.

    ``pool``: Σ̃ = SᵀS/N when already computed (it depends on S alone). Only the coreset's rows are upcast to
    float64: a float32 pool is never copied."""
    S = np.asarray(S)
    m = S.shape[1]
    if pool is None:
        pool = gram(S, BLOCK_ROWS) / S.shape[0]
    rows = np.asarray(S[indices], dtype=np.float64)
    core = rows.T @ rows / len(indices)
    eps = ridge * max(float(np.trace(pool)) / m, 1e-300)
    return float(np.trace(np.linalg.solve(core + eps * np.eye(m), pool))) / m


class SkMMBest(BaseSelector):
    """Convex SkMM and greedy SkMMv2 on the same sketch; the coreset with the lower variance proxy wins.

    Parameters are those of :class:`~skmm.select.moment_matching.SkMM` and
    :class:`~skmm.select.greedy_moment_matching.SkMMv2`; ``device`` (None: numpy; "auto", "cpu", "cuda" or
    "cuda:k": torch ops, skmm/select/_torch_ops.py) and ``pivoting`` (the seeding's pivot rule,
    :func:`~skmm.select.adaptive.pivot_rule`; "auto", the default, gives each candidate its own validated rule)
    go to every candidate. ``third_candidate``: also fit convex SkMM
    with ``pivoting="greedy_signal"`` on the same sketch and seed and list it in ``selection_.info["candidates"]``
    as ``"skmm_greedy_pivots"``, for a choice on labelled validation data (the pipeline's rule,
    bench/README.md §14); the label-free proxy still chooses between the first two. ``pivoted_candidate``: also
    list SkMM's seeding step alone for the whole budget —
    :class:`~skmm.select.sketched_pivots.SketchedPivots` on the same sketch with the same seed — as
    ``"skmm_pivoted"`` (issue 10: on the protocol's test half it lifts the validation
    choice from 83 % to 88–96 % of cells within 1.1× of the best other method; §14, "A fourth candidate")."""

    method = "skmm_best"

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return self.discretization == "per_class"

    def __init__(self, n: int, sketch_dim: int | None = None, c_s: float = 0.999, max_iter: int = 500,
                 discretization: str = "systematic", block_size: int = 1, temperature: float = 0.0,
                 ridge: float | str = "auto", seeding: str = "pivoted", random_state: int | None = 0,
                 device: str | None = None, pivoting: str | float = AUTO_PIVOTING,
                 third_candidate: bool = False, pivoted_candidate: bool = False) -> None:
        super().__init__(n, random_state)
        self.sketch_dim = sketch_dim
        self.c_s = c_s
        self.max_iter = max_iter
        self.discretization = discretization
        self.block_size = block_size
        self.temperature = temperature
        self.ridge = ridge
        self.seeding = seeding
        self.device = device
        self.pivoting = pivoting
        self.third_candidate = third_candidate
        self.pivoted_candidate = pivoted_candidate

    def _select(self, X, y, rng):
        S, spec, auto = selection_sketch(X, self.sketch_dim, int(rng.integers(2**31)))
        seed = int(rng.integers(2**31))
        convex = SkMM(self.n, None, c_s=self.c_s, max_iter=self.max_iter, discretization=self.discretization,
                      seeding=self.seeding, random_state=seed, device=self.device, pivoting=self.pivoting).fit(S, y)
        greedy = SkMMv2(self.n, None, block_size=self.block_size, temperature=self.temperature, ridge=self.ridge,
                        seed_rows=None if self.seeding == "pivoted" else 0, random_state=seed,
                        device=self.device, pivoting=self.pivoting).fit(S)
        pool = gram(S, BLOCK_ROWS) / S.shape[0]  # float64 block by block: no float64 copy of the sketch
        proxies = {"skmm": variance_proxy(S, convex.indices_, pool=pool),
                   "skmm_v2": variance_proxy(S, greedy.indices_, pool=pool)}
        winner = convex if proxies["skmm"] <= proxies["skmm_v2"] else greedy
        info = {"sketch": spec, "auto_sketch": auto, "variance_proxy": proxies, "chosen": winner.method,
                "device": winner.selection_.info.get("device"),
                "candidates": {"skmm": convex.indices_.tolist(), "skmm_v2": greedy.indices_.tolist()}}
        if self.third_candidate:
            third = SkMM(self.n, None, c_s=self.c_s, max_iter=self.max_iter, discretization=self.discretization,
                         seeding=self.seeding, random_state=seed, device=self.device,
                         pivoting="greedy_signal").fit(S, y)
            info["candidates"]["skmm_greedy_pivots"] = third.indices_.tolist()
        if self.pivoted_candidate:
            pivoted = SketchedPivots(self.n, None, random_state=seed, pivoting=self.pivoting).fit(S)
            info["candidates"]["skmm_pivoted"] = pivoted.indices_.tolist()
        return winner.indices_, winner.weights_, winner.scores_, info
