"""The automatic sketch dimension streamed: a sketch that arrives in chunks (a stored table's row groups) gives the
moment, the projected rows and the selection of the in-memory ``sketch_dim="auto"`` path, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from skmm.select import make_selector
from skmm.select.auto_sketch import (
    BLOCK_ROWS,
    add_gram,
    auto_projection,
    eigen_moments,
    fit_on_reduced,
    moment_from_bytes,
    moment_to_bytes,
    project_rows,
    reblock,
)
from skmm.select.moment_matching import gram, selection_sketch

N = 2 * BLOCK_ROWS + 8000  # three moment blocks, the last one short


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    """A float32 m_max = 32 sketch of 12 clusters of unequal size."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 32)) * rng.uniform(0.3, 3.0, (12, 1))
    labels = rng.choice(12, N, p=np.arange(1, 13) / 78)
    return (centers[labels] + 0.2 * rng.normal(size=(N, 32))).astype(np.float32)


def chunks(S: np.ndarray, seed: int = 1):
    """(first row, rows) in uneven chunks (copies, as a table's row groups are), one of them exactly a block."""
    rng = np.random.default_rng(seed)
    lo = 0
    while lo < len(S):
        size = BLOCK_ROWS if lo == 0 else int(rng.integers(1, 9000))
        yield lo, S[lo:lo + size].copy()
        lo += size


def stream_gram(S: np.ndarray) -> np.ndarray:
    sigma = np.zeros((S.shape[1], S.shape[1]))
    for _, block in reblock(chunks(S), S.shape[1]):
        add_gram(sigma, block)
    return sigma


def test_reblock_yields_the_blocks_of_the_array_in_order():
    S = np.arange(2500 * 3, dtype=np.float32).reshape(2500, 3)
    parts = [(0, S[:256]), (256, S[256:263]), (263, S[263:900]), (900, S[900:901]), (901, S[901:])]
    got = [(lo, block.copy()) for lo, block in reblock(iter(parts), 3, block_rows=256)]
    assert [lo for lo, _ in got] == list(range(0, 2500, 256))
    for lo, block in got:
        assert np.array_equal(block, S[lo:lo + 256])
    first = next(reblock(iter(parts), 3, block_rows=256))[1]
    assert first is parts[0][1]  # an aligned full block passes through without a copy
    with pytest.raises(ValueError, match="consecutive"):
        list(reblock(iter([(0, S[:10]), (11, S[11:20])]), 3, block_rows=256))


def test_streamed_moment_and_projection_equal_the_in_memory_path_bitwise(pool):
    sigma = stream_gram(pool)
    assert np.array_equal(sigma, gram(pool))  # the same float64 sums, block for block
    for seed in (16, 40, 400):  # chunkings
        expected, spec, auto = selection_sketch(pool, "auto", random_state=7)
        lam, V = eigen_moments(sigma, N)
        V, got_auto = auto_projection(lam, V)
        out = project_rows(reblock(chunks(pool, seed=seed), pool.shape[1]), V, np.empty((N, V.shape[1]), np.float32))
        assert spec is None and got_auto == auto and auto["m_max"] == 32
        assert out.dtype == expected.dtype and np.array_equal(out, expected)


@pytest.mark.parametrize("method,params", [("skmm", {}), ("skmm_v2", {}), ("skmm_best", {}),
                                           ("skmm", {"discretization": "topk", "max_iter": 50})])
def test_fitting_the_streamed_projection_selects_as_fitting_the_wide_sketch(pool, method, params):
    n = 40
    selector = make_selector(method, n, sketch_dim="auto", random_state=5, **params)
    lam, V = eigen_moments(stream_gram(pool), N)
    V, auto = auto_projection(lam, V)
    reduced = project_rows(reblock(chunks(pool), pool.shape[1]), V, np.empty((N, V.shape[1]), np.float32))
    got = fit_on_reduced(selector, reduced, None, auto)
    want = make_selector(method, n, sketch_dim="auto", random_state=5, **params).fit(pool)
    assert np.array_equal(got.indices_, want.indices_)
    assert np.array_equal(got.weights_, want.weights_)
    assert got.get_params() == want.get_params() == selector.get_params()
    assert got.selection_.params == want.selection_.params
    assert got.selection_.info["auto_sketch"] == want.selection_.info["auto_sketch"] == auto
    assert selector.get_params()["sketch_dim"] == "auto" and not hasattr(selector, "indices_")
    with pytest.raises(ValueError, match="sketch_dim='auto'"):
        fit_on_reduced(make_selector(method, n, sketch_dim=8), reduced, None, auto)


def test_moment_bytes_round_trip_and_are_deterministic(pool):
    sigma = gram(pool[:5000])
    data = moment_to_bytes(sigma, 5000, sketch="a" * 64, dataset="b" * 64)
    assert data == moment_to_bytes(sigma.copy(), 5000, dataset="b" * 64, sketch="a" * 64)
    back, info = moment_from_bytes(data)
    assert np.array_equal(back, sigma) and back.dtype == np.float64
    assert info == {"format": "skmm-sketch-moment/1", "num_rows": 5000, "block_rows": BLOCK_ROWS,
                    "sketch": "a" * 64, "dataset": "b" * 64}
    with pytest.raises(ValueError, match="not a sketch-moment file"):
        moment_from_bytes(b"\x00" * 40)
