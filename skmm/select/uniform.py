"""Uniform random selection without replacement, optionally class-balanced."""

from __future__ import annotations

import numpy as np

from skmm.select.base import BaseSelector, class_quotas

__all__ = ["Uniform"]


class Uniform(BaseSelector):
    """n rows uniformly without replacement (``rng.choice(N, n, replace=False)``, the paper's draw).

    ``class_balanced=True`` draws n/K rows from each of the K classes of y instead.
    """

    method = "uniform"

    def __init__(self, n: int, class_balanced: bool = False, random_state: int | None = 0) -> None:
        super().__init__(n, random_state)
        self.class_balanced = class_balanced

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return bool(self.class_balanced)

    def _select(self, X, y, rng):
        if not self.class_balanced:
            return rng.choice(X.shape[0], self.n, replace=False), None, None, {}
        parts = [rng.choice(np.flatnonzero(y == cls), quota, replace=False)
                 for cls, quota in class_quotas(y, self.n).items()]
        return np.concatenate(parts), None, None, {}
