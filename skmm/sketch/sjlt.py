"""Sparse JL transform (Kane–Nelson block construction): each input coordinate lands in ``nnz`` buckets.

Output bucket b of row x is Σ_i σ_i x_i / √nnz over the coordinates i hashed to b. Cost O(batch · r · nnz)
instead of O(batch · r · m). With nnz > 1 the m outputs are split into nnz groups and each coordinate picks
one bucket per group, so its nonzeros never collide.
"""

from __future__ import annotations

import numpy as np
import torch

from skmm._validation import check_positive_int
from skmm.sketch.base import BlockProjector
from skmm.sketch.spec import SketchSpec

__all__ = ["SJLTProjector"]


class SJLTProjector(BlockProjector):
    """Sparse sign sketch with ``nnz`` nonzeros per input coordinate."""

    kind = "sjlt"

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        random_state: int = 0,
        dtype: str = "float32",
        block_rows: int = 1024,
        nnz: int = 1,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        super().__init__(input_dim, output_dim, random_state, dtype, block_rows, cache_bytes)
        self.nnz = nnz

    def _extra_params(self) -> dict:
        nnz = check_positive_int(self.nnz, "nnz")
        if self.output_dim % nnz:
            raise ValueError(f"SJLT needs output_dim divisible by nnz; got m={self.output_dim}, nnz={nnz}")
        return {"nnz": nnz}

    def _draw_block(self, rng: np.random.Generator, rows: int, spec: SketchSpec) -> tuple[np.ndarray, ...]:
        nnz = spec.params["nnz"]
        group = spec.output_dim // nnz
        buckets = rng.integers(0, group, size=(rows, nnz), dtype=np.int64) + group * np.arange(nnz)
        signs = (2.0 * rng.integers(0, 2, size=(rows, nnz), dtype=np.int8) - 1.0) / np.sqrt(nnz)
        return buckets.reshape(-1), signs.astype(spec.dtype)

    def _apply_block(self, X_block: torch.Tensor, block: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        buckets, signs = block
        contrib = (X_block.unsqueeze(-1) * signs).reshape(X_block.shape[0], -1)
        out.index_add_(1, buckets, contrib)
