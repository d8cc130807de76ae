"""randomly_pivoted_rows made fast without changing a pick: frozen reference (the implementation before float64
blocks were kept across pivots and the draw skipped numpy's checks of p) against the current one, bit for bit —
rows, basis and the generator's state after — and the SkMM / SkMMv2 / adaptive selections built on it."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

import skmm.select.adaptive as adaptive
import skmm.select.greedy_moment_matching as greedy_mm
import skmm.select.moment_matching as convex_mm
from skmm.select import AdaptiveSampling, SkMM, SkMMv2
from skmm.select.adaptive import _choice_by_residual, randomly_pivoted_rows

# ------------------------------------------------------------------------ the frozen reference (do not edit)


def _ref_rows_float64(X: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], block_rows: int) -> np.ndarray:
    return np.concatenate([fn(X[lo:lo + block_rows].astype(np.float64)) for lo in range(0, X.shape[0], block_rows)])


def reference_pivoted_rows(
    X: np.ndarray, k: int, rng: np.random.Generator, exclude: np.ndarray | None = None,
    block_rows: int | None = None,
) -> tuple[list[int], np.ndarray]:
    if block_rows is None:
        residual = np.einsum("ij,ij->i", X, X).astype(np.float64)
    else:
        residual = _ref_rows_float64(X, lambda b: np.einsum("ij,ij->i", b, b), block_rows)
    if exclude is not None:
        residual[exclude] = 0.0
    picked: list[int] = []
    basis = np.zeros((min(k, X.shape[1]), X.shape[1]))
    rank = 0
    scale = residual.max() if residual.size else 0.0
    for _ in range(k):
        total = residual.sum()
        if total <= 1e-12 * max(scale, 1e-300) or rank == basis.shape[0]:
            taken = np.zeros(X.shape[0], dtype=bool)
            taken[picked] = True
            if exclude is not None:
                taken[exclude] = True
            free = np.flatnonzero(~taken)
            picked.extend(rng.choice(free, k - len(picked), replace=False).tolist())
            break
        p = int(rng.choice(X.shape[0], p=residual / total))
        q = X[p].astype(np.float64)
        for _ in range(2):
            q -= basis[:rank].T @ (basis[:rank] @ q)
        norm = np.linalg.norm(q)
        picked.append(p)
        residual[p] = 0.0
        if norm > 0:
            basis[rank] = q / norm
            direction = basis[rank]
            along = X @ direction if block_rows is None else _ref_rows_float64(X, lambda b, d=direction: b @ d,
                                                                                 block_rows)
            residual = np.maximum(residual - along**2, 0.0)
            residual[picked] = 0.0
            rank += 1
    return picked, basis[:rank]


# --------------------------------------------------------------------------------------------- helpers


def _pool(seed: int, N: int, m: int, dtype=np.float32, rank: int | None = None, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if clusters:
        X = rng.normal(size=(clusters, m))[rng.integers(0, clusters, N)] * 3 + rng.normal(size=(N, m))
    else:
        X = rng.normal(size=(N, m)) * rng.uniform(0.1, 3.0, m)
    if rank is not None:
        X = X[:, :rank] @ rng.normal(size=(rank, m))
    return X.astype(dtype)


def _assert_same(X, k, seed, exclude=None, block_rows=None):
    """Same rows, same basis bits, generator left in the same state."""
    got_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    rows, basis = randomly_pivoted_rows(X, k, got_rng, exclude=exclude, block_rows=block_rows)
    ref_rows, ref_basis = reference_pivoted_rows(X, k, ref_rng, exclude=exclude, block_rows=block_rows)
    assert rows == ref_rows
    assert basis.dtype == ref_basis.dtype and np.array_equal(basis, ref_basis)
    assert got_rng.bit_generator.state == ref_rng.bit_generator.state
    assert all(isinstance(r, int) for r in rows)
    return rows


# ------------------------------------------------------------------------------------------ the draw


@pytest.mark.parametrize("seed", range(6))
def test_draw_is_numpys_choice_with_p(seed):
    """Index and generator state equal rng.choice(N, p=residual / total) over many draws and residual shapes:
    zeros, runs of zeros, a single nonzero, tiny and huge scales, N = 1."""
    maker = np.random.default_rng(seed)
    got_rng, ref_rng = np.random.default_rng(seed + 100), np.random.default_rng(seed + 100)
    for trial in range(300):
        N = int(maker.choice([1, 2, 3, 17, 1000, 4099]))
        residual = maker.exponential(size=N) * 10.0 ** maker.integers(-150, 150)  # no overflow of the sum
        kind = trial % 5
        if kind == 1:
            residual[maker.random(N) < 0.7] = 0.0
        elif kind == 2:
            residual[:] = 0.0
            residual[maker.integers(N)] = maker.random() + 1e-3
        elif kind == 3:
            lo = int(maker.integers(N))
            residual[lo:lo + int(maker.integers(1, N + 1))] = 0.0
        elif kind == 4:
            residual = np.full(N, 0.1)  # equal masses: cdf steps land on rounding boundaries
        if not residual.any():
            residual[-1] = 1.0  # the pivoting never draws from an all-zero residual
        total = residual.sum()
        idx = _choice_by_residual(residual, total, got_rng, np.empty(N))
        assert idx == int(ref_rng.choice(N, p=residual / total))
        assert got_rng.bit_generator.state == ref_rng.bit_generator.state


def test_draw_rejects_non_finite_like_numpy():
    residual = np.array([1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        np.random.default_rng(0).choice(3, p=residual / residual.sum())
    with pytest.raises(ValueError, match="NaN"):
        _choice_by_residual(residual, residual.sum(), np.random.default_rng(0), np.empty(3))


# ------------------------------------------------------------------------------------ the whole pivoting


@pytest.mark.parametrize("block_rows", [None, 65536, 700])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("N", "m", "k"), [(5, 3, 3), (999, 1, 4), (3000, 16, 12), (4097, 37, 30), (2500, 200, 64)])
def test_same_picks_as_the_reference(N, m, k, dtype, block_rows):
    _assert_same(_pool(N + m, N, m, dtype), k, seed=N * 7 + m)


@pytest.mark.parametrize("block_rows", [None, 65536, 700])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_picks_with_exclude(dtype, block_rows):
    X = _pool(3, 3000, 16, dtype)
    exclude = np.random.default_rng(4).choice(3000, 900, replace=False)
    rows = _assert_same(X, 14, seed=5, exclude=exclude, block_rows=block_rows)
    assert not set(rows) & set(exclude.tolist())
    _assert_same(X, 40, seed=6, exclude=exclude, block_rows=block_rows)  # k > m: the uniform fill-up


@pytest.mark.parametrize("block_rows", [None, 65536, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_picks_when_the_rank_runs_out(dtype, block_rows):
    low = _pool(8, 2000, 24, dtype, rank=5)  # rank 5 of 24: residuals vanish after ~5 picks
    _assert_same(low, 20, seed=9, block_rows=block_rows)
    dup = np.repeat(_pool(10, 40, 12, dtype), 50, axis=0)  # 40 distinct rows, each 50 times
    rows = _assert_same(dup, 60, seed=11, block_rows=block_rows)
    assert len(set(rows)) == 60
    zero = np.zeros((300, 8), dtype=dtype)  # nothing to pivot on: all uniform
    _assert_same(zero, 10, seed=12, block_rows=block_rows)


@pytest.mark.parametrize("N", [65535, 65536, 65537, 70001])
def test_same_picks_across_a_65536_row_block_boundary(N):
    """Past 65536 rows: kept blocks keep the blocks' boundaries (on this machine's OpenBLAS one float64 matvec over
    70 001 × 37 rows differs in the last bits of a few rows from two 65536-row blocks')."""
    _assert_same(_pool(N, N, 37), 24, seed=N, block_rows=65536)


@pytest.mark.parametrize("cache_bytes", [None, 0, 700 * 16 * 8, 2 * 700 * 16 * 8 + 1, 1 << 30])
def test_same_picks_whatever_float64_blocks_are_kept(cache_bytes):
    """None of five 700-row blocks kept (the default), one, two, all: the same picks."""
    X = _pool(13, 3000, 16)
    for seed in (14, 15):
        got_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        rows, basis = randomly_pivoted_rows(X, 12, got_rng, block_rows=700, cache_bytes=cache_bytes)
        ref_rows, ref_basis = reference_pivoted_rows(X, 12, ref_rng, block_rows=700)
        assert rows == ref_rows and np.array_equal(basis, ref_basis)
        assert got_rng.bit_generator.state == ref_rng.bit_generator.state


def test_module_budget_is_the_default(monkeypatch):
    monkeypatch.setattr(adaptive, "FLOAT64_CACHE_BYTES", 1 << 30)
    X = _pool(23, 70001, 37)
    _assert_same(X, 24, seed=24, block_rows=65536)


@pytest.mark.parametrize("block_rows", [None, 65536, 700])
def test_same_picks_on_strided_and_misaligned_pools(block_rows):
    """A Fortran-ordered pool, a strided view and a float64 pool 8 bytes off 16-byte alignment."""
    X = _pool(16, 3000, 16)
    _assert_same(np.asfortranarray(X), 12, seed=17, block_rows=block_rows)
    _assert_same(_pool(18, 3000, 32)[:, ::2], 12, seed=19, block_rows=block_rows)
    raw = np.empty(3000 * 16 * 8 + 16, dtype=np.uint8)
    start = 8 if raw.ctypes.data % 16 == 0 else 0
    off = raw[start:start + 3000 * 16 * 8].view(np.float64).reshape(3000, 16)
    off[...] = X
    assert off.ctypes.data % 16 == 8 and off.flags.c_contiguous
    _assert_same(off, 12, seed=20, block_rows=block_rows)


# ----------------------------------------------------------------------------- the work done per pivot


class _CountingArray(np.ndarray):
    """A pool that counts conversions of its rows to float64 (whole-pool ones apart)."""

    conversions = 0

    def astype(self, dtype, *args, **kwargs):
        if np.dtype(dtype) == np.float64 and self.ndim == 2:
            type(self).conversions += 1
        return super().astype(dtype, *args, **kwargs).view(np.ndarray)


def test_row_blocks_are_converted_once_not_per_pivot():
    """The old loop converted every block of X to float64 at every pivot (k + 1 passes): now once."""
    X = _pool(21, 3000, 16).view(_CountingArray)
    _CountingArray.conversions = 0
    rows, _ = randomly_pivoted_rows(X, 12, np.random.default_rng(0), block_rows=700)
    assert len(rows) == 12
    assert _CountingArray.conversions == 5  # ⌈3000 / 700⌉ blocks, once each


def test_default_holds_no_float64_copy_of_the_pool():
    """By default one float64 block's buffer and O(N) vectors, never a float64 copy of the sketch (the selectors'
    rule, cf. test_skmm_v2_holds_no_n_by_m_state)."""
    X = _pool(25, 100_000, 64)
    randomly_pivoted_rows(X[:5000], 4, np.random.default_rng(0), block_rows=4096)  # first use
    for block_rows in (4096, 65536):
        tracemalloc.start()
        try:
            randomly_pivoted_rows(X, 16, np.random.default_rng(0), block_rows=block_rows)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < block_rows * 64 * 8 + 6 * 100_000 * 8 < 2 * X.nbytes, (block_rows, peak / X.nbytes)


# ------------------------------------------------------------------------------------------ selections


@pytest.mark.parametrize("seed", range(2))
def test_skmm_and_skmmv2_select_what_the_reference_selected(seed, monkeypatch):
    """A whole fit with the reference patched in, against one with the current function: same indices."""
    X = _pool(seed + 30, 6000, 24, clusters=8)
    selectors = (
        (convex_mm, lambda: SkMM(120, seeding="pivoted", random_state=seed)),
        (greedy_mm, lambda: SkMMv2(120, random_state=seed)),
        (adaptive, lambda: AdaptiveSampling(40, random_state=seed)),
    )
    def frozen(*args, pivoting="sampled", lead_pivots=None, **kwargs):  # the sampled rule is the frozen one
        assert pivoting == "sampled" and lead_pivots is None
        return reference_pivoted_rows(*args, **kwargs)

    for module, make in selectors:
        got = make().fit(X)
        with monkeypatch.context() as patch:
            patch.setattr(module, "randomly_pivoted_rows", frozen)
            ref = make().fit(X)
        assert np.array_equal(got.indices_, ref.indices_)
        assert got.selection_.info.get("seeded", 1) > 0
