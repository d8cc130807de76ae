"""MKL's Conditional Numerical Reproducibility (CNR), on in every process that imports skmm.

Why: torch's CPU products go through MKL's sgemm, and outside CNR MKL computes some shapes with kernels whose
rounding depends on a row's position in the matrix. Measured on an AVX2-only AMD EPYC (torch 2.14.1): an
8192×64 by 64×N product rounds rows differently once they are shifted by three places, for N = 5–7 and 9–11 (not
for 1–4, 8 or 12–129). A ten-class head's gradients, or a six-column sketch, then gave a sample other bits in
another batch, shard or run split (``tests/skmm/test_clip_ft.py``, ``tests/tasks/test_sketch_lp_runs.py``
failed there). With ``MKL_CBWR=AUTO`` MKL keeps to its fastest *reproducible* code path for the CPU, and the
rows no longer move with their position (bench/README.md §11, "MKL's reproducible mode").

MKL reads ``MKL_CBWR`` once, at its first call, so importing skmm sets it (``AUTO``) unless it is set already
(the user's choice wins, e.g. ``COMPATIBLE`` for the same bits on every x86 CPU), and child processes inherit
it. Where MKL already ran before skmm was imported, :func:`ensure_reproducible_mkl` switches CNR on through MKL's
own ``mkl_cbwr_set`` if it still can, and warns once if it cannot.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

__all__ = ["CNR_DEFAULT", "CNR_ENV", "ensure_reproducible_mkl", "mkl_cnr_branch", "request_reproducible_mkl"]

log = logging.getLogger(__name__)

CNR_ENV = "MKL_CBWR"
CNR_DEFAULT = "AUTO"
_BRANCH = 1  # MKL_CBWR_BRANCH: the query for the current code path
_OFF = 1  # MKL_CBWR_BRANCH_OFF: CNR off
_AUTO = 2  # MKL_CBWR_AUTO


def request_reproducible_mkl() -> None:
    """Ask for CNR before MKL starts: ``MKL_CBWR=AUTO`` in this process's environment, unless set."""
    if not os.environ.get(CNR_ENV, "").strip():
        os.environ[CNR_ENV] = CNR_DEFAULT


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """torch's own MKL (linked into libtorch_cpu), or None where this torch build has none (e.g. OpenBLAS)."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get, set_ = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    get.argtypes, set_.argtypes = [ctypes.c_int], [ctypes.c_int]
    return lib


def mkl_cnr_branch() -> int | None:
    """MKL's current CNR branch (1: off, 2: AUTO, 3: COMPATIBLE, ...; MKL's ``MKL_CBWR_*`` values), or None
    where torch has no MKL whose mode can be read."""
    lib = _mkl()
    return None if lib is None else int(lib.mkl_serv_cbwr_get(_BRANCH))


@functools.cache
def ensure_reproducible_mkl() -> int | None:
    """CNR on in torch's MKL if it is off (MKL ran before skmm was imported, or ``MKL_CBWR`` was removed): switched
    to AUTO where MKL still allows it, else one warning. Returns the branch in force (None: no MKL). The answer is
    computed once per process: MKL fixes its mode at its first call, so it cannot change afterwards (and the
    projectors call this on every batch)."""
    branch = mkl_cnr_branch()
    if branch != _OFF:
        return branch
    if _mkl().mkl_serv_cbwr_set(_AUTO) == 0:
        return mkl_cnr_branch()
    log.warning("MKL's reproducible mode (MKL_CBWR) could not be switched on: MKL ran before skmm was imported. "
                "On some CPUs a row's features or gradients may then depend on its position in a batch; set "
                "%s=%s in the environment, or import skmm first.", CNR_ENV, CNR_DEFAULT)
    return branch
