"""MKL's reproducible mode: on in every process that imports skmm, so a row's products do not depend on its place.

Each case runs in a fresh interpreter, since MKL reads its mode once, at its first call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch build has no MKL")

OFF, AUTO, COMPATIBLE = 1, 2, 3  # MKL's MKL_CBWR_* branch values

# Rows shifted by three places in an 8192×64 by 64×N product: outside MKL's reproducible mode, N = 6 rounded
# 7 631 of the 8 192 rows differently on an AVX2-only AMD EPYC (it need not on every CPU).
SHIFTED_ROWS = """
g = torch.Generator().manual_seed(0)
moved = []
for n in range(1, 17):
    X, P = torch.randn(8192, 64, generator=g), torch.randn(64, n, generator=g)
    if not torch.equal(X @ P, torch.roll(torch.roll(X, 3, 0) @ P, -3, 0)):
        moved.append(n)
"""


def _run(code: str, **env: str) -> tuple[list[str], str]:
    """What a fresh interpreter running ``code`` prints (split), and its stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | env
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(), done.stderr


def test_importing_skmm_switches_mkls_reproducible_mode_on_and_rows_keep_their_bits_wherever_they_are():
    # among them a ten-class head's shape (tests/skmm/test_clip_ft.py) and a six-column sketch's
    # (tests/tasks/test_sketch_lp_runs.py)
    out, _ = _run("import skmm, torch, os\nfrom skmm.mkl_reproducibility import mkl_cnr_branch\n" + SHIFTED_ROWS
                  + 'print(os.environ["MKL_CBWR"], mkl_cnr_branch(), len(moved))\n')
    assert out == ["AUTO", str(AUTO), "0"]


def test_the_users_mkl_cbwr_wins():
    out, _ = _run("""
        import skmm, torch, os
        from skmm.mkl_reproducibility import ensure_reproducible_mkl
        print(os.environ["MKL_CBWR"], ensure_reproducible_mkl())
    """, MKL_CBWR="COMPATIBLE")
    assert out == ["COMPATIBLE", str(COMPATIBLE)]


def test_where_mkl_ran_before_skmm_a_clear_warning_says_so_once():
    # MKL refuses a change of mode once it has run: the mode stays off
    out, err = _run("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        torch.randn(8, 4) @ torch.randn(4, 6)  # MKL starts, its mode off
        import skmm
        from skmm.mkl_reproducibility import ensure_reproducible_mkl, mkl_cnr_branch
        print(mkl_cnr_branch(), ensure_reproducible_mkl(), ensure_reproducible_mkl())
    """)
    assert out == [str(OFF)] * 3
    assert err.count("MKL's reproducible mode (MKL_CBWR) could not be switched on") == 1
    assert "MKL_CBWR=AUTO in the environment" in err
