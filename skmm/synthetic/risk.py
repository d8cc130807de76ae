"""The paper's risk: ridge regression fitted on the coreset only, evaluated on the whole pool.

Ridge(solver='lsqr', fit_intercept=False) with α chosen by 2-fold GridSearchCV on the coreset over
linspace(1e-3, 1e2, 10) — the authors' notebook settings; risk = mean over all N rows of (y − xᵀθ_S)².

The authors' CV splits the coreset into its two contiguous halves in the order the selector lists it, so the same
set of rows can score differently in another order (a greedy selector's farthest-first order is not neutral).
``fold_seed`` gives the order-free variant: the coreset's rows in pool order, split into shuffled folds.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold

__all__ = ["DEFAULT_ALPHAS", "cv_errors", "ridge_risk", "ridge_risk_on_rows", "ridge_risks_by_alpha"]

DEFAULT_ALPHAS = np.linspace(1e-3, 1e2, 10)


def _cv_search(X: np.ndarray, y: np.ndarray, coreset: np.ndarray | None, alphas: np.ndarray, cv: int,
               fold_seed: int | None) -> GridSearchCV:
    """The authors' α search on the coreset, fitted (folds as :func:`ridge_risk` describes)."""
    idx = np.arange(X.shape[0]) if coreset is None else np.asarray(coreset)
    folds: int | KFold = cv
    if fold_seed is not None:
        idx = np.sort(idx)
        folds = KFold(cv, shuffle=True, random_state=fold_seed)
    search = GridSearchCV(Ridge(solver="lsqr", fit_intercept=False), {"alpha": list(alphas)}, cv=folds,
                          scoring="neg_mean_squared_error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X[idx], y[idx])
    return search


def ridge_risk(X: np.ndarray, y: np.ndarray, coreset: np.ndarray | None = None,
               alphas: np.ndarray = DEFAULT_ALPHAS, cv: int = 2,
               eval_rows: np.ndarray | None = None, fold_seed: int | None = None) -> tuple[float, float]:
    """Fit on X[coreset] (all rows when None) and return (risk over ``eval_rows`` — all rows when None, chosen α).

    ``fold_seed`` None: the authors' folds, contiguous in the coreset's order. An integer: the coreset as a set —
    its rows sorted by pool index and split into ``cv`` shuffled folds seeded by ``fold_seed``, so that the risk
    does not depend on the order the selector listed them in."""
    (risk,), alpha = ridge_risk_on_rows(X, y, coreset, (eval_rows,), alphas, cv, fold_seed)
    return risk, alpha


def ridge_risk_on_rows(X: np.ndarray, y: np.ndarray, coreset: np.ndarray | None,
                       row_sets: tuple[np.ndarray | None, ...], alphas: np.ndarray = DEFAULT_ALPHAS, cv: int = 2,
                       fold_seed: int | None = None) -> tuple[tuple[float, ...], float]:
    """:func:`ridge_risk` over several row sets (None: all rows) from one fit — e.g. the risk on the pool and on a
    validation sample — instead of one α search per set: (the risks, in ``row_sets``' order; chosen α)."""
    search = _cv_search(X, y, coreset, alphas, cv, fold_seed)
    risks = []
    for eval_rows in row_sets:
        rows = slice(None) if eval_rows is None else np.asarray(eval_rows)
        residual = y[rows] - search.best_estimator_.predict(X[rows])
        risks.append(float(residual @ residual / residual.shape[0]))
    return tuple(risks), float(search.best_params_["alpha"])


def cv_errors(X: np.ndarray, y: np.ndarray, coreset: np.ndarray | None = None,
              alphas: np.ndarray = DEFAULT_ALPHAS, cv: int = 2, fold_seed: int | None = None) -> np.ndarray:
    """The CV's mean validation error at each α of the grid, which :func:`ridge_risk` picks the lowest of. An
    evaluation aid: where these differ by a few parts in a million (budgets near the cluster count, where most of
    a fold's rows come from clusters the other fold lacks) the α picked is a tie broken by the folds
    (bench/README.md §14, "c11 n = 32: the CV's α is a tie")."""
    return -_cv_search(X, y, coreset, alphas, cv, fold_seed).cv_results_["mean_test_score"]


def ridge_risks_by_alpha(X: np.ndarray, y: np.ndarray, coreset: np.ndarray,
                         alphas: np.ndarray = DEFAULT_ALPHAS) -> np.ndarray:
    """The risk over all N rows of the same ridge fit on X[coreset] at each α of the grid — what the coreset can
    give whatever α the 2-fold CV of :func:`ridge_risk` picks (its risk is the entry at the α it picked). An
    evaluation aid only: at budgets near the cluster count that CV is close to a coin toss between α's whose risks
    differ 10-fold (bench/README.md §14, "The ridge's α at small budgets")."""
    idx = np.asarray(coreset)
    Xs, ys = X[idx], y[idx]  # gathered once for the whole grid
    out = np.empty(len(alphas))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, alpha in enumerate(alphas):
            residual = y - Ridge(alpha=alpha, solver="lsqr", fit_intercept=False).fit(Xs, ys).predict(X)
            out[i] = residual @ residual / residual.shape[0]
    return out
