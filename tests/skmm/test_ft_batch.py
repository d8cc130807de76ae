"""The FT batch size per device (issue 12 item 3): the arithmetic of ft_batch_size with given free-memory figures,
the CPU default (32, rows bitwise unchanged), the activation estimate against a measurement, and the halving
of a batch on a CUDA out-of-memory error (raised for real by a wrapper around the gradient step)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import gradients_out_of_memory_above
from sklearn.datasets import load_digits

from skmm.gradients.clip_ft import (
    CPU_BATCH,
    _Halving,
    _Suffix,
    build_ft_model,
    ft_activation_bytes,
    ft_batch_size,
    ft_gradient_sketch,
    ft_parameter_names,
)
from skmm.gradients.finetune import gradient_dim
from skmm.models import TINY_MODEL, ClipSpec
from storage.datasets import sample_id
from storage.ingest import render_digit_png

TINY = ClipSpec(TINY_MODEL)
N = 40
GiB = 2**30
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pool() -> tuple[list[bytes], list[str]]:
    digits = load_digits()
    images = [render_digit_png(digits.images[i], 32, "nearest") for i in range(N)]
    return images, [sample_id(b) for b in images]


def test_cpu_batch_is_32_whatever_the_memory():
    assert CPU_BATCH == 32
    assert ft_batch_size("cpu", 7_000_000, 512, memory_bytes=10**15) == 32
    assert ft_batch_size(torch.device("cpu"), 1, None, activation_bytes=10**12) == 32


def test_cuda_batch_arithmetic_with_a_given_memory():
    r, m = 7_000_000, 512
    per = 12 * r + 4 * m  # 3 float32 rows of r, the sketched row
    # A quarter of 140 GB over 84 MB per image: 416 images -> 256 (the largest power of two that fits).
    assert ft_batch_size("cuda", r, m, memory_bytes=140 * 10**9) == 256
    assert 256 * per <= 140 * 10**9 / 4 < 512 * per
    # Activations and fixed bytes count: exactly 64 images fit, 64 and one byte more do not.
    act, fixed = 5_000_000, 10**9
    budget = 64 * (per + act)
    assert ft_batch_size("cuda:0", r, m, activation_bytes=act, fixed_bytes=fixed,
                         memory_bytes=4 * (budget + fixed)) == 64
    assert ft_batch_size("cuda:0", r, m, activation_bytes=act, fixed_bytes=fixed,
                         memory_bytes=4 * (budget + fixed) - 4) == 32
    # Other fractions; the cap at 1024 (and at a smaller max_batch, rounded down to a power of two); the floor at 1.
    assert ft_batch_size("cuda", r, m, memory_bytes=128 * per, fraction=0.5) == 64
    assert ft_batch_size("cuda", 1000, None, memory_bytes=10**15) == 1024
    assert ft_batch_size("cuda", 1000, None, memory_bytes=10**15, max_batch=100) == 64
    assert ft_batch_size("cuda", r, m, memory_bytes=GiB) == 2
    assert ft_batch_size("cuda", r, m, memory_bytes=10**6) == 1
    assert ft_batch_size("cuda", r, m, fixed_bytes=10 * GiB, memory_bytes=4 * GiB) == 1
    with pytest.raises(ValueError, match="fraction"):
        ft_batch_size("cuda", r, m, memory_bytes=GiB, fraction=0)
    with pytest.raises(ValueError, match="num_params"):
        ft_batch_size("cuda", 0, m, memory_bytes=GiB)


def _saved_bytes(model, k: int, batch: int) -> int:
    """Bytes autograd saves for the backward of the suffix (last k blocks + head) on ``batch`` images."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    size = model.visual.image_size
    x = torch.randn(batch, 3, size[0], size[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.prefix(x, k)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _Suffix(model, k)(tokens).sum().backward()
    return total


@pytest.mark.parametrize("name", [TINY_MODEL, "ViT-B-32"])
@pytest.mark.parametrize("k", [1, 2])
def test_activation_estimate_covers_the_measured_saved_tensors_twice(name, k):
    """The per-image activation estimate is at least 2× what autograd saves per image (saved tensors + the
    backward's activation gradients), measured as the difference between batches of 2 and 1 (so the shared
    weights cancel). ViT-B-32 is built with random weights (no download)."""
    model, _ = build_ft_model(ClipSpec(name), 10, 0, "cpu")
    per_image = _saved_bytes(model, k, 2) - _saved_bytes(model, k, 1)
    assert per_image > 0
    assert ft_activation_bytes(model, k) >= 2 * per_image
    assert ft_activation_bytes(model, k) <= 8 * per_image + 10**6  # conservative, not absurd


def test_cpu_default_rows_are_bitwise_those_of_batch_32(pool):
    images, ids = pool
    auto, p_auto = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3, device="cpu")
    b32, p_32 = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3, batch_size=32,
                                   device="cpu")
    assert auto.tobytes() == b32.tobytes() and p_auto == p_32
    assert "batch_size" not in p_auto and "device" not in p_auto  # run settings, not what determines the rows


def test_batched_rows_halve_on_out_of_memory_and_log_once(caplog):
    calls: list[tuple[int, int]] = []

    def step(lo: int, hi: int) -> np.ndarray:
        calls.append((lo, hi))
        if hi - lo > 3:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test): {hi - lo} rows")
        return np.arange(lo, hi, dtype=np.float32)[:, None]

    with caplog.at_level(logging.WARNING, logger="skmm.gradients.clip_ft"):
        rows = _Halving(16).rows(21, step)
    np.testing.assert_array_equal(np.concatenate(rows)[:, 0], np.arange(21))
    # 16 fails, 8 fails, 4 fails, then 2-row batches for the rest: the failing batch is retried, not restarted.
    assert calls[:4] == [(0, 16), (0, 8), (0, 4), (0, 2)]
    assert all(hi - lo <= 2 for lo, hi in calls[3:])
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1


def test_batched_rows_reraise_at_one_and_pass_other_errors():
    def oom(lo: int, hi: int) -> np.ndarray:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        _Halving(4).rows(5, oom)

    def broken(lo: int, hi: int) -> np.ndarray:
        raise RuntimeError("not a memory error")

    with pytest.raises(RuntimeError, match="not a memory error"):
        _Halving(4).rows(5, broken)


def test_ft_gradient_sketch_recovers_from_out_of_memory(pool, monkeypatch, caplog):
    """The real gradient function, wrapped to raise a CUDA out-of-memory error above 5 images: a batch of 32
    ends as batches of 4, with the rows of a run at batch 4 (up to rounding) and one warning."""
    images, ids = pool
    ref, p_ref = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3, batch_size=4,
                                    device="cpu")
    sizes = gradients_out_of_memory_above(monkeypatch, 5)
    with caplog.at_level(logging.WARNING, logger="skmm.gradients.clip_ft"):
        got, p_got = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3,
                                        batch_size=32, device="cpu")
    assert sizes[:4] == [32, 16, 8, 4] and max(sizes[4:]) <= 4
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert p_got == p_ref
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1


@pytest.mark.gpu
@CUDA
def test_cuda_auto_batch_rows_equal_batch_32(pool):
    images, ids = pool
    model, _ = build_ft_model(TINY, 10, 3, "cuda")
    r = gradient_dim(model, ft_parameter_names(model, 1))
    assert ft_batch_size("cuda", r, 16, activation_bytes=ft_activation_bytes(model, 1)) >= 1
    auto, p_auto = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3, device="cuda")
    b32, p_32 = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3, batch_size=32,
                                   device="cuda")
    assert p_auto == p_32
    np.testing.assert_allclose(auto, b32, rtol=1e-5, atol=1e-6)


def test_cuda_batch_follows_the_devices_memory_not_what_is_free_now(monkeypatch):
    """Sized on the free memory, the batch (and so the rows' bits) depended on what else held the device at that
    moment: the other shard task in flight, another process. It is sized on the device's total memory now."""

    class Properties:
        total_memory = 140 * 10**9

    def free_memory(device=None):
        raise AssertionError("the batch must not depend on the memory free at the moment")

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Properties())
    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    assert ft_batch_size("cuda", 7_000_000, 512) == ft_batch_size("cuda", 7_000_000, 512, memory_bytes=140 * 10**9)
    assert ft_batch_size("cuda", 7_000_000, 512) == 256
