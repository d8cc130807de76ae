"""SkMM's seeding step alone, for the whole budget: randomly pivoted (adaptive) sampling on the moment-matching
sketch — the fourth candidate of skmm_best's choice on validation data (bench/README.md §14, "A fourth candidate").

Why a selector of its own: where SkMM lost on the robustness protocol (budgets about equal to the number of
clusters) the winner was adaptive sampling, which is what SkMM's seeding already does before handing over to
moment matching. As a candidate it runs on the same sketch the SkMM variants use (``sketch_dim="auto"``: the
automatic m), so the pipeline can select it like them, one task per (budget, seed).
"""

from __future__ import annotations

import numpy as np

from skmm.select.adaptive import AUTO_PIVOTING, randomly_pivoted_rows, selector_pivoting
from skmm.select.base import BaseSelector
from skmm.select.moment_matching import selection_sketch

__all__ = ["SketchedPivots"]


class SketchedPivots(BaseSelector):
    """n rows by randomly pivoted sampling on the sketch SkMM selects on (``sketch_dim``: an int, None for X as
    given, or "auto"); ``pivoting``: the pivot rule (:func:`~skmm.select.adaptive.pivot_rule`; "auto", the default,
    is "sampled"). The first draw of
    ``random_state`` seeds the sketch whatever ``sketch_dim`` is, as in the SkMM variants, so a fit on an already
    reduced sketch (``sketch_dim=None``) gives the rows of the fit with ``"auto"`` on the wide one."""

    method = "skmm_pivoted"

    def __init__(self, n: int, sketch_dim: int | str | None = None, random_state: int | None = 0,
                 pivoting: str | float = AUTO_PIVOTING) -> None:
        super().__init__(n, random_state)
        self.sketch_dim = sketch_dim
        self.pivoting = pivoting

    def _select(self, X, y, rng):
        pivoting = selector_pivoting(self.pivoting)  # validates it
        S, spec, auto = selection_sketch(X, self.sketch_dim, int(rng.integers(2**31)))
        rows, _ = randomly_pivoted_rows(S, self.n, rng, block_rows=65536, pivoting=pivoting)
        return np.asarray(rows, dtype=np.int64), None, None, {"sketch": spec, "auto_sketch": auto}
