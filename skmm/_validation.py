"""Input checks shared by the library: clear errors that name the problem, never a traceback from deep inside."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["check_budget", "check_labels", "check_matrix", "check_positive_int", "check_random_state"]


def check_matrix(X: Any, name: str = "X", dtype: Any = np.float64) -> np.ndarray:
    """Return ``X`` as a 2-D, non-empty, finite numpy array of ``dtype``.

    Rejects 1-D input (a single sample must be passed as one row), empty pools and NaN/inf rows, naming the
    first offending row so that a user can find it in their data.
    """
    if hasattr(X, "detach"):  # torch tensor
        X = X.detach().cpu().numpy()
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_samples, n_features); got {arr.ndim}-D shape {arr.shape}"
            + (" (reshape a single sample with X.reshape(1, -1))" if arr.ndim == 1 else "")
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is an empty pool: it has 0 rows")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has 0 features (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} has {bad.size} row(s) with NaN or inf values (first: row {int(bad[0])}); "
            "drop or repair them before selection"
        )
    return arr


def check_worker_count(value: Any, name: str) -> int | None:
    """Return ``value`` (None, or a non-negative int: how many worker processes), or raise ValueError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or a non-negative integer; got {value!r}")
    return value


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer; got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value}")
    return int(value)


def check_budget(n: Any, n_samples: int) -> int:
    """Return the budget ``n`` after checking 0 < n <= n_samples."""
    n = check_positive_int(n, "budget n")
    if n > n_samples:
        raise ValueError(f"budget n={n} is larger than the pool (N={n_samples} samples)")
    return n


def check_labels(y: Any, n_samples: int) -> np.ndarray:
    """Return class labels as a 1-D array with one entry per sample."""
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n_samples:
        raise ValueError(f"labels y must be 1-D with {n_samples} entries (one per sample); got shape {arr.shape}")
    return arr


def check_random_state(random_state: Any) -> np.random.Generator:
    """Turn ``random_state`` (int, None or Generator) into a numpy Generator; None means seed 0.

    We never draw from an unseeded generator: a selection must be reproducible from its recorded parameters.
    """
    if random_state is None:
        return np.random.default_rng(0)
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer; got {random_state}")
        return np.random.default_rng(int(random_state))
    raise TypeError(f"random_state must be an int, None or numpy.random.Generator; got {random_state!r}")
