"""skmm: Sketchy Moment Matching data selection (NeurIPS 2024) — the algorithm library (numpy/torch only)."""

from skmm.mkl_reproducibility import request_reproducible_mkl

__version__ = "0.1.0"

request_reproducible_mkl()  # before MKL's first call, which reads it: rows' bits independent of their position
