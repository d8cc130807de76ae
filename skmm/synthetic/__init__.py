"""The paper's synthetic benchmark (SKMM.md §6): GMM pool, coreset ridge risk, and the table runner."""

from skmm.synthetic.gmm import GMMPool, make_gmm
from skmm.synthetic.risk import DEFAULT_ALPHAS, ridge_risk

__all__ = ["DEFAULT_ALPHAS", "GMMPool", "make_gmm", "ridge_risk"]
