"""Selectors: SkMM (convex and greedy) and the baselines the paper compares against, behind one interface."""

from __future__ import annotations

from typing import Any

from skmm.select.adaptive import AdaptiveSampling
from skmm.select.base import BaseSelector, Selection, discretize
from skmm.select.best_of import SkMMBest
from skmm.select.greedy import Herding, KCenterGreedy
from skmm.select.greedy_moment_matching import SkMMv2
from skmm.select.leverage import Leverage, RidgeLeverage, SketchedRidgeLeverage
from skmm.select.moment_matching import SkMM
from skmm.select.projection import project_capped_simplex
from skmm.select.sketched_pivots import SketchedPivots
from skmm.select.uniform import Uniform

__all__ = [
    "SELECTORS",
    "AdaptiveSampling",
    "BaseSelector",
    "Herding",
    "KCenterGreedy",
    "Leverage",
    "RidgeLeverage",
    "Selection",
    "SkMM",
    "SkMMBest",
    "SkMMv2",
    "SketchedPivots",
    "SketchedRidgeLeverage",
    "Uniform",
    "discretize",
    "make_selector",
    "project_capped_simplex",
]

SELECTORS: dict[str, type[BaseSelector]] = {
    cls.method: cls
    for cls in (SkMMBest, SkMM, SkMMv2, SketchedPivots, Uniform, Herding, KCenterGreedy, AdaptiveSampling, Leverage,
                RidgeLeverage, SketchedRidgeLeverage)
}


def make_selector(method: str, n: int, **params: Any) -> BaseSelector:
    """Build a selector by its method name (see ``SELECTORS``)."""
    try:
        cls = SELECTORS[method]
    except KeyError:
        raise ValueError(f"unknown selection method {method!r}; expected one of {sorted(SELECTORS)}") from None
    return cls(n=n, **params)
