"""Projectors: JL accuracy, determinism across batch sizes and row order, spec round-trips, errors, CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skmm.sketch import KroneckerProjector, SketchSpec, make_projector, projector_from_spec

KINDS = ["gaussian", "rademacher", "sjlt", "kronecker"]
C, D = 12, 40  # Kronecker factor shapes: r = 480


def build(kind: str, m: int = 128, seed: int = 7, **kw):
    extra = {"left_dim": C, "right_dim": D} if kind == "kronecker" else {"block_rows": 100}
    return make_projector(kind, C * D, m, seed, **extra, **kw)


def relative_distance_error(X: np.ndarray, Y: np.ndarray) -> float:
    i, j = np.triu_indices(X.shape[0], 1)
    true = np.linalg.norm(X[i] - X[j], axis=1)
    sketched = np.linalg.norm(Y[i] - Y[j], axis=1)
    return float(np.mean(np.abs(sketched / true - 1.0)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inputs", ["dense", "rank_one"])
def test_jl_pairwise_distance_error_in_band(kind, inputs):
    m = 256
    rng = np.random.default_rng(0)
    if inputs == "dense":
        X = rng.standard_normal((80, C * D))
    else:  # linear-head gradients (p − y) ⊗ φ
        X = np.einsum("nc,nd->ncd", rng.standard_normal((80, C)), rng.standard_normal((80, D))).reshape(80, -1)
    err = relative_distance_error(X, build(kind, m).project(X)) * np.sqrt(m)
    # SKMM.md: 0.6/√m – 0.9/√m, ±50%.
    assert 0.3 <= err <= 1.35, f"{kind} on {inputs} rows: error·√m = {err:.3f}"


@pytest.mark.parametrize("kind", KINDS)
def test_same_rows_whatever_the_batch_size_or_order(kind):
    X = np.random.default_rng(1).standard_normal((1000, C * D)).astype(np.float32)
    proj = build(kind)
    full = proj.project(X)
    scale = np.abs(full).max()
    rows = np.arange(0, 1000, 97)  # batch size 1 on a subset of rows, to stay fast
    single = np.concatenate([proj.project(X[i:i + 1]) for i in rows])
    np.testing.assert_allclose(single, full[rows], rtol=1e-5, atol=1e-5 * scale)
    for size in (7, 1000):
        parts = np.concatenate([proj.project(X[i:i + size]) for i in range(0, 1000, size)])
        np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-5 * scale)
    perm = np.random.default_rng(2).permutation(1000)
    np.testing.assert_allclose(proj.project(X[perm]), full[perm], rtol=1e-5, atol=1e-5 * scale)
    # A fresh projector from the same spec (another process, another machine) is the same map.
    np.testing.assert_allclose(projector_from_spec(proj.spec.to_dict()).project(X), full, rtol=1e-5,
                               atol=1e-5 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_changes_the_map_and_cache_does_not(kind):
    X = np.random.default_rng(3).standard_normal((5, C * D))
    a, b = build(kind, seed=1).project(X), build(kind, seed=2).project(X)
    assert not np.allclose(a, b)
    proj = build(kind, seed=1)
    if kind != "kronecker":
        proj.cache_bytes = 0  # regenerate every block every time: same numbers
    np.testing.assert_array_equal(proj.project(X), proj.project(X))
    np.testing.assert_allclose(proj.project(X), a, rtol=1e-6)


def test_block_rows_is_part_of_the_identity():
    a = make_projector("gaussian", 300, 16, 0, block_rows=100).spec
    b = make_projector("gaussian", 300, 16, 0, block_rows=50).spec
    assert a.digest != b.digest
    assert SketchSpec.from_dict(a.to_dict()) == a
    assert SketchSpec.from_dict(a.to_dict()).digest == a.digest


def test_gaussian_entries_have_variance_one_over_m():
    m = 64
    gamma = make_projector("gaussian", 2000, m, 5, block_rows=256).project(np.eye(2000))
    assert gamma.shape == (2000, m)
    assert abs(gamma.mean()) < 3 / np.sqrt(gamma.size * m)
    assert abs(gamma.var() * m - 1.0) < 0.02


def test_kronecker_factors_equal_explicit_outer_products():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((9, C)), rng.standard_normal((9, D))
    proj = KroneckerProjector(C, D, 64, random_state=3).fit()
    explicit = np.einsum("nc,nd->ncd", a, b).reshape(9, -1)
    np.testing.assert_allclose(proj.project_factors(a, b), proj.project(explicit), rtol=1e-4, atol=1e-5)


def test_torch_in_torch_out_and_float64():
    proj = make_projector("gaussian", 50, 8, 0, dtype="float64")
    X = torch.randn(4, 50, dtype=torch.float64)
    Y = proj.project(X)
    assert isinstance(Y, torch.Tensor) and Y.dtype == torch.float64 and Y.shape == (4, 8)
    np.testing.assert_allclose(Y.numpy(), proj.project(X.numpy()), rtol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_projector("gaussian", 10, 0), "output_dim"),
        (lambda: make_projector("gaussian", 0, 4), "input_dim"),
        (lambda: make_projector("gaussian", 10, 4, -1), "seed"),
        (lambda: make_projector("nope", 10, 4), "unknown sketch kind"),
        (lambda: make_projector("sjlt", 10, 6, nnz=4), "divisible"),
        (lambda: make_projector("kronecker", 10, 4, left_dim=3, right_dim=3), "left_dim"),
        (lambda: make_projector("gaussian", 10, 4).project(np.ones(10)), "2-D"),
        (lambda: make_projector("gaussian", 10, 4).project(np.ones((2, 11))), "10 input coordinates"),
        (lambda: SketchSpec.from_dict({**make_projector("gaussian", 10, 4).spec.to_dict(), "x": 1}), "unknown"),
    ],
)
def test_bad_parameters_and_inputs_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    X = torch.randn(300, C * D)
    proj = build(kind)
    cpu = proj.project(X)
    gpu = proj.project(X.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


SJLT_R = 480  # blocks of 100 coordinates: four whole ones and a short fifth


@pytest.mark.parametrize("nnz", [1, 2])
@pytest.mark.parametrize("lo, hi", [(0, SJLT_R), (100, 300), (400, SJLT_R)])
def test_sjlt_dense_chunk_is_gamma_exactly(nnz, lo, hi):
    """The dense Γ that CUDA multiplies by holds exactly the signs the sparse sum adds: the sketch of the identity's
    rows (each output a single sign plus zeros)."""
    proj = make_projector("sjlt", SJLT_R, 16, 3, block_rows=100, nnz=nnz)
    gamma = proj.project(np.eye(SJLT_R, dtype=np.float32))
    dense = proj.dense_chunk(lo, hi)
    assert dense.dtype == torch.float32 and dense.shape == (hi - lo, 16)
    np.testing.assert_array_equal(dense.numpy(), gamma[lo:hi])
    assert ((dense != 0).sum(dim=1) == nnz).all()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("chunk_bytes", [16 * 100 * 8, 1 << 30])  # 1–2 blocks per chunk (a short last one); one chunk
def test_sjlt_dense_projection_equals_the_sparse_sum_to_rounding(monkeypatch, dtype, tol, chunk_bytes):
    """CUDA's path (matmul per chunk of Γ) run on the CPU: the same sketch as the sparse sum, to the summation
    order's rounding, whatever the chunking."""
    from skmm.sketch import sjlt

    monkeypatch.setattr(sjlt, "DENSE_CHUNK_BYTES", chunk_bytes)
    proj = make_projector("sjlt", SJLT_R, 16, 3, block_rows=100, nnz=2, dtype=dtype)
    X = torch.from_numpy(np.random.default_rng(0).standard_normal((9, SJLT_R))).to(getattr(torch, dtype))
    dense = proj._project_dense(X, proj.spec)
    torch.testing.assert_close(dense, proj._project(X, proj.spec), rtol=tol, atol=tol)


def test_sjlt_dense_chunk_bounds_are_checked():
    proj = make_projector("sjlt", SJLT_R, 16, 3, block_rows=100)
    for lo, hi in [(50, 100), (0, SJLT_R + 1), (200, 200), (-100, 10)]:
        with pytest.raises(ValueError, match="block boundary"):
            proj.dense_chunk(lo, hi)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sjlt_sketch_is_the_same_bits_on_every_run():
    """CUDA's index_add_ sums with atomics, in another order each run: the sparse sum's last bits changed from run
    to run. The dense matmul of one shape gives the same bits every time."""
    proj = make_projector("sjlt", 1 << 20, 512, 3)
    X = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 1 << 20), dtype=np.float32)).cuda()
    first = proj.project(X).cpu()
    for _ in range(3):
        assert torch.equal(proj.project(X).cpu(), first)
    torch.testing.assert_close(first, proj.project(X.cpu()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_threads_sharing_a_projector_get_its_rows_and_copies_start_with_an_empty_cache(kind):
    """The block cache had no lock: threads sharing a projector with a small cache raised KeyError from its
    eviction and miscounted its size."""
    import copy
    import pickle
    import sys
    from concurrent.futures import ThreadPoolExecutor

    proj = make_projector(kind, 4000, 32, 5, block_rows=50, cache_bytes=50 * 32 * 8 * 3)  # a few blocks' worth
    X = np.random.default_rng(1).standard_normal((8, 4000)).astype(np.float32)
    expected = make_projector(kind, 4000, 32, 5, block_rows=50).project(X)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the races show every run
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: proj.project(X), range(24)))
    finally:
        sys.setswitchinterval(interval)
    assert all(np.array_equal(r, expected) for r in results)
    assert proj._cached == sum(b.element_size() * b.numel() for block in proj._cache.values() for b in block)
    assert proj._cached <= proj.cache_bytes
    for other in (copy.deepcopy(proj), pickle.loads(pickle.dumps(proj))):
        assert other._cached == 0 and not other._cache
        assert np.array_equal(other.project(X), expected)
