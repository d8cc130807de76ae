"""SkMMBest on a device: ``device`` reaches both candidates (sklearn-style parameter), and on a well-separated pool
the torch path keeps the numpy path's choice (SkMMv2's selection is identical; see skmm/select/_torch_ops.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skmm.select import make_selector
from skmm.select._torch_ops import device_label

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _separated(seed: int, N: int = 3000, m: int = 16, k: int = 8) -> np.ndarray:
    """A float32 sketch of k well-separated clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, m)) * 3
    return (centers[rng.integers(0, k, N)] + 0.3 * rng.normal(size=(N, m))).astype(np.float32)


def _same_choice_on(device: str, seed: int, sketch_dim) -> None:
    S = _separated(seed)
    want = make_selector("skmm_best", 40, sketch_dim=sketch_dim, random_state=seed).fit(S)
    best = make_selector("skmm_best", 40, sketch_dim=sketch_dim, random_state=seed, device=device)
    assert best.get_params()["device"] == device
    got = best.fit(S)
    info, ref = got.selection_.info, want.selection_.info
    assert info["candidates"]["skmm_v2"] == ref["candidates"]["skmm_v2"]  # SkMMv2 computes in float64: identical
    assert info["chosen"] == ref["chosen"] and np.array_equal(got.indices_, want.indices_)
    assert info["device"] == device_label(torch.device(device)) and ref["device"] == "numpy"


@pytest.mark.parametrize("seed,sketch_dim", [(0, None), (1, "auto")])
def test_skmm_best_on_torch_cpu_keeps_the_numpy_choice(seed, sketch_dim):
    _same_choice_on("cpu", seed, sketch_dim)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("seed,sketch_dim", [(0, None), (1, "auto")])
def test_skmm_best_on_cuda_keeps_the_numpy_choice(seed, sketch_dim):
    _same_choice_on("cuda", seed, sketch_dim)
