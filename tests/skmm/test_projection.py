"""project_capped_simplex: feasibility, exactness (variational inequality, independent solvers, KKT), edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from skmm.select.projection import project_capped_simplex


def _s(v: np.ndarray, tau: float, cap: float) -> float:
    return float(np.clip(v - tau, 0.0, cap).sum())


def reference_projection(v: np.ndarray, cap: float, total: float = 1.0) -> np.ndarray:
    """Independent exact algorithm: s(τ) = Σ clip(v − τ, 0, cap) is piecewise linear and non-increasing with
    breakpoints {v_i, v_i − cap}; find the two consecutive breakpoints that bracket s = total and interpolate."""
    v = np.asarray(v, dtype=np.float64)
    if cap * v.size <= total * (1 + 1e-12):
        return np.full(v.size, cap)
    bps = np.unique(np.concatenate([v, v - cap]))  # sorted ascending; s decreases along it
    values = np.array([_s(v, b, cap) for b in bps])
    # s(bps[0]) = N·cap > total, s(bps[-1]) = 0 < total
    k = int(np.flatnonzero(values >= total)[-1])
    lo, hi = bps[k], bps[k + 1]
    s_lo, s_hi = values[k], values[k + 1]
    tau = lo if s_lo == s_hi else lo + (s_lo - total) * (hi - lo) / (s_lo - s_hi)
    return np.clip(v - tau, 0.0, cap)


def simplex_projection_sort(v: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Classic sort-based projection onto {w >= 0, Σw = total} (Held et al. / Duchi et al.)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = np.flatnonzero(u - (css - total) / np.arange(1, v.size + 1) > 0)[-1]
    theta = (css[rho] - total) / (rho + 1)
    return np.maximum(v - theta, 0.0)


def random_feasible_points(rng: np.random.Generator, N: int, cap: float, total: float, count: int) -> np.ndarray:
    """Feasible z: projections (by the reference algorithm) of random vectors, plus 'vertex-like' points."""
    pts = [reference_projection(rng.normal(size=N) * rng.choice([0.01, 1, 100]), cap, total)
           for _ in range(count)]
    k = int(total // cap)
    for _ in range(count):  # greedy vertex: k entries at cap, one at the remainder
        z = np.zeros(N)
        order = rng.permutation(N)
        z[order[:k]] = cap
        if k < N:
            z[order[k]] = total - k * cap
        pts.append(z)
    return np.array(pts)


def make_vector(rng: np.random.Generator, N: int, kind: str) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=N)
    if kind == "scaled_shifted":
        return rng.normal(size=N) * 10 ** rng.uniform(-3, 2) + rng.uniform(-100, 100)
    if kind == "duplicated":
        base = rng.normal(size=max(1, N // 4))
        return rng.choice(base, size=N)
    if kind == "ties_grid":  # exact ties, often landing exactly on the clip boundaries
        return rng.integers(-3, 4, size=N) / rng.choice([1, 2, 4, 8])
    if kind == "huge":
        return rng.normal(size=N) * 1e9
    if kind == "tiny":
        return rng.normal(size=N) * 1e-12
    if kind == "constant":
        return np.full(N, rng.normal())
    raise AssertionError(kind)


KINDS = ["normal", "scaled_shifted", "duplicated", "ties_grid", "huge", "tiny", "constant"]
SIZES = [1, 2, 3, 5, 8, 13, 40, 200, 2000]


def _caps(N: int) -> list[float]:
    return sorted({1.0 / n for n in {1, 2, max(1, N // 3), N} if n <= N})


def check_feasible(w: np.ndarray, cap: float, total: float = 1.0) -> None:
    assert w.shape[0] > 0
    assert np.all(w >= -1e-12)
    assert np.all(w <= cap + 1e-12)
    assert abs(w.sum() - total) <= 1e-9 * max(1.0, total)


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_feasible_exact_and_kkt(N, kind):
    rng = np.random.default_rng(1000 * N + KINDS.index(kind))
    for cap in _caps(N):
        for _ in range(3 if N <= 200 else 1):
            v = make_vector(rng, N, kind)
            w, tau = project_capped_simplex(v, cap)
            check_feasible(w, cap)
            # KKT form w = clip(v − τ, 0, cap) (the single-point set w ≡ cap is checked directly)
            if cap * N > 1 + 1e-12:
                scale = max(1.0, float(np.abs(v).max()))
                np.testing.assert_allclose(w, np.clip(v - tau, 0.0, cap), rtol=0, atol=1e-12 * scale)
            else:
                np.testing.assert_array_equal(w, np.full(N, cap))
            # variational inequality: (v − w)·(z − w) <= 0 for every feasible z
            if N <= 200:
                Z = random_feasible_points(rng, N, cap, 1.0, 10)
                vi = (Z - w) @ (v - w)
                scale = max(1.0, float(np.abs(v - w).max()))
                assert vi.max() <= 1e-9 * scale, (cap, vi.max())
                # and therefore w is at least as close to v as any of them
                assert np.linalg.norm(v - w) <= np.linalg.norm(v - Z, axis=1).min() + 1e-9 * scale
            # independent exact algorithm
            if N <= 200:
                np.testing.assert_allclose(w, reference_projection(v, cap), rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_matches_scipy_slsqp_on_small_problems(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(2, 9))
    n = int(rng.integers(1, N + 1))
    cap = 1.0 / n
    v = rng.normal(size=N) * rng.choice([0.3, 1.0, 3.0])
    res = minimize(
        lambda z: 0.5 * np.sum((z - v) ** 2),
        np.full(N, 1.0 / N),
        jac=lambda z: z - v,
        method="SLSQP",
        bounds=[(0.0, cap)] * N,
        constraints=[{"type": "eq", "fun": lambda z: z.sum() - 1.0, "jac": lambda z: np.ones_like(z)}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    w, _ = project_capped_simplex(v, cap)
    np.testing.assert_allclose(w, res.x, rtol=0, atol=1e-7)


@pytest.mark.parametrize("total", [0.5, 2.5, 7.0])
def test_general_total(total):
    rng = np.random.default_rng(int(total * 10))
    for N in (5, 20, 100):
        v = rng.normal(size=N) * 3
        cap = total / max(1, N // 3) * 1.0001
        w, tau = project_capped_simplex(v, cap, total=total)
        check_feasible(w, cap, total)
        np.testing.assert_allclose(w, np.clip(v - tau, 0.0, cap), atol=1e-12)
        np.testing.assert_allclose(w, reference_projection(v, cap, total), atol=1e-7)
        Z = random_feasible_points(rng, N, cap, total, 10)
        assert ((Z - w) @ (v - w)).max() <= 1e-9


def test_hand_computed_examples():
    # τ = 0.5: first entry clipped at the cap, second free, third exactly on the lower boundary
    w, tau = project_capped_simplex(np.array([2.0, 1.0, 0.5]), cap=1.0, total=1.5)
    np.testing.assert_allclose(w, [1.0, 0.5, 0.0], atol=1e-15)
    assert tau == pytest.approx(0.5, abs=1e-15)
    # equal values share the mass equally
    w, _ = project_capped_simplex(np.array([3.0, 3.0, 3.0, 3.0]), cap=0.5)
    np.testing.assert_allclose(w, 0.25, atol=1e-15)
    # the cap binds: mass that plain simplex projection would give one entry is spread
    w, _ = project_capped_simplex(np.array([10.0, 0.0, 0.0]), cap=0.5)
    np.testing.assert_allclose(w, [0.5, 0.25, 0.25], atol=1e-15)
    # not clamp-then-renormalise (which gives [0.833, 0.083, 0.083], over the cap): τ = −0.2
    w, _ = project_capped_simplex(np.array([0.9, 0.05, 0.05]), cap=0.5)
    np.testing.assert_allclose(w, [0.5, 0.25, 0.25], atol=1e-15)
    # 0.6 + (0.2 − τ) + (0.1 − τ) = 1 → τ = −0.05
    w, _ = project_capped_simplex(np.array([1.0, 0.2, 0.1]), cap=0.6)
    np.testing.assert_allclose(w, [0.6, 0.25, 0.15], atol=1e-15)


@pytest.mark.parametrize("cap", [1.0, 5.0, 1e6])
def test_uncapped_is_simplex_projection(cap):
    rng = np.random.default_rng(3)
    for N in (1, 2, 7, 50, 2000):
        for scale in (1e-3, 1.0, 1e3):
            v = rng.normal(size=N) * scale
            w, _ = project_capped_simplex(v, cap)
            check_feasible(w, cap)
            np.testing.assert_allclose(w, simplex_projection_sort(v), rtol=0, atol=1e-9)


def test_n_equals_N_gives_uniform():
    rng = np.random.default_rng(4)
    for N in (1, 2, 3, 10, 999, 2000):
        v = rng.normal(size=N) * 100
        w, _ = project_capped_simplex(v, 1.0 / N)
        np.testing.assert_allclose(w, 1.0 / N, rtol=1e-12)
        assert abs(w.sum() - 1) <= 1e-9


def test_single_entry():
    for val in (-1e6, -3.0, 0.0, 0.7, 42.0):
        for cap in (1.0, 2.0, 1e3):
            w, tau = project_capped_simplex(np.array([val]), cap)
            np.testing.assert_allclose(w, [1.0], atol=1e-12)
            if cap > 1:  # the free case: w = v − τ
                assert val - tau == pytest.approx(1.0, abs=1e-9 * max(1, abs(val)))
    w, _ = project_capped_simplex([5.0], cap=1.0, total=1.0)  # a list is accepted
    np.testing.assert_allclose(w, [1.0])


@pytest.mark.parametrize("N", [3, 50, 2000])
def test_warm_start_gives_the_same_answer(N):
    rng = np.random.default_rng(N)
    for cap in _caps(N):
        for kind in ("normal", "ties_grid", "scaled_shifted"):
            v = make_vector(rng, N, kind)
            w, tau = project_capped_simplex(v, cap)
            starts = [tau, tau + 1e-9, tau - 1e-3, tau + 0.5, tau - 0.5, 0.0, 1e12, -1e12, np.inf, -np.inf,
                      float(v.max()), float(v.min()) - cap]
            for tau0 in starts:
                w0, _ = project_capped_simplex(v, cap, tau0=tau0)
                check_feasible(w0, cap)
                scale = max(1.0, float(np.abs(v).max()))
                np.testing.assert_allclose(w0, w, rtol=0, atol=1e-12 * scale, err_msg=f"tau0={tau0}")


def test_nan_warm_start_is_rejected_or_ignored():
    # regression: tau0=NaN used to pass np.clip unchanged and return w full of NaN
    v = np.random.default_rng(0).normal(size=10)
    try:
        w, _ = project_capped_simplex(v, 0.25, tau0=float("nan"))
    except ValueError:
        return
    np.testing.assert_allclose(w, project_capped_simplex(v, 0.25)[0], atol=1e-12)


def test_infinite_cap_is_rejected_or_plain_simplex():
    # regression: cap=inf used to be accepted and return w = [inf, ...] with τ = -inf
    v = np.random.default_rng(0).normal(size=10)
    try:
        w, _ = project_capped_simplex(v, np.inf)
    except ValueError:
        return
    np.testing.assert_allclose(w, simplex_projection_sort(v), atol=1e-9)


def test_infeasible_cap_raises():
    with pytest.raises(ValueError, match="infeasible"):
        project_capped_simplex(np.zeros(10), cap=0.099)
    with pytest.raises(ValueError, match="infeasible"):
        project_capped_simplex(np.zeros(3), cap=1.0, total=3.5)
    with pytest.raises(ValueError, match="infeasible"):
        project_capped_simplex(np.zeros(1), cap=0.5)


@pytest.mark.parametrize(
    "cap,total", [(0.0, 1.0), (-0.5, 1.0), (1.0, 0.0), (1.0, -1.0), (float("nan"), 1.0), (1.0, float("nan"))]
)
def test_non_positive_cap_or_total_raises(cap, total):
    with pytest.raises(ValueError, match="positive"):
        project_capped_simplex(np.zeros(5), cap=cap, total=total)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_v_raises(bad):
    v = np.zeros(6)
    v[3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        project_capped_simplex(v, 0.5)


@pytest.mark.parametrize("v", [np.zeros((3, 4)), np.zeros((1, 5)), np.array(1.0), np.zeros(0)])
def test_bad_shape_raises(v):
    with pytest.raises(ValueError, match="1-D"):
        project_capped_simplex(v, 1.0)
