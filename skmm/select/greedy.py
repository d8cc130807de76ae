"""Greedy geometric baselines: herding (DeepCore's rule) and k-center greedy. O(N) extra memory each."""

from __future__ import annotations

import numpy as np

from skmm.select.base import BaseSelector

__all__ = ["Herding", "KCenterGreedy"]


class Herding(BaseSelector):
    """DeepCore's herding: the next row maximises ‖(i+1)μ − Σ_selected x − x‖ over unselected rows.

    This is the rule the paper's baseline runs (DeepCore takes the arg*max* of that distance); it is
    deterministic, so ``random_state`` is unused. O(N·d) per step, O(N) memory.
    """

    method = "herding"

    def _select(self, X, y, rng):
        mu = X.mean(axis=0)
        sq_norms = np.einsum("ij,ij->i", X, X)
        chosen = np.zeros(X.shape[0], dtype=bool)
        running = np.zeros(X.shape[1])
        order = []
        for i in range(self.n):
            target = (i + 1) * mu - running
            dist = sq_norms - 2.0 * (X @ target)  # ‖target − x‖² − ‖target‖²
            dist[chosen] = -np.inf
            p = int(np.argmax(dist))
            chosen[p] = True
            running += X[p]
            order.append(p)
        return np.array(order), None, None, {}


class KCenterGreedy(BaseSelector):
    """k-center greedy: a random first row, then repeatedly the row farthest from the selected set.

    Keeps a running min-distance vector (O(N) memory), never a budget × N distance matrix.
    """

    method = "kcenter"

    def _select(self, X, y, rng):
        sq_norms = np.einsum("ij,ij->i", X, X)
        first = int(rng.integers(X.shape[0]))
        order = [first]
        min_dist = np.maximum(sq_norms - 2.0 * (X @ X[first]) + sq_norms[first], 0.0)
        min_dist[first] = -1.0
        for _ in range(self.n - 1):
            p = int(np.argmax(min_dist))
            order.append(p)
            d = np.maximum(sq_norms - 2.0 * (X @ X[p]) + sq_norms[p], 0.0)
            np.minimum(min_dist, d, out=min_dist)
            min_dist[p] = -1.0
        return np.array(order), None, None, {}
