"""Dense JL sketches (Gaussian N(0, 1/m) and Rademacher ±1/√m), regenerated block by block from a seed.

As in TRAK's and dattri's projectors, Γ is never stored whole: block j (input coordinates
[j·block_rows, (j+1)·block_rows)) is a pure function of (seed, j).
"""

from __future__ import annotations

import numpy as np
import torch

from skmm.sketch.base import BlockProjector
from skmm.sketch.spec import SketchSpec

__all__ = ["GaussianProjector", "RademacherProjector"]


class GaussianProjector(BlockProjector):
    """Γ with i.i.d. N(0, 1/m) entries: E‖xΓ‖² = ‖x‖²."""

    kind = "gaussian"

    def _draw_block(self, rng: np.random.Generator, rows: int, spec: SketchSpec) -> tuple[np.ndarray, ...]:
        block = rng.standard_normal((rows, spec.output_dim), dtype=np.dtype(spec.dtype))
        block *= 1.0 / np.sqrt(spec.output_dim)
        return (block,)

    def _apply_block(self, X_block: torch.Tensor, block: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out.addmm_(X_block, block[0])


class RademacherProjector(GaussianProjector):
    """Γ with i.i.d. ±1/√m entries (same guarantees, cheaper to draw)."""

    kind = "rademacher"

    def _draw_block(self, rng: np.random.Generator, rows: int, spec: SketchSpec) -> tuple[np.ndarray, ...]:
        bits = rng.integers(0, 2, size=(rows, spec.output_dim), dtype=np.int8)
        block = (2.0 * bits - 1.0).astype(spec.dtype) * (1.0 / np.sqrt(spec.output_dim))
        return (block.astype(spec.dtype),)
