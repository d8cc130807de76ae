"""skmm: Sketchy Moment Matching data selection (NeurIPS 2024) — the algorithm library (numpy/torch only)."""

__version__ = "0.1.0"
