"""One interface for every selector: scikit-learn style estimators whose ``fit`` records a :class:`Selection`.

``Selector(n=..., random_state=...).fit(X, y=None)`` validates the pool, runs the method and stores
``indices_`` (selected rows, in selection order), ``weights_`` (one per selected row, summing to 1),
``scores_`` (per pool row, or None) and ``selection_`` (all of it plus the parameters that produced it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skmm._validation import check_budget, check_labels, check_matrix, check_random_state

__all__ = ["BaseSelector", "Selection", "discretize"]


@dataclass(frozen=True)
class Selection:
    """The result of a selection: which rows, with what weight, from which method and parameters."""

    indices: np.ndarray
    weights: np.ndarray
    scores: np.ndarray | None
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (indices and weights as lists)."""
        return {
            "method": self.method,
            "params": self.params,
            "indices": self.indices.tolist(),
            "weights": self.weights.tolist(),
            "info": self.info,
        }


class BaseSelector:
    """Base class: subclasses implement ``_select(X, y, rng) -> (indices, weights, scores, info)``."""

    method = "base"
    needs_labels = False

    def __init__(self, n: int, random_state: int | None = 0) -> None:
        self.n = n
        self.random_state = random_state

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters, as scikit-learn's ``get_params``."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> BaseSelector:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _validate(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray | None]:
        dtype = np.float32 if getattr(X, "dtype", None) == np.float32 else np.float64
        X = check_matrix(X, "X", dtype=dtype)
        check_budget(self.n, X.shape[0])
        y = None if y is None else check_labels(y, X.shape[0])
        if self.needs_labels and y is None:
            raise ValueError(f"{type(self).__name__} with these parameters needs class labels y")
        return X, y

    def fit(self, X: Any, y: Any = None) -> BaseSelector:
        """Select ``n`` rows of the pool X (N × features); y are class labels where a rule needs them."""
        X, y = self._validate(X, y)
        rng = check_random_state(self.random_state)
        indices, weights, scores, info = self._select(X, y, rng)
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size != self.n or np.unique(indices).size != indices.size:
            raise RuntimeError(f"{type(self).__name__} produced {indices.size} rows ({np.unique(indices).size} "
                               f"distinct) for budget {self.n}")  # a bug, never bad input
        weights = np.full(indices.size, 1.0 / indices.size) if weights is None else np.asarray(weights, float)
        self.indices_ = indices
        self.weights_ = weights
        self.scores_ = scores
        self.selection_ = Selection(indices, weights, scores, self.method, self.get_params(), info)
        return self

    def _select(
        self, X: np.ndarray, y: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, Any]]:
        raise NotImplementedError


def class_quotas(y: np.ndarray, n: int) -> dict[Any, int]:
    """Split budget n over the classes of y as evenly as possible (remainder to the largest classes).

    Raises if a class holds fewer samples than its quota: silently topping up from other classes would hide
    that the pool cannot support a balanced selection.
    """
    classes, counts = np.unique(y, return_counts=True)
    k = classes.size
    base, extra = divmod(n, k)
    order = np.argsort(-counts, kind="stable")
    quotas = {classes[i]: base for i in range(k)}
    for i in order[:extra]:
        quotas[classes[i]] += 1
    for cls, count in zip(classes, counts, strict=True):
        if count < quotas[cls]:
            label = cls.item() if hasattr(cls, "item") else cls
            raise ValueError(f"class {label!r} has {count} samples, fewer than its per-class quota of "
                             f"{quotas[cls]} (budget n={n} over {k} classes)")
    return quotas


def discretize(
    weights: np.ndarray,
    n: int,
    rule: str,
    rng: np.random.Generator,
    y: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Turn relaxed weights over the pool into n distinct indices.

    ``"topk"``: the n largest weights (ties broken by index); ``"sample"``: n successive draws without
    replacement with probability ∝ weight (rows of zero weight only when fewer than n rows have positive
    weight); ``"systematic"``: systematic πps sampling — row i is included with probability exactly n·w_i
    (w on the capped simplex, so n·w_i <= 1), rows ordered by ``strata`` first so that every stratum of
    mass n·W gets ⌊n·W⌋ or ⌈n·W⌉ rows; ``"per_class"``: the top n/K rows of each of the K classes of y.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if rule == "systematic":
        if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0, rtol=1e-6) or weights.max() > (1 + 1e-6) / n:
            raise ValueError("systematic discretisation needs weights on the capped simplex {0 <= w <= 1/n, Σw = 1}")
        order = np.arange(weights.size) if strata is None else np.argsort(strata, kind="stable")
        cumulative = np.cumsum(np.minimum(weights[order] * n, 1.0))
        cumulative *= n / cumulative[-1]
        points = rng.random() + np.arange(n)
        picked = order[np.minimum(np.searchsorted(cumulative, points, side="right"), weights.size - 1)]
        if np.unique(picked).size != n:  # only through rounding at a w_i = 1/n boundary: fill deterministically
            kept = np.unique(picked)
            by_weight = np.argsort(-weights, kind="stable")
            rest = by_weight[~np.isin(by_weight, kept)]  # keeps the by-weight order
            picked = np.concatenate([kept, rest[: n - kept.size]])
        return picked
    if rule == "topk":
        return np.argsort(-weights, kind="stable")[:n]
    if rule == "sample":
        positive = np.flatnonzero(weights > 0)
        if positive.size >= n:
            p = weights[positive] / weights[positive].sum()
            return positive[rng.choice(positive.size, size=n, replace=False, p=p)]
        rest = np.setdiff1d(np.arange(weights.size), positive)
        return np.concatenate([positive, rng.choice(rest, size=n - positive.size, replace=False)])
    if rule == "per_class":
        if y is None:
            raise ValueError("discretisation 'per_class' needs class labels y")
        out = []
        for cls, quota in class_quotas(y, n).items():
            members = np.flatnonzero(y == cls)
            out.append(members[np.argsort(-weights[members], kind="stable")[:quota]])
        return np.concatenate(out)
    raise ValueError(f"unknown discretisation {rule!r}; expected 'topk', 'sample', 'systematic' or 'per_class'")
