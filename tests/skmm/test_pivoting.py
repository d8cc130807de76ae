"""The seeding's pivot rule (issue 10, budgets about equal to the cluster count): "sampled" (∝ residual, the
default and the old behaviour, bitwise), "greedy" (arg-max residual) and a power β (∝ residual^β)."""

from __future__ import annotations

import numpy as np
import pytest

from skmm.select import SkMM, SkMMBest, SkMMv2
from skmm.select.adaptive import pivot_rule, randomly_pivoted_rows
from skmm.select.sketched_pivots import SketchedPivots


def _clusters(seed: int = 0, k: int = 10, big: int = 3000, small: int = 4, d: int = 32,
              noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """One big cluster and k − 1 small ones, each on its own axis: after the first pick in the big cluster, its
    many rows' noise outweighs (in total) a small cluster's few rows, though each small row's residual is ~1."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), [big] + [small] * (k - 1))
    X = np.zeros((labels.size, d))
    X[np.arange(labels.size), labels] = 1.0
    X += noise * rng.normal(size=X.shape)
    return X.astype(np.float32), labels


def test_greedy_covers_every_cluster_where_sampling_misses():
    X, labels = _clusters()
    for seed in range(4):
        sampled, _ = randomly_pivoted_rows(X, 10, np.random.default_rng(seed), block_rows=65536)
        greedy, _ = randomly_pivoted_rows(X, 10, np.random.default_rng(seed), block_rows=65536, pivoting="greedy")
        assert len(set(labels[sampled])) < 10  # the defect: picks land again in the big cluster's noise
        assert len(set(labels[greedy])) == 10
        for rule in ("banded", "directed"):
            rows, _ = randomly_pivoted_rows(X, 10, np.random.default_rng(seed), block_rows=65536, pivoting=rule)
            assert len(set(labels[rows])) == 10, rule


def test_directed_draws_a_member_of_the_argmax_cluster_not_its_outlier():
    X, labels = _clusters(big=400, small=40)
    top = randomly_pivoted_rows(X, 1, np.random.default_rng(0), block_rows=65536, pivoting="greedy")[0][0]
    drawn = [randomly_pivoted_rows(X, 1, np.random.default_rng(s), block_rows=65536, pivoting="directed")[0][0]
             for s in range(8)]
    assert all(labels[d] == labels[top] for d in drawn)  # the cluster the arg-max points at …
    assert len(set(drawn)) > 1  # … a member drawn from it, not always the outlier


def test_banded_draws_a_typical_row_where_greedy_takes_the_outlier():
    X, _ = _clusters(big=2000)
    norms = np.einsum("ij,ij->i", X.astype(np.float64), X.astype(np.float64))
    firsts = {randomly_pivoted_rows(X, 1, np.random.default_rng(s), block_rows=65536, pivoting="banded")[0][0]
              for s in range(8)}
    assert len(firsts) > 1 and all(norms[f] >= 0.5 * norms.max() for f in firsts)  # drawn within the band
    greedy = randomly_pivoted_rows(X, 1, np.random.default_rng(0), block_rows=65536, pivoting="greedy")[0][0]
    assert greedy == int(np.argmax(norms))


def test_a_larger_power_misses_fewer_clusters():
    X, labels = _clusters()

    def missed(pivoting):
        return sum(10 - len(set(labels[randomly_pivoted_rows(X, 10, np.random.default_rng(s), block_rows=65536,
                                                             pivoting=pivoting)[0]])) for s in range(6))

    assert missed("sampled") > missed(2.0) > missed(4.0) >= missed("greedy") == 0


@pytest.mark.parametrize("block_rows", [None, 700])
def test_sampled_is_the_old_rule_bitwise(block_rows):
    X, _ = _clusters(1, big=1500)
    old_rng, new_rng, one_rng = (np.random.default_rng(5) for _ in range(3))
    rows, basis = randomly_pivoted_rows(X, 12, old_rng, block_rows=block_rows)
    rows_s, basis_s = randomly_pivoted_rows(X, 12, new_rng, block_rows=block_rows, pivoting="sampled")
    rows_1, basis_1 = randomly_pivoted_rows(X, 12, one_rng, block_rows=block_rows, pivoting=1.0)
    assert rows == rows_s == rows_1
    assert np.array_equal(basis, basis_s) and np.array_equal(basis, basis_1)
    assert old_rng.random() == new_rng.random() == one_rng.random()  # the same generator state after


def test_greedy_is_deterministic_and_draws_nothing():
    X, _ = _clusters(2, big=1500)
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(99)
    rows_a, basis_a = randomly_pivoted_rows(X, 15, rng_a, block_rows=65536, pivoting="greedy")
    rows_b, basis_b = randomly_pivoted_rows(X, 15, rng_b, block_rows=65536, pivoting="greedy")
    assert rows_a == rows_b and np.array_equal(basis_a, basis_b)
    assert rng_a.random() == np.random.default_rng(0).random()  # the generator was not advanced
    residual = np.einsum("ij,ij->i", X.astype(np.float64), X.astype(np.float64))
    assert rows_a[0] == int(np.argmax(residual))  # the first pivot is the longest row


def test_power_draws_are_seeded():
    X, _ = _clusters(3, big=1500)
    a = randomly_pivoted_rows(X, 10, np.random.default_rng(4), block_rows=65536, pivoting=3.0)[0]
    b = randomly_pivoted_rows(X, 10, np.random.default_rng(4), block_rows=65536, pivoting=3.0)[0]
    assert a == b


@pytest.mark.parametrize("bad", ["argmax", 0, -1.0, float("nan"), True, None])
def test_bad_pivoting_is_rejected(bad):
    with pytest.raises(ValueError, match="pivoting"):
        pivot_rule(bad)
    with pytest.raises(ValueError, match="pivoting"):
        SkMMv2(8, pivoting=bad).fit(_clusters(big=100)[0])


def test_pivot_rule_values():
    assert pivot_rule("sampled") == pivot_rule(1.0) == (1.0, 0.0)
    assert pivot_rule("greedy") == pivot_rule("greedy_signal") == (np.inf, 0.0)
    assert pivot_rule("banded") == pivot_rule("banded_signal") == (1.0, 0.5)
    assert pivot_rule("directed") == pivot_rule("directed_signal") == (np.inf, 0.5)
    assert pivot_rule(2) == (2.0, 0.0)


@pytest.mark.parametrize("cls", [SkMM, SkMMv2])
def test_selectors_cover_every_cluster_at_the_cluster_count_with_greedy_pivots(cls):
    X, labels = _clusters(big=400, small=40)  # every cluster above the spectrum's gap: 10 signal directions
    greedy = cls(10, pivoting="greedy", random_state=0).fit(X)
    assert len(set(labels[greedy.indices_])) == 10
    assert greedy.get_params()["pivoting"] == "greedy"


@pytest.mark.parametrize("cls", [SkMMv2, SketchedPivots])
def test_default_is_sampled_bitwise(cls):
    assert cls(10).get_params()["pivoting"] == "auto"  # "auto" is "sampled" for every selector but convex SkMM
    X, _ = _clusters(4, big=800)
    a = cls(24, random_state=3).fit(X)
    b = cls(24, random_state=3, pivoting="sampled").fit(X)
    assert np.array_equal(a.indices_, b.indices_)


@pytest.mark.parametrize(("n", "rule"), [(10, "greedy_signal"), (49, "greedy_signal"), (50, "sampled"),
                                         (64, "sampled")])
def test_convex_default_pivots_greedily_only_at_a_tight_budget(n, rule):
    """Convex SkMM's "auto": greedy through the signal rank when n < 5 × signal rank (here 10), else sampled —
    the same rows as asking for that rule, and the rule it took is recorded."""
    X, _ = _clusters(4, big=800, small=60)
    assert SkMM(n).get_params()["pivoting"] == "auto"
    auto = SkMM(n, random_state=3).fit(X)
    assert auto.selection_.info["pivoting"] == rule
    assert np.array_equal(auto.indices_, SkMM(n, random_state=3, pivoting=rule).fit(X).indices_)


def test_convex_default_covers_the_clusters_at_the_cluster_count():
    """Where sampled pivots leave a small cluster out for some seed (the convex collapse of bench/README.md §14),
    the default covers every cluster for every seed."""
    X, labels = _clusters(big=600, small=60)
    assert min(len(set(labels[SkMM(10, random_state=s, pivoting="sampled").fit(X).indices_])) for s in range(6)) < 10
    assert min(len(set(labels[SkMM(10, random_state=s).fit(X).indices_])) for s in range(6)) == 10


def test_best_of_default_gives_each_candidate_its_own_rule():
    X, _ = _clusters(4, big=800, small=60)
    best = SkMMBest(10, random_state=3, pivoted_candidate=True).fit(X)
    sampled = SkMMBest(10, random_state=3, pivoted_candidate=True, pivoting="sampled").fit(X)
    auto, old = best.selection_.info["candidates"], sampled.selection_.info["candidates"]
    assert auto["skmm_v2"] == old["skmm_v2"] and auto["skmm_pivoted"] == old["skmm_pivoted"]
    assert auto["skmm"] != old["skmm"]  # n = 10 < 5 × 10: convex SkMM pivots greedily


def test_auto_pivoting_is_not_a_pivot_rule():
    with pytest.raises(ValueError, match="pivoting"):
        randomly_pivoted_rows(_clusters(big=100)[0], 4, np.random.default_rng(0), pivoting="auto")


def test_convex_greedy_signal_covers_the_clusters_where_sampled_pivots_miss():
    """Convex SkMM at n = the cluster count: sampled seeding (the default before "auto") leaves a small cluster
    out for some seed, greedy through the signal rank never."""
    X, labels = _clusters(big=600, small=60)  # signal rank 10 (the spectrum's widest gap is above the noise)
    old = [len(set(labels[SkMM(10, random_state=s, pivoting="sampled").fit(X).indices_])) for s in range(6)]
    new = [len(set(labels[SkMM(10, random_state=s, pivoting="greedy_signal").fit(X).indices_])) for s in range(6)]
    assert min(old) < 10
    assert min(new) == 10


def test_best_of_passes_pivoting_to_both_candidates():
    X, labels = _clusters(big=400, small=40)
    best = SkMMBest(10, pivoting="greedy", random_state=0).fit(X)
    for rows in best.selection_.info["candidates"].values():
        assert len(set(labels[rows])) == 10


def test_best_of_third_candidate_is_convex_skmm_with_greedy_signal_pivots_on_the_same_sketch_and_seed():
    from skmm.select.base import check_random_state
    from skmm.select.moment_matching import selection_sketch

    X, _ = _clusters(big=400, small=40)
    two = SkMMBest(12, sketch_dim=16, random_state=3).fit(X)
    three = SkMMBest(12, sketch_dim=16, random_state=3, third_candidate=True).fit(X)
    assert three.get_params()["third_candidate"] is True
    assert np.array_equal(two.indices_, three.indices_)  # the proxy still chooses between the first two
    cands = three.selection_.info["candidates"]
    assert list(cands) == ["skmm", "skmm_v2", "skmm_greedy_pivots"]
    assert {k: cands[k] for k in ("skmm", "skmm_v2")} == two.selection_.info["candidates"]
    rng = check_random_state(3)  # SkMMBest's own draws, in order: the sketch's seed, then the candidates'
    S, _, _ = selection_sketch(X, 16, int(rng.integers(2**31)))
    alone = SkMM(12, None, random_state=int(rng.integers(2**31)), pivoting="greedy_signal").fit(S)
    assert cands["skmm_greedy_pivots"] == alone.indices_.tolist()


@pytest.mark.parametrize("pivoting", ["greedy", 2.0, "sampled", "banded", "directed"])
def test_torch_twin_pivots_as_numpy(pivoting):
    torch = pytest.importorskip("torch")
    from skmm.select._torch_ops import pivoted_rows_on_device

    X, _ = _clusters(5, big=1500)
    rows, _ = randomly_pivoted_rows(X, 14, np.random.default_rng(7), block_rows=65536, pivoting=pivoting)
    rng = np.random.default_rng(7)
    rows_d = pivoted_rows_on_device(X, 14, rng, torch.device("cpu"), chunk_rows=700, pivoting=pivoting)
    assert rows_d == rows


def test_lead_pivots_greedy_then_sampled():
    X, labels = _clusters(6, big=1500)
    greedy, _ = randomly_pivoted_rows(X, 10, np.random.default_rng(0), block_rows=65536, pivoting="greedy")
    a, _ = randomly_pivoted_rows(X, 16, np.random.default_rng(1), block_rows=65536, pivoting="greedy", lead_pivots=10)
    b, _ = randomly_pivoted_rows(X, 16, np.random.default_rng(2), block_rows=65536, pivoting="greedy", lead_pivots=10)
    assert a[:10] == b[:10] == greedy  # the lead is the greedy rule's
    assert a[10:] != b[10:]  # the rest is drawn from the generator
    assert len(set(labels[a])) == 10
    none_rng, sampled_rng = np.random.default_rng(3), np.random.default_rng(3)
    zero, _ = randomly_pivoted_rows(X, 12, none_rng, block_rows=65536, pivoting="greedy", lead_pivots=0)
    sampled, _ = randomly_pivoted_rows(X, 12, sampled_rng, block_rows=65536)
    assert zero == sampled and none_rng.random() == sampled_rng.random()


@pytest.mark.parametrize("cls", [SkMM, SkMMv2])
def test_greedy_signal_covers_the_clusters_and_samples_beyond_the_signal_rank(cls):
    X, labels = _clusters(big=400, small=40)  # signal rank 10 < n = m = 32: 22 sampled pivots after the lead
    for seed in range(2):
        for pivoting in ("greedy_signal", "banded_signal", "directed_signal"):
            fitted = cls(10, pivoting=pivoting, random_state=seed).fit(X)
            assert len(set(labels[fitted.indices_])) == 10
    a = cls(32, pivoting="greedy_signal", random_state=0).fit(X).indices_
    b = cls(32, pivoting="greedy_signal", random_state=1).fit(X).indices_
    assert set(a[:10].tolist()) == set(b[:10].tolist())  # the greedy lead does not depend on the seed …
    assert set(a.tolist()) != set(b.tolist())  # … the sampled rest does


def test_torch_twin_greedy_lead_then_sampled():
    torch = pytest.importorskip("torch")
    from skmm.select._torch_ops import pivoted_rows_on_device

    X, _ = _clusters(5, big=1500)
    rows, _ = randomly_pivoted_rows(X, 16, np.random.default_rng(8), block_rows=65536, pivoting="greedy",
                                    lead_pivots=10)
    rows_d = pivoted_rows_on_device(X, 16, np.random.default_rng(8), torch.device("cpu"), chunk_rows=700,
                                    pivoting="greedy", lead_pivots=10)
    assert rows_d == rows


def test_best_of_pivoted_candidate_is_sketched_pivots_on_the_same_sketch_and_seed():
    from skmm.select import SketchedPivots
    from skmm.select.base import check_random_state
    from skmm.select.moment_matching import selection_sketch

    X, _ = _clusters(big=400, small=40)
    three = SkMMBest(30, sketch_dim=16, random_state=5, third_candidate=True).fit(X)
    four = SkMMBest(30, sketch_dim=16, random_state=5, third_candidate=True, pivoted_candidate=True).fit(X)
    assert four.get_params()["pivoted_candidate"] is True
    assert np.array_equal(three.indices_, four.indices_)  # the proxy still chooses between the first two
    cands = four.selection_.info["candidates"]
    assert list(cands) == ["skmm", "skmm_v2", "skmm_greedy_pivots", "skmm_pivoted"]
    assert {k: v for k, v in cands.items() if k != "skmm_pivoted"} == three.selection_.info["candidates"]
    rng = check_random_state(5)
    S, _, _ = selection_sketch(X, 16, int(rng.integers(2**31)))
    alone = SketchedPivots(30, None, random_state=int(rng.integers(2**31))).fit(S)
    assert cands["skmm_pivoted"] == alone.indices_.tolist() and len(set(cands["skmm_pivoted"])) == 30


def test_sketched_pivots_on_the_reduced_sketch_are_those_of_the_auto_fit():
    """The pipeline fits a selector built with sketch_dim="auto" on the already reduced N × m sketch
    (fit_on_reduced): the rows must be those of fitting the wide sketch."""
    from skmm.select import SketchedPivots
    from skmm.select.auto_sketch import fit_on_reduced
    from skmm.select.moment_matching import selection_sketch

    X, _ = _clusters(big=400, small=40)
    wide = SketchedPivots(25, "auto", random_state=9).fit(X)
    S, _, auto = selection_sketch(X, "auto", int(np.random.default_rng(9).integers(2**31)))
    reduced = fit_on_reduced(SketchedPivots(25, "auto", random_state=9), S, None, auto)
    assert wide.indices_.tolist() == reduced.indices_.tolist() and len(set(wide.indices_.tolist())) == 25
    assert wide.selection_.info["auto_sketch"] == reduced.selection_.info["auto_sketch"] == auto
    with pytest.raises(ValueError):
        SketchedPivots(5, pivoting="nonsense").fit(X)
