"""The paper's synthetic pool: a Gaussian mixture on the coordinate axes, drawn exactly as the authors' notebook.

Draw order (numpy default_rng(seed)), which must not change if the authors' numbers are to be reproduced:
(1) k−1 sorted breakpoints in [1, N−1) with replacement → cluster sizes (a cluster may be empty);
(2) scales a_c = integers(1, 1+k)·k; (3) spreads std_c = std_max·random(); (4) β = normal(k);
(5) one noise block Z = normal((N, r)). Row i of cluster c: x_i = a_c e_c + std_c Z_i; y_i = a_c β_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skmm._validation import check_positive_int

__all__ = ["GMMPool", "make_gmm"]


@dataclass(frozen=True)
class GMMPool:
    """Features X (N × r), targets y (N,), cluster id per row, and the generator's parameters."""

    X: np.ndarray
    y: np.ndarray
    cluster: np.ndarray
    sizes: np.ndarray
    scales: np.ndarray
    stds: np.ndarray
    beta: np.ndarray


def make_gmm(n_samples: int = 3000, dim: int = 5000, n_clusters: int = 10, std_max: float = 0.04,
             seed: int = 0) -> GMMPool:
    """Draw the pool; see the module docstring for the exact recipe."""
    N = check_positive_int(n_samples, "n_samples")
    r = check_positive_int(dim, "dim")
    k = check_positive_int(n_clusters, "n_clusters")
    if k > r:
        raise ValueError(f"n_clusters={k} cannot exceed dim={r}: cluster centres lie on the coordinate axes")
    if N < 3:
        raise ValueError(f"n_samples must be at least 3; got {N}")
    if std_max < 0:
        raise ValueError(f"std_max must be >= 0; got {std_max}")
    rng = np.random.default_rng(seed)
    breakpoints = np.sort(rng.integers(1, N - 1, k - 1))
    sizes = np.diff(np.concatenate([[0], breakpoints, [N]]))
    scales = rng.integers(1, 1 + k, k) * k
    stds = std_max * rng.random(k)
    beta = rng.normal(size=k)
    cluster = np.repeat(np.arange(k), sizes)
    X = rng.normal(size=(N, r)) * stds[cluster, None]
    X[np.arange(N), cluster] += scales[cluster]
    y = (scales * beta)[cluster].astype(np.float64)
    return GMMPool(X, y, cluster, sizes, scales, stds, beta)
