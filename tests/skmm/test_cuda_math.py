"""CUDA's math flags held for a call (skmm/_cuda_math.py). The flags are plain process state that any torch build
can set and read without a device, so these run on the CPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from skmm._cuda_math import cuda_math, held_flags, ieee_fp32, read_cuda_math
from skmm.select import _torch_ops

CUDA = torch.device("cuda")  # no device is used: only the flags
MATMUL, CONV = torch.backends.cuda.matmul, torch.backends.cudnn.conv
IEEE = held_flags(tf32=False)


def _everything() -> tuple:
    """Every TF32 flag of both of PyTorch's APIs (a legacy one that raises on reading: None), and cuDNN's others."""
    cudnn = torch.backends.cudnn
    legacy = []
    for read in (torch.get_float32_matmul_precision, lambda: MATMUL.allow_tf32, lambda: cudnn.allow_tf32):
        try:
            legacy.append(read())
        except RuntimeError:  # "mix of the legacy and new APIs"
            legacy.append(None)
    new = (torch.backends.fp32_precision, cudnn.fp32_precision, MATMUL.fp32_precision, CONV.fp32_precision,
           cudnn.rnn.fp32_precision)
    return tuple(legacy), new, (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)


@pytest.fixture(autouse=True)
def flags_put_back():
    """The process's flags as they were, whatever the test set: the legacy flags first (setting them resets the
    new API's), then the new API's, parents before children."""
    before = _everything()
    yield
    cudnn = torch.backends.cudnn
    (precision, matmul_legacy, cudnn_legacy), new, (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) = before
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    if matmul_legacy is not None:
        MATMUL.allow_tf32 = matmul_legacy
    if cudnn_legacy is not None:
        cudnn.allow_tf32 = cudnn_legacy
    (torch.backends.fp32_precision, cudnn.fp32_precision, MATMUL.fp32_precision, CONV.fp32_precision,
     cudnn.rnn.fp32_precision) = new
    assert _everything() == before


def test_a_process_that_set_tf32_with_pytorchs_new_api_still_runs_ieee_calls():
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"`` is the way PyTorch now recommends; after it, reading
    the legacy ``allow_tf32`` raises, and so every CUDA embed, FT gradient, finetune and device selection call
    failed on entry."""
    MATMUL.fp32_precision = "tf32"
    CONV.fp32_precision = "tf32"
    with ieee_fp32(CUDA):
        assert read_cuda_math() == IEEE
        assert (MATMUL.fp32_precision, CONV.fp32_precision) == ("ieee", "ieee")
    assert (MATMUL.fp32_precision, CONV.fp32_precision) == ("tf32", "tf32")


def _set(state: str) -> None:
    if state == "legacy flags":
        MATMUL.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = False
    elif state == "set_float32_matmul_precision":
        torch.set_float32_matmul_precision("medium")
    elif state == "the new API":
        MATMUL.fp32_precision = "tf32"
        CONV.fp32_precision = "ieee"


STATES = ["never set", "legacy flags", "set_float32_matmul_precision", "the new API"]


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("state", STATES)
def test_a_call_sets_both_apis_consistently_and_puts_back_exactly_what_was_there(state, tf32):
    """Inside a call the two APIs agree (where they disagree, the legacy getters raise, and on torch whose
    cuBLAS calls read that getter, every matmul). After it, the new API's flags and cuDNN's others are as
    before, and so is every legacy getter that could be read before; one that raised (a state the process left
    mixed) is not written back and reads what the new API says."""
    _set(state)
    before = _everything()
    with cuda_math(CUDA, tf32=tf32):
        assert read_cuda_math() == held_flags(tf32)
        assert (MATMUL.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
        assert (MATMUL.fp32_precision, CONV.fp32_precision) == (("tf32",) * 2 if tf32 else ("ieee",) * 2)
    legacy, *rest = _everything()
    assert rest == list(before[1:])
    readable = [i for i, then in enumerate(before[0]) if then is not None]
    assert [legacy[i] for i in readable] == [before[0][i] for i in readable]


def test_nothing_is_touched_off_cuda():
    MATMUL.fp32_precision = "tf32"
    before = read_cuda_math()
    with ieee_fp32(torch.device("cpu")):
        assert read_cuda_math() == before


def test_the_device_selection_holds_ieee_math_as_the_other_cuda_calls_do(monkeypatch):
    """FISTA set and restored the legacy TF32 flag by hand, outside the lock the other calls share: a tf32
    embedding in another thread ran partly in IEEE mode, and whichever left last set the process's flag. It now
    waits for the tf32 call to leave and holds IEEE math itself."""
    seen: list[tuple] = []
    monkeypatch.setattr(_torch_ops, "_fista", lambda *args: seen.append(read_cuda_math()) or "result")
    held, release = threading.Event(), threading.Event()

    def tf32_call() -> None:
        with cuda_math(CUDA, tf32=True):
            held.set()
            release.wait(10)

    other = threading.Thread(target=tf32_call)
    other.start()
    held.wait(10)
    result: list = []
    fista = threading.Thread(target=lambda: result.append(_torch_ops.fista_on_device(
        np.zeros((2, 2)), 1, None, None, None, None, None, 1, 0.0, np.float32, CUDA)))
    fista.start()
    fista.join(0.5)
    assert fista.is_alive() and not seen  # waits while the tf32 call holds the flags
    release.set()
    other.join(10)
    fista.join(10)
    assert result == ["result"] and seen == [IEEE]
