"""CUDA's process-wide math flags (TF32, cuDNN's algorithm choice), held by the calls that need them.

Embedding (fp32, tf32, bf16), the FT gradients, finetuning and the device selection each need the flags set for
their call and put back afterwards, also when calls overlap in threads (:class:`ProcessSetting`).

TF32 is read and written with PyTorch's ``fp32_precision`` API where it exists (torch ≥ 2.9): once anything in
the process has set that API (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, which PyTorch now
recommends), reading the legacy ``allow_tf32`` flag raises ("mix of the legacy and new APIs"), so every CUDA call
failed on entry. A value set with the legacy flags reads back through the new API, and what was there is restored
as found either way (a process that had never set it gets ``"none"`` back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from skmm._process_setting import ProcessSetting

if TYPE_CHECKING:
    import torch

__all__ = ["CUDA_MATH", "cuda_math", "ieee_fp32", "read_cuda_math", "write_cuda_math"]

#: (matmul precision, cuDNN enabled, cuDNN benchmark, cuDNN deterministic, cuDNN convolution precision):
#: the precisions are "ieee" or "tf32" (or "none", PyTorch's "never set", as read from a fresh process).
CudaMath = tuple[str, bool, bool, bool, str]


def _new_api() -> bool:
    import torch

    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def read_cuda_math() -> CudaMath:
    """The process's flags now (:data:`CudaMath`)."""
    import torch

    cudnn = torch.backends.cudnn
    if _new_api():
        matmul, conv = torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision
    else:  # torch < 2.9: the legacy flags only
        matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        conv = "tf32" if cudnn.allow_tf32 else "ieee"
    return (matmul, cudnn.enabled, cudnn.benchmark, cudnn.deterministic, conv)


def write_cuda_math(flags: CudaMath) -> None:
    """Set the process's flags to ``flags`` (as :func:`read_cuda_math` gives them)."""
    import torch

    matmul, enabled, benchmark, deterministic, conv = flags
    cudnn = torch.backends.cudnn
    if _new_api():
        torch.backends.cuda.matmul.fp32_precision = matmul
        cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
        cudnn.allow_tf32 = conv == "tf32"
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic = enabled, benchmark, deterministic


CUDA_MATH = ProcessSetting("CUDA's math flags", read_cuda_math, write_cuda_math)


@contextlib.contextmanager
def cuda_math(device: torch.device, tf32: bool) -> Iterator[None]:
    """TF32 on CUDA off (fp32, bf16) or on (tf32) for the call, then restored; cuDNN deterministic, without
    benchmarking. Concurrent calls share or wait for the flags (:class:`~skmm._process_setting.ProcessSetting`).
    Nothing is touched off CUDA."""
    if device.type != "cuda":
        yield
        return
    precision = "tf32" if tf32 else "ieee"
    with CUDA_MATH.hold((precision, True, False, True, precision)):
        yield


def ieee_fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """IEEE fp32 for the call (TF32 off on CUDA, then restored): what the FT gradients, finetuning, the SJLT
    sketch and the device selection run in."""
    return cuda_math(device, tf32=False)
