"""CUDA's process-wide math flags (TF32, cuDNN's algorithm choice), held by the calls that need them.

Embedding (fp32, tf32, bf16), the FT gradients, finetuning and the device selection each need the flags set for
their call and put back afterwards, also when calls overlap in threads (:class:`ProcessSetting`).

TF32 lives in two of PyTorch's APIs at once: the legacy one (``allow_tf32``, ``set_float32_matmul_precision``)
and, since torch 2.9, ``fp32_precision`` (per backend and operation, which PyTorch now recommends and which
recent cuBLAS calls read). A state where the two disagree makes the legacy getters raise ("mix of the legacy and
new APIs"), and on torch whose cuBLAS calls read the checking getter (seen in older sources), every matmul. So a call's
flags are written through both, consistently, and what the process had is saved whole and put back in the same
order; a legacy flag whose getter raised (a state the process left mixed) is not written back, and reads what the
new API says afterwards. Reading only the legacy flags made every CUDA call fail on
entry once the process had set ``torch.backends.cuda.matmul.fp32_precision = "tf32"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from skmm._process_setting import ProcessSetting

if TYPE_CHECKING:
    import torch

__all__ = ["CUDA_MATH", "CudaMath", "cuda_math", "held_flags", "ieee_fp32", "read_cuda_math", "write_cuda_math"]


class CudaMath(NamedTuple):
    """The flags a call holds. ``None``: a legacy getter that raised (a state the process left mixed), not
    written back; the precisions are fp32_precision's strings ("ieee", "tf32", "none": not set)."""

    matmul_precision: str | None  # torch.get_float32_matmul_precision(): "highest", "high", "medium"
    matmul_allow_tf32: bool | None  # torch.backends.cuda.matmul.allow_tf32
    cudnn_allow_tf32: bool | None  # torch.backends.cudnn.allow_tf32
    precisions: tuple[str, str, str]  # fp32_precision of CUDA matmul, cuDNN conv, cuDNN RNN
    #: fp32_precision of the fields no call holds but the legacy setters write (:func:`_fields`), restored with the
    #: rest; None in what a call holds: as those setters leave them, consistent with the legacy flags.
    bystanders: tuple[str, ...] | None
    cudnn_enabled: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool


def _new_api() -> bool:
    import torch

    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _fields(names: str) -> list[tuple[Any, str]]:
    """(owner, "fp32_precision") of ``"cuda"``: the fields a call holds (CUDA matmul, cuDNN conv, cuDNN RNN); or of
    ``"bystanders"``: the others, which the legacy setters may write too (every backend's default, cuDNN's, and the
    CPU's oneDNN, which ``set_float32_matmul_precision`` sets): a call leaves them as its legacy writes make them,
    consistent with the legacy flags (else ``get_float32_matmul_precision`` raises inside it), and puts them back
    after."""
    import torch

    cudnn, mkldnn = torch.backends.cudnn, torch.backends.mkldnn
    if names == "cuda":
        owners = [torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn]
    else:  # parents before children
        owners = [torch.backends, cudnn, *([mkldnn] if hasattr(mkldnn, "fp32_precision") else []),
                  *(getattr(mkldnn, op) for op in ("matmul", "conv", "rnn") if hasattr(mkldnn, op))]
    return [(owner, "fp32_precision") for owner in owners]


def _or_none(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except RuntimeError:  # "mix of the legacy and new APIs"
        return None


def read_cuda_math() -> CudaMath:
    """The process's flags now."""
    import torch

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if _new_api():
        precisions = tuple(getattr(owner, name) for owner, name in _fields("cuda"))
        bystanders = tuple(getattr(owner, name) for owner, name in _fields("bystanders"))
    else:  # torch < 2.9: the legacy flags only
        tf32 = ("tf32" if matmul.allow_tf32 else "ieee", "tf32" if cudnn.allow_tf32 else "ieee")
        precisions, bystanders = (tf32[0], tf32[1], tf32[1]), ()
    return CudaMath(_or_none(torch.get_float32_matmul_precision), _or_none(lambda: matmul.allow_tf32),
                    _or_none(lambda: cudnn.allow_tf32), precisions, bystanders, cudnn.enabled, cudnn.benchmark,
                    cudnn.deterministic)


def write_cuda_math(flags: CudaMath) -> None:
    """Set the process's flags to ``flags`` (as :func:`read_cuda_math` gives them): the legacy ones first (writing
    them also writes the new API's), then the new API's, parents before children."""
    import torch

    cudnn = torch.backends.cudnn
    if flags.matmul_precision is not None:
        torch.set_float32_matmul_precision(flags.matmul_precision)
    elif flags.matmul_allow_tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = flags.matmul_allow_tf32
    if flags.cudnn_allow_tf32 is not None:
        cudnn.allow_tf32 = flags.cudnn_allow_tf32
    if _new_api():
        if flags.bystanders is not None:
            for (owner, name), value in zip(_fields("bystanders"), flags.bystanders, strict=True):
                setattr(owner, name, value)
        for (owner, name), value in zip(_fields("cuda"), flags.precisions, strict=True):
            setattr(owner, name, value)
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic = (flags.cudnn_enabled, flags.cudnn_benchmark,
                                                           flags.cudnn_deterministic)


def held_flags(tf32: bool) -> CudaMath:
    """What a call holds: TF32 on or off for cuBLAS and cuDNN in both APIs, cuDNN deterministic, no benchmark."""
    precision = "tf32" if tf32 else "ieee"
    return CudaMath("high" if tf32 else "highest", tf32, tf32, (precision,) * 3, None, True, False, True)


CUDA_MATH = ProcessSetting("CUDA's math flags", read_cuda_math, write_cuda_math)


@contextlib.contextmanager
def cuda_math(device: torch.device, tf32: bool) -> Iterator[None]:
    """TF32 on CUDA off (fp32, bf16) or on (tf32) for the call, then restored; cuDNN deterministic, without
    benchmarking. Concurrent calls share or wait for the flags (:class:`~skmm._process_setting.ProcessSetting`).
    Nothing is touched off CUDA."""
    if device.type != "cuda":
        yield
        return
    with CUDA_MATH.hold(held_flags(tf32)):
        yield


def ieee_fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """IEEE fp32 for the call (TF32 off on CUDA, then restored): what the FT gradients, finetuning, the SJLT
    sketch and the device selection run in."""
    return cuda_math(device, tf32=False)
