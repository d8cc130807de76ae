"""Issue 10: rules read off the sketched spectrum, the n < m regime, the convex variant's collapse, automatic m."""

from __future__ import annotations

import numpy as np
import pytest

from skmm.select import SkMM, SkMMBest, SkMMv2
from skmm.select.moment_matching import AUTO_M_MAX, _eigen_moments, selection_sketch, sketch_pool
from skmm.select.spectrum import auto_sketch_dim, ridge_for, seed_count, signal_rank, spectral_ridge
from skmm.synthetic import make_gmm

LAM = np.array([100.0, 50.0, 20.0, 0.1, 0.09, 0.08])


def test_spectral_ridge_sits_in_the_widest_gap():
    assert spectral_ridge(LAM) == pytest.approx(np.sqrt(20.0 * 0.1))
    assert spectral_ridge(LAM[::-1]) == pytest.approx(np.sqrt(2.0))  # order does not matter
    assert signal_rank(LAM) == 3
    assert signal_rank(LAM, ridge=60.0) == 1
    assert spectral_ridge(np.array([4.0])) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="spectrum"):
        spectral_ridge(np.array([1.0, np.nan]))


def test_ridge_rule_depends_on_the_regime():
    assert ridge_for(LAM, n=6) == pytest.approx(0.1 * LAM.sum() / 6)  # n >= m: 0.1·tr/m
    assert ridge_for(LAM, n=5) == pytest.approx(np.sqrt(2.0))  # n < m: the spectral gap


def test_seed_count_rule():
    assert seed_count(100, 40, 10) == 40  # n >= m: the authors' m pivots
    assert seed_count(40, 40, 10) == 40
    assert seed_count(32, 40, 10) == 16  # n < m: half the budget ...
    assert seed_count(32, 40, 25) == 25  # ... or the signal rank, if larger ...
    assert seed_count(32, 80, 50) == 32  # ... never more than n


def test_auto_sketch_dim_on_a_known_spectrum():
    """m = max(64, 2 × signal rank), at most the spectrum's size; the budget plays no part."""
    bulk = np.full(250, 1e-4)
    six = np.concatenate([np.linspace(10.0, 5.0, 6), bulk])  # a gap after 6 signal directions
    forty = np.concatenate([np.linspace(10.0, 5.0, 40), bulk[:216]])  # 40 of them (a pool of many clusters)
    assert signal_rank(six) == 6 and signal_rank(forty) == 40
    assert auto_sketch_dim(six) == 64  # the floor
    assert auto_sketch_dim(forty) == 80  # twice the signal rank
    assert auto_sketch_dim(six[:32]) == 32  # never more than the spectrum has (narrow features)
    assert auto_sketch_dim(six, floor=8) == 12 and auto_sketch_dim(six, floor=8, rank_multiple=3) == 18
    with pytest.raises(ValueError, match="floor"):
        auto_sketch_dim(six, floor=0)


def test_energy_share_rules_would_keep_only_the_mean_direction():
    """Why the rule is not an energy share (bench/README.md, "The automatic sketch dimension"): an uncentred moment
    of features with a common mean puts almost all its energy on the mean's direction — 90 % or even 99 % of the
    energy is one direction — while the selection needs the directions of variation."""
    rng = np.random.default_rng(0)
    X = 1.0 + 0.05 * rng.normal(size=(2000, 300)) @ rng.normal(size=(300, 300)) / np.sqrt(300)
    lam = _eigen_moments(X)[0]
    assert lam[0] / lam.sum() > 0.99  # the mean's direction
    assert auto_sketch_dim(lam) == 64


def _low_rank_pool(N=600, d=300, rank=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, rank)) @ rng.normal(size=(rank, d)) * 3 + 0.05 * rng.normal(size=(N, d))


def test_automatic_m_is_recorded_and_follows_the_rule():
    X = _low_rank_pool()
    sel = SkMMv2(40, sketch_dim="auto", random_state=0).fit(X)
    auto = sel.selection_.info["auto_sketch"]
    S, _ = sketch_pool(X, AUTO_M_MAX, int(np.random.default_rng(0).integers(2**31)))  # the selector's draw
    assert auto["m_max"] == AUTO_M_MAX
    assert auto["m"] == auto_sketch_dim(_eigen_moments(S)[0]) == 64  # 6 signal directions: the floor of 64
    assert auto["signal_rank"] == 6 and 0.9 <= auto["energy_share"] <= 1.0 and "signal rank" in auto["rule"]
    again = SkMMv2(40, sketch_dim="auto", random_state=0).fit(X)
    np.testing.assert_array_equal(sel.indices_, again.indices_)
    for cls in (SkMM, SkMMBest):
        fitted = cls(40, sketch_dim="auto", random_state=0).fit(X)
        assert fitted.selection_.info["auto_sketch"]["m"] == 64
        assert np.unique(fitted.indices_).size == 40
    # the budget does not enter: n = 10 < m is the seeding rule's business
    S10, _, auto10 = selection_sketch(X, "auto", 0)
    assert S10.shape == (600, 64) and auto10["m"] == 64
    assert SkMMv2(10, sketch_dim="auto", random_state=0).fit(X).selection_.info["auto_sketch"]["m"] == 64
    with pytest.raises(ValueError, match="sketch_dim"):
        SkMMv2(10, sketch_dim="wide").fit(X)


def test_n_below_m_runs_the_greedy_step_after_half_the_budget():
    """Defect: with n < m SkMMv2 seeded all n rows by pivoted sampling and never reached its greedy step."""
    pool = make_gmm(600, 200, 4, 0.05, 1)
    sel = SkMMv2(20, sketch_dim=40, random_state=3).fit(pool.X)
    info = sel.selection_.info
    assert info["signal_rank"] <= 4
    assert info["seeded"] == 10  # ⌊n/2⌋ > signal rank: half pivoted, half greedy
    assert np.unique(sel.indices_).size == 20
    np.testing.assert_array_equal(sel.indices_, SkMMv2(20, sketch_dim=40, random_state=3).fit(pool.X).indices_)
    # an explicit seed count still works, and 0 means the greedy step from the first row
    assert SkMMv2(20, sketch_dim=40, seed_rows=0, random_state=3).fit(pool.X).selection_.info["seeded"] == 0
    with pytest.raises(ValueError, match="seed_rows"):
        SkMMv2(20, seed_rows=-1).fit(pool.X)
    with pytest.raises(ValueError, match="ridge"):
        SkMMv2(20, ridge="large").fit(pool.X)


@pytest.mark.parametrize("generator_seed", [1, 3, 4])
def test_convex_skmm_covers_every_cluster_where_the_paper_rule_collapses(generator_seed):
    """Defect: convex SkMM allots each cluster budget in proportion to its share of the pool, so discretising its
    weights drops small clusters (risk ~10^4× the full-data risk off the tuning pool). Pivoted seeding keeps them."""
    pool = make_gmm(800, 400, 12, 0.1, generator_seed)
    clusters = np.count_nonzero(pool.sizes)
    paper = [np.unique(pool.cluster[SkMM(40, sketch_dim=32, seeding="none", random_state=s).fit(pool.X).indices_]).size
             for s in range(3)]
    now = [np.unique(pool.cluster[SkMM(40, sketch_dim=32, random_state=s).fit(pool.X).indices_]).size
           for s in range(3)]
    assert min(paper) < clusters  # the paper's discretisation loses a cluster here
    assert now == [clusters] * 3
    with pytest.raises(ValueError, match="seeding"):
        SkMM(40, seeding="random").fit(pool.X)
