"""SkMM (convex) and SkMMv2 as torch ops on a device: the same steps as the numpy path, equal to rounding.

Tested on torch's CPU device here; the CUDA tests (marked gpu) assert the same on a CUDA device. Bitwise equality
with numpy cannot hold (the products reduce in another order: skmm/select/_torch_ops.py), so the tests pin what
does: in float64 the device solver tracks numpy's to 1e-9 over 500 FISTA steps (the same algorithm, step for step);
in float32 (the selector's dtype) the weights agree to float32 rounding and the selections on well-separated pools
are identical. SkMMv2 computes in float64 as its numpy path does: its selections are identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skmm.select import SkMM, SkMMv2, make_selector, project_capped_simplex
from skmm.select._torch_ops import (
    CHUNK_ROWS,
    build_moments,
    device_label,
    pivoted_rows_on_device,
    project_capped_simplex_torch,
    resolve_device,
    top_k_torch,
)
from skmm.select.adaptive import randomly_pivoted_rows
from skmm.select.greedy_moment_matching import top_k
from skmm.select.moment_matching import moment_matching_weights

CPU = torch.device("cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _separated(seed: int, N: int = 2000, m: int = 16, k: int = 8) -> np.ndarray:
    """A float32 sketch of k well-separated clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, m)) * 3
    return (centers[rng.integers(0, k, N)] + 0.3 * rng.normal(size=(N, m))).astype(np.float32)


def _init(N: int, n: int, seed: int = 0) -> np.ndarray:
    init = np.zeros(N)
    init[np.random.default_rng(seed).choice(N, n, replace=False)] = 1.0 / n
    return init


# ------------------------------------------------------------------------------------------- projection


@pytest.mark.parametrize("seed", range(4))
def test_projection_on_device_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=3000) * rng.uniform(1e-3, 1.0)
    for cap, tau0 in [(1 / 300, None), (1 / 50, None), (1 / 300, 0.01), (1 / 3000, None)]:
        w, tau = project_capped_simplex(v, cap, tau0=tau0)
        w_d, tau_d = project_capped_simplex_torch(torch.from_numpy(v), cap, tau0=tau0)
        np.testing.assert_allclose(w_d.numpy(), w, rtol=0, atol=1e-15)
        assert tau_d == pytest.approx(tau, abs=1e-14)
        assert float(w_d.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float(w_d.min()) >= 0 and float(w_d.max()) <= cap * (1 + 1e-12)
    with pytest.raises(ValueError, match="infeasible"):
        project_capped_simplex_torch(torch.from_numpy(v), 1 / 4000)


# ----------------------------------------------------------------------------------------------- solver


@pytest.mark.parametrize("ridge", [None, 0.1])
def test_float64_solver_tracks_numpy_step_for_step(ridge):
    """With float64 products the rounding differences stay at 1e-13: the device runs numpy's algorithm exactly."""
    S = _separated(0, N=4000, m=24, k=12)
    init = _init(4000, 80)
    w, info = moment_matching_weights(S, 80, max_iter=500, init=init, dtype=np.float64, ridge=ridge)
    w_d, info_d = moment_matching_weights(S, 80, max_iter=500, init=init, dtype=np.float64, ridge=ridge, device=CPU)
    np.testing.assert_allclose(w_d * 80, w * 80, rtol=0, atol=1e-9)
    assert info_d["objective"] == pytest.approx(info["objective"], rel=1e-9)
    assert info_d["steps"] == info["steps"]
    assert np.array_equal(info_d["strata"], info["strata"])
    assert info_d["eigenvalues"] == info["eigenvalues"]  # the moment is computed on the host, as before


def test_float32_solver_agrees_to_rounding():
    """Float32 products round differently from numpy's BLAS: after one step the weights agree to 1e-6 of the cap
    and the objective to 1e-4 relative; after 500 steps to 1e-4 of the cap and 1e-3 relative (FISTA's restarts
    carry the rounding differences, and f = ‖max(0, λ/c_S − Pᵀw)‖² is itself evaluated from float32 moments)."""
    S = _separated(1, N=3000)
    init = _init(3000, 60, seed=1)
    for steps, atol, rel in [(1, 1e-6, 1e-4), (500, 1e-4, 1e-3)]:
        w, info = moment_matching_weights(S, 60, max_iter=steps, init=init)
        w_d, info_d = moment_matching_weights(S, 60, max_iter=steps, init=init, device=CPU)
        np.testing.assert_allclose(w_d * 60, w * 60, rtol=0, atol=atol)
        assert info_d["objective"] == pytest.approx(info["objective"], rel=rel)
        assert abs(w_d.sum() - 1.0) < 1e-12 and w_d.max() <= (1 + 1e-12) / 60


def test_sketch_goes_over_in_chunks_with_the_same_result():
    S = _separated(2, N=5000, m=12)
    V = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 12)))[0]
    rel = np.linspace(1.0, 2.0, 12)
    P, strata = build_moments(S, V, rel, np.float32, CPU)
    P_small, strata_small = build_moments(S, V, rel, np.float32, CPU, chunk_rows=777)
    assert P.dtype == torch.float32 and P.shape == (5000, 12)
    assert torch.equal(P, P_small) and np.array_equal(strata, strata_small)
    H = S.astype(np.float64) @ V
    np.testing.assert_allclose(P.numpy(), (H * H).astype(np.float32), rtol=1e-6)
    assert np.array_equal(strata, np.argmax(H * H * rel, axis=1))
    assert CHUNK_ROWS >= 1 << 16


@pytest.mark.parametrize("seed", range(4))
def test_pivoted_seeding_on_device_draws_what_numpy_draws(seed):
    """Same uniform draws, same inverse CDF: the same rows, also past the rank (the uniform fill-up) and in chunks."""
    rng = np.random.default_rng(seed)
    S = (rng.normal(size=(3000, 16)) * rng.uniform(0.1, 3.0, 16)).astype(np.float32)
    if seed % 2:
        S[:, 5:] = 0.0  # rank 5: the last 7 of 12 rows are the uniform fill-up
    rows, _ = randomly_pivoted_rows(S, 12, np.random.default_rng(seed + 10), block_rows=65536)
    after = np.random.default_rng(seed + 10)
    rows_d = pivoted_rows_on_device(S, 12, after, CPU, chunk_rows=700)
    assert rows_d == rows and len(set(rows_d)) == 12
    reference = np.random.default_rng(seed + 10)
    randomly_pivoted_rows(S, 12, reference, block_rows=65536)
    assert after.random() == reference.random()  # the generator is left where numpy leaves it


# -------------------------------------------------------------------------------------------- selector


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("discretization", ["systematic", "topk"])
def test_skmm_on_the_device_selects_what_numpy_selects(seed, discretization):
    X = _separated(seed)
    cpu = SkMM(40, discretization=discretization, random_state=seed).fit(X)
    dev = SkMM(40, discretization=discretization, random_state=seed, device="cpu").fit(X)
    assert np.array_equal(dev.indices_, cpu.indices_)
    np.testing.assert_allclose(dev.weights_ * 40, cpu.weights_ * 40, rtol=0, atol=1e-4)
    assert dev.selection_.info["objective"] == pytest.approx(cpu.selection_.info["objective"], rel=1e-4)
    assert dev.selection_.info["device"] == "cpu" and cpu.selection_.info["device"] == "numpy"
    assert dev.selection_.params["device"] == "cpu" and cpu.selection_.params["device"] is None


def test_device_parameter_round_trips_and_auto_falls_back_to_numpy():
    X = _separated(4, N=600)
    sel = make_selector("skmm", 12, device="cpu", sketch_dim=8).fit(X)
    again = make_selector(sel.selection_.method, **sel.selection_.params).fit(X)
    assert np.array_equal(again.indices_, sel.indices_) and np.array_equal(again.weights_, sel.weights_)
    auto = SkMM(12, device="auto").fit(X)
    if torch.cuda.is_available():
        assert auto.selection_.info["device"].startswith("cuda:")
    else:  # no CUDA: "auto" is the numpy path, bit for bit
        plain = SkMM(12).fit(X)
        assert auto.selection_.info["device"] == "numpy"
        assert np.array_equal(auto.indices_, plain.indices_) and np.array_equal(auto.weights_, plain.weights_)


@pytest.mark.parametrize("device", ["tpu", "gpu", "", 3, torch.device("cpu")])
def test_bad_device_is_named(device):
    with pytest.raises(ValueError, match="device must be None, 'auto', 'cpu' or 'cuda"):
        SkMM(5, device=device, max_iter=5).fit(_separated(0, N=50))
    with pytest.raises(ValueError, match="device must be None, 'auto', 'cpu' or 'cuda"):
        SkMMv2(5, device=device).fit(_separated(0, N=50))


# ------------------------------------------------------------------------------------------------ SkMMv2


def test_top_k_on_device_breaks_ties_by_index():
    score = np.array([0.5, 2.0, 2.0, -np.inf, 1.0, 2.0, 0.5, 0.5, 3.0])
    for k in range(1, 9):
        assert top_k_torch(torch.from_numpy(score), k).tolist() == top_k(score, k).tolist()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("params", [{}, {"block_size": 4}, {"temperature": 0.1}, {"sketch_dim": 8},
                                    {"seed_rows": 0}, {"ridge": "spectral", "sketch_dim": "auto"}])
def test_skmm_v2_on_the_device_selects_what_numpy_selects(seed, params):
    """Float64 throughout, as the numpy path: the greedy picks are identical on well-separated pools."""
    X = _separated(seed, N=3000)
    cpu = SkMMv2(60, random_state=seed, **params).fit(X)
    dev = SkMMv2(60, random_state=seed, device="cpu", **params).fit(X)
    assert np.array_equal(dev.indices_, cpu.indices_)
    info, info_d = cpu.selection_.info, dev.selection_.info
    assert (info["device"], info_d["device"], dev.selection_.params["device"]) == ("numpy", "cpu", "cpu")
    assert {k: v for k, v in info_d.items() if k != "device"} == {k: v for k, v in info.items() if k != "device"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_device_is_a_clear_error():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        SkMM(5, device="cuda", max_iter=5).fit(_separated(0, N=50))
    assert resolve_device(None) is None and device_label(None) == "numpy"


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("seed", range(3))
def test_cuda_selection_equals_cpu(seed):
    X = _separated(seed)
    cpu = SkMM(40, random_state=seed).fit(X)
    gpu = SkMM(40, random_state=seed, device="cuda").fit(X)
    assert gpu.selection_.info["device"].startswith("cuda:")
    assert np.array_equal(gpu.indices_, cpu.indices_)
    np.testing.assert_allclose(gpu.weights_ * 40, cpu.weights_ * 40, rtol=0, atol=1e-4)
    assert gpu.selection_.info["objective"] == pytest.approx(cpu.selection_.info["objective"], rel=1e-4)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("params", [{}, {"block_size": 4}])
def test_cuda_skmm_v2_equals_cpu(params):
    X = _separated(1, N=3000)
    cpu = SkMMv2(60, random_state=1, **params).fit(X)
    gpu = SkMMv2(60, random_state=1, device="cuda", **params).fit(X)
    assert gpu.selection_.info["device"].startswith("cuda:")
    assert np.array_equal(gpu.indices_, cpu.indices_)


@pytest.mark.gpu
@CUDA
def test_cuda_float64_solver_tracks_numpy_and_memory_is_the_sketch_plus_vectors():
    S = _separated(0, N=4000, m=24, k=12)
    init = _init(4000, 80)
    w, info = moment_matching_weights(S, 80, max_iter=500, init=init, dtype=np.float64)
    w_d, info_d = moment_matching_weights(S, 80, max_iter=500, init=init, dtype=np.float64,
                                          device=torch.device("cuda"))
    np.testing.assert_allclose(w_d * 80, w * 80, rtol=0, atol=1e-9)
    assert info_d["objective"] == pytest.approx(info["objective"], rel=1e-9)
    N, m = 400_000, 32
    S = np.random.default_rng(1).normal(size=(N, m)).astype(np.float32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    moment_matching_weights(S, 1000, max_iter=20, device=torch.device("cuda"))
    peak = torch.cuda.max_memory_allocated() - base
    chunk = min(N, CHUNK_ROWS) * m
    assert peak <= N * m * 4 + 16 * N * 8 + 4 * chunk * 8, peak
    torch.cuda.reset_peak_memory_stats()
    rows = pivoted_rows_on_device(S, 32, np.random.default_rng(0), torch.device("cuda"))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= N * m * 4 + 16 * N * 8 + 4 * chunk * 8, peak
    assert rows == randomly_pivoted_rows(S, 32, np.random.default_rng(0), block_rows=65536)[0]
