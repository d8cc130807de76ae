"""CUDA's math flags held for a call (skmm/_cuda_math.py). The flags are plain process state that any torch build
can set and read without a device, so these run on the CPU."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from skmm._cuda_math import cuda_math, held_flags, ieee_fp32, read_cuda_math
from skmm.select import _torch_ops

CUDA = torch.device("cuda")  # no device is used: only the flags
MATMUL, CONV = torch.backends.cuda.matmul, torch.backends.cudnn.conv
IEEE = held_flags(tf32=False)
MKLDNN = torch.backends.mkldnn
#: Every fp32_precision field, parents before children: the CUDA ones a call holds and the others it must keep.
NEW_API = (torch.backends, torch.backends.cudnn, MKLDNN, MATMUL, CONV, torch.backends.cudnn.rnn, MKLDNN.matmul,
           MKLDNN.conv, MKLDNN.rnn)


def _everything() -> tuple:
    """Every TF32 flag of both of PyTorch's APIs (a legacy one that raises on reading: None), and cuDNN's others."""
    cudnn = torch.backends.cudnn
    legacy = []
    for read in (torch.get_float32_matmul_precision, lambda: MATMUL.allow_tf32, lambda: cudnn.allow_tf32):
        try:
            legacy.append(read())
        except RuntimeError:  # "mix of the legacy and new APIs"
            legacy.append(None)
    new = tuple(owner.fp32_precision for owner in NEW_API)
    return tuple(legacy), new, (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)


def _restore(state: tuple) -> None:
    """Put back a state :func:`_everything` read: the legacy flags first (setting them writes the new API's too),
    then every fp32_precision field, parents before children."""
    cudnn = torch.backends.cudnn
    (precision, matmul_legacy, cudnn_legacy), new, (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) = state
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    elif matmul_legacy is not None:
        MATMUL.allow_tf32 = matmul_legacy
    if cudnn_legacy is not None:
        cudnn.allow_tf32 = cudnn_legacy
    for owner, value in zip(NEW_API, new, strict=True):
        owner.fp32_precision = value


@pytest.fixture(autouse=True)
def flags_put_back():
    """The process's flags as they were, whatever the test set."""
    before = _everything()
    yield
    _restore(before)
    assert _everything() == before


def test_a_process_that_set_tf32_with_pytorchs_new_api_still_runs_ieee_calls():
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"`` is the way PyTorch now recommends; after it, reading
    the legacy ``allow_tf32`` raises, and so every CUDA embed, FT gradient, finetune and device selection call
    failed on entry."""
    MATMUL.fp32_precision = "tf32"
    CONV.fp32_precision = "tf32"
    with ieee_fp32(CUDA):
        assert read_cuda_math()._replace(bystanders=None) == IEEE
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
        assert read_cuda_math()._replace(bystanders=None) == held_flags(tf32)
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
    held, release, leaving = threading.Event(), threading.Event(), threading.Event()

    def fista(*args) -> str:  # what FISTA runs under, and whether the tf32 call was still inside then
        seen.append((read_cuda_math()._replace(bystanders=None), not leaving.is_set()))
        return "result"

    monkeypatch.setattr(_torch_ops, "_fista", fista)

    def tf32_call() -> None:
        with cuda_math(CUDA, tf32=True):
            held.set()
            release.wait(10)
            leaving.set()  # still holding: nothing waiting for the flags can have run before this

    other = threading.Thread(target=tf32_call)
    other.start()
    held.wait(10)
    result: list = []
    runner = threading.Thread(target=lambda: result.append(_torch_ops.fista_on_device(
        np.zeros((2, 2)), 1, None, None, None, None, None, 1, 0.0, np.float32, CUDA)))
    runner.start()
    runner.join(0.5)
    assert runner.is_alive() and not seen  # waits while the tf32 call holds the flags (however late it started)
    release.set()
    other.join(10)
    runner.join(10)
    assert result == ["result"] and seen == [(IEEE, False)]  # IEEE, and only once the tf32 call had left


def _random_state(rng: random.Random) -> list[str]:
    """Up to five writes through either API, any field, in any order: the states a process can leave behind."""
    writes = [f"precision:{p}" for p in ("highest", "high", "medium")]
    writes += [f"{name}:{flag}" for name in ("matmul.allow_tf32", "cudnn.allow_tf32") for flag in (True, False)]
    writes += [f"{i}:{p}" for i in range(len(NEW_API)) for p in ("ieee", "tf32", "none", "bf16")]
    writes += ["cudnn.benchmark:True"]
    chosen = [rng.choice(writes) for _ in range(rng.randint(0, 5))]
    for write in chosen:
        name, value = write.split(":")
        try:
            if name == "precision":
                torch.set_float32_matmul_precision(value)
            elif name == "matmul.allow_tf32":
                MATMUL.allow_tf32 = value == "True"
            elif name == "cudnn.allow_tf32":
                torch.backends.cudnn.allow_tf32 = value == "True"
            elif name == "cudnn.benchmark":
                torch.backends.cudnn.benchmark = True
            else:
                NEW_API[int(name)].fp32_precision = value
        except (RuntimeError, ValueError, AssertionError):  # a value that field does not take
            pass
    return chosen


def test_from_any_state_a_call_is_consistent_inside_and_keeps_what_it_does_not_hold():
    """A seeded search over 1 500 starting states written through either API (after a review's search found two:
    the CPU's oneDNN precision, which set_float32_matmul_precision also sets, left changed; a readable legacy flag
    left raising). Inside a call the two APIs agree; afterwards every fp32_precision field (the CPU's included)
    and every legacy getter that could be read reads as before."""
    rng = random.Random(0)
    start = _everything()
    for _ in range(1500):
        _restore(start)
        chosen = _random_state(rng)
        before = _everything()
        tf32 = rng.random() < 0.5
        with cuda_math(CUDA, tf32=tf32):
            inside = _everything()
        assert inside[0] == ("high" if tf32 else "highest", tf32, tf32), chosen
        after = _everything()
        assert after[1:] == before[1:], (chosen, tf32)
        readable = [i for i, then in enumerate(before[0]) if then is not None]
        assert [after[0][i] for i in readable] == [before[0][i] for i in readable], (chosen, tf32)
