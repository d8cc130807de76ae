"""The paper's synthetic pool and risk reproduce the authors' notebook; the table runner writes its outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from skmm.synthetic import make_gmm, ridge_risk
from skmm.synthetic.benchmark import SyntheticConfig, markdown_table, run_synthetic, summarize, write_report


def test_generator_follows_the_authors_draw_order():
    pool = make_gmm(seed=0)
    # Values of the authors' generator (default_rng(0), N=3000, r=5000, k=10, std_max=0.04).
    np.testing.assert_array_equal(pool.sizes, [50, 73, 103, 300, 283, 114, 610, 377, 641, 449])
    np.testing.assert_array_equal(pool.scales, [90, 70, 100, 60, 70, 100, 80, 70, 60, 60])
    assert pool.X.shape == (3000, 5000) and pool.y.shape == (3000,)
    # Row i of cluster c is a_c e_c + std_c Z_i; y is constant per cluster (no label noise).
    c = pool.cluster[0]
    assert pool.X[0, c] == pytest.approx(pool.scales[c], abs=0.5)
    for k in range(10):
        assert np.ptp(pool.y[pool.cluster == k]) == 0


def test_full_data_risk_matches_the_authors_notebook():
    pool = make_gmm(seed=0)
    risk, alpha = ridge_risk(pool.X, pool.y)
    assert alpha == pytest.approx(1e-3)
    assert risk == pytest.approx(4.18e-4, rel=0.01)  # the notebook logs "Full RR risk: 4.18e-04"


def test_uniform_reproduces_the_authors_uniform_column():
    pool = make_gmm(seed=0)
    risks = [ridge_risk(pool.X, pool.y, np.random.default_rng(s).choice(3000, 200, replace=False))[0]
             for s in range(4)]
    assert np.mean(risks) == pytest.approx(2.8e-3, rel=0.1)  # SKMM.md §6: 2.8e-3 ± 4e-4 at n=200


def test_bad_generator_parameters():
    with pytest.raises(ValueError, match="n_clusters"):
        make_gmm(n_samples=100, dim=5, n_clusters=10)
    with pytest.raises(ValueError, match="std_max"):
        make_gmm(std_max=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        make_gmm(n_samples=0)


def test_runner_writes_table_csv_and_plot(tmp_path):
    config = SyntheticConfig(n_samples=200, dim=60, n_clusters=4, sketch_dim=12, budgets=(16, 32), seeds=(0, 1),
                             methods=("skmm_best", "uniform", "herding", "kcenter"))
    result = run_synthetic(config)
    rows = result["rows"]
    # herding is deterministic: one seed; the others: every seed; skmm_best twice (proxy and val rule).
    assert len(rows) == 2 * 2 * 4 + 2
    for row in (r for r in rows if r["method"] == "skmm_best_val"):
        assert row["chosen"] in ("skmm", "skmm_v2", "skmm_greedy_pivots")  # the pipeline's three candidates
    # Prefix reading of sequential methods equals a direct run at the smaller budget.
    from skmm.select import make_selector

    pool = make_gmm(200, 60, 4, 0.04, 0)
    direct = make_selector("kcenter", 16, random_state=1).fit(pool.X).indices_
    risk_direct = ridge_risk(pool.X, pool.y, direct)[0]
    (row,) = [r for r in rows if r["method"] == "kcenter" and r["n"] == 16 and r["seed"] == 1]
    assert row["risk"] == pytest.approx(risk_direct)

    paths = write_report(result, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with paths["summary"].open() as fh:
        summary = list(csv.DictReader(fh))
    methods = (*config.methods, "skmm_best_val")
    assert {(s["method"], int(s["n"])) for s in summary} == {(m, n) for m in methods for n in (16, 32)}
    table = markdown_table(summarize(rows), result["full_data_risk"], list(methods))
    assert table.count("**") >= 2 * 2  # a bold (best) cell per budget (ties: the val rule may equal the proxy)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize(("third", "fourth"), [(False, False), (True, False), (True, True)])
def test_val_rule_keeps_the_candidate_with_the_lower_validation_risk(third, fourth):
    from skmm.synthetic.benchmark import validation_rows

    config = SyntheticConfig(n_samples=300, dim=80, n_clusters=5, sketch_dim=16, budgets=(12, 30), seeds=(0, 1),
                             methods=("skmm_best",), val_fraction=0.2, cache_scores=True, third_candidate=third,
                             pivoted_candidate=fourth)
    result = run_synthetic(config)
    pool = make_gmm(300, 80, 5, 0.04, 0)
    from skmm.select import SkMMBest

    variants = ("skmm", "skmm_v2", *(("skmm_greedy_pivots",) if third else ()), *(("skmm_pivoted",) if fourth else ()))
    for row in (r for r in result["rows"] if r["method"] == "skmm_best_val"):
        sel = SkMMBest(row["n"], sketch_dim=16, random_state=row["seed"], third_candidate=third,
                       pivoted_candidate=fourth).fit(pool.X)
        assert tuple(sel.selection_.info["candidates"]) == variants
        val = validation_rows(300, 0.2, row["seed"])
        assert val.size == 60
        risks = {v: ridge_risk(pool.X, pool.y, np.array(sel.selection_.info["candidates"][v]), eval_rows=val)[0]
                 for v in variants}
        expected = min(variants, key=lambda v: (risks[v], variants.index(v)))  # convex first on ties
        assert row["chosen"] == expected
        chosen = np.array(sel.selection_.info["candidates"][expected])
        assert row["risk"] == pytest.approx(ridge_risk(pool.X, pool.y, chosen)[0])


def test_leverage_scores_cached_once_equal_the_selector_on_an_exact_svd():
    config = SyntheticConfig(n_samples=200, dim=60, n_clusters=4, sketch_dim=12, budgets=(16, 32), seeds=(0, 1),
                             methods=("leverage", "ridge_leverage"), cache_scores=True)
    cached = run_synthetic(config)["rows"]
    direct = run_synthetic(SyntheticConfig(**{**config.__dict__, "cache_scores": False}))["rows"]
    assert [r["risk"] for r in cached] == pytest.approx([r["risk"] for r in direct])  # d <= 1024: exact SVD


def test_runner_rejects_a_budget_larger_than_the_pool():
    with pytest.raises(ValueError, match="larger than the pool"):
        run_synthetic(SyntheticConfig(n_samples=50, dim=20, n_clusters=3, budgets=(60,), seeds=(0,),
                                      methods=("uniform",)))


def test_risk_at_every_alpha_of_the_grid_contains_the_cv_pick():
    from skmm.synthetic.risk import DEFAULT_ALPHAS, ridge_risks_by_alpha

    pool = make_gmm(300, 80, 5, 0.04, 0)
    coreset = np.random.default_rng(3).choice(300, 24, replace=False)
    risk, alpha = ridge_risk(pool.X, pool.y, coreset)
    risks = ridge_risks_by_alpha(pool.X, pool.y, coreset)
    assert risks.shape == DEFAULT_ALPHAS.shape
    assert risks[list(DEFAULT_ALPHAS).index(alpha)] == risk  # the same fit as the CV's refit, to the bit
    assert risks.min() <= risk


def test_alpha_grid_rows_record_the_best_alpha_of_each_coreset():
    from skmm.synthetic.risk import ridge_risks_by_alpha

    config = SyntheticConfig(n_samples=300, dim=80, n_clusters=5, sketch_dim=16, budgets=(12, 30), seeds=(0,),
                             methods=("skmm_best", "uniform"), val_fraction=0.2, alpha_grid=True)
    rows = run_synthetic(config)["rows"]
    assert rows and all(r["risk_best_alpha"] <= r["risk"] and "best_alpha" in r for r in rows)
    pool = make_gmm(300, 80, 5, 0.04, 0)
    (row,) = [r for r in rows if r["method"] == "uniform" and r["n"] == 12]
    from skmm.select import make_selector

    coreset = make_selector("uniform", 12, random_state=0).fit(pool.X).indices_
    assert row["risk_best_alpha"] == ridge_risks_by_alpha(pool.X, pool.y, coreset).min()
    assert "risk_best_alpha" not in run_synthetic(SyntheticConfig(**{**config.__dict__, "alpha_grid": False,
                                                                      "methods": ("uniform",)}))["rows"][0]


def test_authors_cv_risk_depends_on_the_listing_order_and_fold_seed_removes_it():
    # the authors' 2-fold CV takes the coreset's contiguous halves: the same k-center set scores 1000x apart in its
    # farthest-first order and in pool order (the pool lists its clusters in turn, so each fold misses some)
    from skmm.select import make_selector

    pool = make_gmm(300, 80, 5, 0.04, 0)
    coreset = make_selector("kcenter", 8, random_state=0).fit(pool.X).indices_
    as_listed, in_pool_order = ridge_risk(pool.X, pool.y, coreset), ridge_risk(pool.X, pool.y, np.sort(coreset))
    assert as_listed[1] != in_pool_order[1] and in_pool_order[0] > 100 * as_listed[0]
    shuffled = ridge_risk(pool.X, pool.y, coreset, fold_seed=3)
    for order in (np.sort(coreset), coreset[::-1], np.random.default_rng(1).permutation(coreset)):
        assert ridge_risk(pool.X, pool.y, order, fold_seed=3) == shuffled  # a set: any order, the same bits


def test_shuffled_cv_rows_score_each_coreset_as_a_set():
    from skmm.select import make_selector

    config = SyntheticConfig(n_samples=300, dim=80, n_clusters=5, sketch_dim=16, budgets=(12,), seeds=(2,),
                             methods=("skmm_best", "uniform"), val_fraction=0.2, shuffled_cv=True)
    rows = run_synthetic(config)["rows"]
    pool = make_gmm(300, 80, 5, 0.04, 0)
    (row,) = [r for r in rows if r["method"] == "uniform"]
    coreset = make_selector("uniform", 12, random_state=2).fit(pool.X).indices_
    assert (row["risk_shuffled_cv"], row["alpha_shuffled_cv"]) == ridge_risk(pool.X, pool.y, coreset, fold_seed=2)
    (val_row,) = [r for r in rows if r["method"] == "skmm_best_val"]
    assert val_row["chosen_shuffled_cv"] in {"skmm", "skmm_v2", "skmm_gsignal", "skmm_pivoted"}
    assert "risk_shuffled_cv" not in run_synthetic(SyntheticConfig(**{**config.__dict__, "shuffled_cv": False,
                                                                       "methods": ("uniform",)}))["rows"][0]


def test_cv_errors_are_what_the_ridge_risk_chooses_alpha_from():
    # the CV's validation error per α of the grid: its argmin is the α ridge_risk picks, as listed and as a set
    from skmm.select import make_selector
    from skmm.synthetic.risk import DEFAULT_ALPHAS, cv_errors

    pool = make_gmm(300, 80, 5, 0.04, 0)
    coreset = make_selector("kcenter", 12, random_state=0).fit(pool.X).indices_
    for fold_seed in (None, 3):
        errors = cv_errors(pool.X, pool.y, coreset, fold_seed=fold_seed)
        assert errors.shape == DEFAULT_ALPHAS.shape and np.all(errors > 0)
        _, alpha = ridge_risk(pool.X, pool.y, coreset, fold_seed=fold_seed)
        assert DEFAULT_ALPHAS[int(np.argmin(errors))] == alpha
    assert not np.array_equal(cv_errors(pool.X, pool.y, coreset), cv_errors(pool.X, pool.y, np.sort(coreset)))


def test_one_fit_gives_the_risk_on_every_row_set_as_separate_fits_do():
    from skmm.select import make_selector
    from skmm.synthetic.risk import ridge_risk_on_rows

    pool = make_gmm(300, 80, 5, 0.04, 0)
    coreset = make_selector("kcenter", 12, random_state=0).fit(pool.X).indices_
    val = np.arange(0, 300, 7)
    for fold_seed in (None, 3):
        (full, on_val), alpha = ridge_risk_on_rows(pool.X, pool.y, coreset, (None, val), fold_seed=fold_seed)
        assert (full, alpha) == ridge_risk(pool.X, pool.y, coreset, fold_seed=fold_seed)
        assert (on_val, alpha) == ridge_risk(pool.X, pool.y, coreset, eval_rows=val, fold_seed=fold_seed)
