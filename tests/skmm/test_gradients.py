"""Stage-1 gradients: LP features and head-gradient factors, FT per-sample gradients, streamed sketching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skmm.gradients import (
    gradient_dim,
    iter_sketch_gradients,
    last_k_parameter_names,
    linear_head_gradient_factors,
    normalize_features,
    per_sample_gradients,
    pseudo_labels,
    sketch_gradients,
)
from skmm.sketch import GaussianProjector, KroneckerProjector, make_projector


def _mlp(dtype: torch.dtype = torch.float64, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, classes)).to(dtype)


def _convnet(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.to(dtype)


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


# --------------------------------------------------------------------------- per-sample gradients (FT)

@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_per_sample_gradients_match_autograd_loop(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        model, x, classes = _mlp(), torch.randn(9, 6, generator=g, dtype=torch.float64), 5
        names = ["3.weight", "0.bias", "3.bias"]  # order of param_names is kept, not the model's
    else:
        model, x, classes = _convnet(), torch.randn(9, 2, 6, 6, generator=g, dtype=torch.float64), 4
        names = ["0.weight", "1.weight", "4.weight"]
    y = torch.randint(0, classes, (9,), generator=g)
    model.train()
    got = per_sample_gradients(model, x, y, names)
    assert model.training, "the previous train/eval mode must be restored"
    want = _loop_grads(model, x, y, names)
    assert got.shape == (9, gradient_dim(model, names))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_mse_and_callable_loss() -> None:
    model = _mlp(classes=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.randn(4, dtype=torch.float64)
    names = ["3.weight"]
    mse = per_sample_gradients(model, x, t, names, loss="mse")
    def half_sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.reshape(-1) - y) ** 2).sum()

    half_sq = per_sample_gradients(model, x, t, names, loss=half_sq_loss)
    torch.testing.assert_close(mse, 2 * half_sq)


def test_per_sample_gradients_errors() -> None:
    model = _mlp()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown parameter"):
        per_sample_gradients(model, x, [0, 1, 2], ["nope.weight"])
    with pytest.raises(ValueError, match="empty"):
        per_sample_gradients(model, x, [0, 1, 2], [])
    with pytest.raises(ValueError, match="duplicates"):
        per_sample_gradients(model, x, [0, 1, 2], ["3.bias", "3.bias"])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        per_sample_gradients(model, x, [0, 1, 7], ["3.bias"])
    with pytest.raises(ValueError, match="3 entries"):
        per_sample_gradients(model, x, [0, 1], ["3.bias"])
    with pytest.raises(ValueError, match="NaN"):
        per_sample_gradients(model, x.clone().fill_(float("nan")), [0, 1, 2], ["3.bias"])


def test_last_k_parameter_names_rules() -> None:
    mlp = _mlp()
    assert last_k_parameter_names(mlp, 1) == ["3.weight", "3.bias"]
    assert last_k_parameter_names(mlp, 2) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert last_k_parameter_names(mlp, 1, head="0") == ["0.weight", "0.bias", "3.weight", "3.bias"]
    with pytest.raises(ValueError, match="more than"):
        last_k_parameter_names(mlp, 3)

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.resblocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.ln_post = nn.LayerNorm(2)

    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = Tower()
            self.head = nn.Linear(2, 3)

    model = WithHead()
    assert last_k_parameter_names(model, 2) == [
        "visual.transformer.resblocks.1.weight", "visual.transformer.resblocks.1.bias",
        "visual.transformer.resblocks.2.weight", "visual.transformer.resblocks.2.bias",
    ]
    assert last_k_parameter_names(model, 1, head=model.head)[-2:] == ["head.weight", "head.bias"]
    model.text = Tower()  # a second tower makes the rule ambiguous
    with pytest.raises(ValueError, match="blocks="):
        last_k_parameter_names(model, 1)
    assert last_k_parameter_names(model, 1, blocks="text.transformer.resblocks") == [
        "text.transformer.resblocks.2.weight", "text.transformer.resblocks.2.bias"]


# --------------------------------------------------------------------------- pseudo-labels

def test_pseudo_labels_depend_only_on_seed_and_key() -> None:
    keys = np.arange(500)
    whole = pseudo_labels(keys, 7, seed=3)
    assert whole.dtype == np.int64 and whole.shape == (500,)
    batched = np.concatenate([pseudo_labels(keys[i:i + 13], 7, seed=3) for i in range(0, 500, 13)])
    np.testing.assert_array_equal(whole, batched)
    perm = np.random.default_rng(0).permutation(500)
    np.testing.assert_array_equal(pseudo_labels(keys[perm], 7, seed=3), whole[perm])
    np.testing.assert_array_equal(pseudo_labels([int(k) for k in keys], 7, 3), whole)  # python ints
    assert not np.array_equal(pseudo_labels(keys, 7, seed=4), whole)
    ids = [f"sha256:{k:04x}" for k in range(50)]
    np.testing.assert_array_equal(pseudo_labels(ids[::-1], 7, 3)[::-1], pseudo_labels(ids, 7, 3))
    assert pseudo_labels([5], 7, 3)[0] == pseudo_labels(["5"], 7, 3)[0]  # documented: same key text


def test_pseudo_labels_roughly_uniform() -> None:
    C, N = 10, 20_000
    counts = np.bincount(pseudo_labels(range(N), C, seed=0), minlength=C)
    chi2 = ((counts - N / C) ** 2 / (N / C)).sum()
    assert chi2 < 30, counts  # chi-square, 9 dof: P(chi2 > 30) ≈ 4e-4


def test_pseudo_labels_errors() -> None:
    with pytest.raises(TypeError, match="ints"):
        pseudo_labels([1.5], 3, 0)
    with pytest.raises(ValueError, match="seed"):
        pseudo_labels([1], 3, -1)
    with pytest.raises(ValueError, match="num_classes"):
        pseudo_labels([1], 0, 0)


# --------------------------------------------------------------------------- streamed sketching

def _pool(n: int = 23) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(2))


def test_sketch_gradients_is_independent_of_batching_and_order() -> None:
    model = _mlp(torch.float32)
    names = last_k_parameter_names(model, 1)
    r = gradient_dim(model, names)
    proj = GaussianProjector(r, 16, random_state=5, block_rows=7).fit()
    X, keys = _pool(), np.arange(23)

    def run(bs: int, order: np.ndarray) -> np.ndarray:
        Xo = X[torch.from_numpy(order)]
        return sketch_gradients(model, Xo.split(bs), names, proj, num_classes=5, seed=11,
                                sample_keys=keys[order])

    ident = np.arange(23)
    ref = run(23, ident)
    assert ref.shape == (23, 16) and ref.dtype == np.float32
    for bs in (1, 7):
        np.testing.assert_allclose(run(bs, ident), ref, rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(1).permutation(23)
    np.testing.assert_allclose(run(7, perm), ref[perm], rtol=1e-5, atol=1e-6)

    # it is G Γ for the pseudo-labelled gradient matrix G
    G = per_sample_gradients(model, X, torch.from_numpy(pseudo_labels(keys, 5, 11)), names)
    np.testing.assert_allclose(proj.project(G.numpy()), ref, rtol=1e-5, atol=1e-6)

    str_keys = [f"k{i}" for i in range(23)]
    streamed = list(iter_sketch_gradients(model, X.split(10), names, proj, 5, 11, str_keys))
    assert [len(k) for k, _ in streamed] == [10, 10, 3] and streamed[0][0][0] == "k0"


def test_sketch_gradients_errors() -> None:
    model = _mlp(torch.float32)
    names = last_k_parameter_names(model, 1)
    X = _pool()
    with pytest.raises(ValueError, match="input_dim"):
        sketch_gradients(model, [X], names, GaussianProjector(99, 4).fit(), 5, 0, range(23))
    proj = GaussianProjector(gradient_dim(model, names), 4).fit()
    with pytest.raises(ValueError, match="23 samples but sample_keys has 30"):
        sketch_gradients(model, [X], names, proj, 5, 0, range(30))
    with pytest.raises(ValueError, match="more samples"):
        sketch_gradients(model, [X], names, proj, 5, 0, range(20))
    with pytest.raises(TypeError, match="input tensors only"):
        sketch_gradients(model, [(X, torch.zeros(23))], names, proj, 5, 0, range(23))
    with pytest.raises(ValueError, match="model's number"):
        sketch_gradients(model, [X], names, proj, 9, 0, range(23))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sketch_gradients_cuda_matches_cpu() -> None:
    model = _mlp(torch.float32)
    names = last_k_parameter_names(model, 2)
    proj = GaussianProjector(gradient_dim(model, names), 8, random_state=1).fit()
    X = _pool()
    cpu = sketch_gradients(model, X.split(5), names, proj, 5, 0, range(23))
    gpu = sketch_gradients(model.cuda(), X.split(5), names, proj, 5, 0, range(23))  # inputs follow the model
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- linear probing

def test_normalize_features() -> None:
    X = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    out = normalize_features(X)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]])
    t = normalize_features(torch.tensor(X, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6)
    assert normalize_features(np.ones((2, 3), dtype=np.float32)).dtype == np.float32
    assert normalize_features(np.ones((2, 3), dtype=np.int64)).dtype == np.float64
    with pytest.raises(ValueError, match="2-D"):
        normalize_features(np.ones(3))
    with pytest.raises(ValueError, match="row 1"):
        normalize_features(np.array([[1.0, 2.0], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match="row 0"):
        normalize_features(torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="empty"):
        normalize_features(np.ones((0, 3)))


def test_linear_head_factors_match_autograd_and_kronecker_sketch() -> None:
    rng = np.random.default_rng(0)
    n, C, d = 6, 4, 5
    phi = normalize_features(rng.normal(size=(n, d)))
    y = pseudo_labels(range(n), C, seed=2)
    head = nn.Linear(d, C, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(size=(C, d))))
    logits = head(torch.from_numpy(phi)).detach().numpy()

    left, right = linear_head_gradient_factors(phi, y, C, logits=logits)
    explicit = np.einsum("bc,bd->bcd", left, right).reshape(n, C * d)  # vec(M), x[c*d + j]
    want = per_sample_gradients(head, torch.from_numpy(phi), torch.from_numpy(y), ["weight"]).numpy()
    np.testing.assert_allclose(explicit, want, rtol=1e-10, atol=1e-12)
    for i in range(n):  # and plain autograd
        head.zero_grad()
        F.cross_entropy(head(torch.from_numpy(phi[i:i + 1])), torch.from_numpy(y[i:i + 1])).backward()
        np.testing.assert_allclose(explicit[i], head.weight.grad.numpy().reshape(-1), rtol=1e-10, atol=1e-12)

    proj = KroneckerProjector(left_dim=C, right_dim=d, output_dim=32, random_state=3, dtype="float64").fit()
    sketched = proj.project(explicit)
    np.testing.assert_allclose(proj.project_factors(left, right), sketched, rtol=1e-10, atol=1e-12)
    kron = make_projector("kronecker", C * d, 32, random_state=3, left_dim=C, right_dim=d, dtype="float64")
    np.testing.assert_allclose(kron.project_factors(left, right), proj.project(explicit), rtol=1e-10)

    # probs= gives the same factors; no head means a zero-initialised one (p = 1/C)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    np.testing.assert_allclose(linear_head_gradient_factors(phi, y, C, probs=probs)[0], left, rtol=1e-12)
    zero = linear_head_gradient_factors(phi, y, C)[0]
    np.testing.assert_allclose(zero, linear_head_gradient_factors(phi, y, C, logits=np.zeros((n, C)))[0])
    np.testing.assert_allclose(zero.sum(1), 0.0, atol=1e-12)

    # torch in, torch out
    lt, rt = linear_head_gradient_factors(torch.from_numpy(phi), torch.from_numpy(y), C, logits=logits)
    assert isinstance(lt, torch.Tensor) and isinstance(rt, torch.Tensor)
    np.testing.assert_allclose(lt.numpy(), left, rtol=1e-12)


def test_linear_head_factors_errors() -> None:
    phi = np.ones((3, 2))
    with pytest.raises(ValueError, match="2-D"):
        linear_head_gradient_factors(np.ones(3), [0, 1, 2], 3)
    with pytest.raises(ValueError, match="NaN"):
        linear_head_gradient_factors(np.array([[1.0, np.nan]]), [0], 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        linear_head_gradient_factors(phi, [0, 1, 3], 3)
    with pytest.raises(ValueError, match="shape"):
        linear_head_gradient_factors(phi, [0, 1, 2], 3, logits=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="not both"):
        linear_head_gradient_factors(phi, [0, 1, 2], 3, logits=np.zeros((3, 3)), probs=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="rows summing to 1"):
        linear_head_gradient_factors(phi, [0, 1, 2], 3, probs=np.ones((3, 3)))
