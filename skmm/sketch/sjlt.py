"""Sparse JL transform (Kane–Nelson block construction): each input coordinate lands in ``nnz`` buckets.

Output bucket b of row x is Σ_i σ_i x_i / √nnz over the coordinates i hashed to b. Cost O(batch · r · nnz)
instead of O(batch · r · m). With nnz > 1 the m outputs are split into nnz groups and each coordinate picks
one bucket per group, so its nonzeros never collide.

On CUDA the sum is a dense matmul per chunk of coordinates (:meth:`SJLTProjector._project_dense`), not
``index_add_``: CUDA's ``index_add_`` adds with atomics (PyTorch lists it as nondeterministic), so coordinates
landing in one bucket are summed in whatever order the atomics land, and the sketch's last bits may change from
run to run. A matmul of one shape is deterministic on a device, costs 2·batch·r·m flops (arithmetic, unmeasured:
~2 TFLOP for a 256-row batch of ViT-B/32's last block at m = 512), and launches a few kernels per chunk instead
of three per 1 024-coordinate block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skmm._validation import check_positive_int
from skmm.sketch.base import _TORCH_DTYPES, BlockProjector
from skmm.sketch.spec import SketchSpec

__all__ = ["DENSE_CHUNK_BYTES", "SJLTProjector"]

#: Dense Γ per matmul on CUDA (:meth:`SJLTProjector._project_dense`): big enough that a chunk's matmul, not its
#: launch, is the cost; small next to a device's memory.
DENSE_CHUNK_BYTES = 64 * 2**20


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

    def _project(self, X: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
        if X.device.type == "cuda":
            from skmm._cuda_math import ieee_fp32

            with ieee_fp32(X.device):  # the matmul in IEEE fp32, as the sparse sum was, whatever the process set
                return self._project_dense(X, spec)
        return super()._project(X, spec)

    def dense_chunk(self, lo: int, hi: int, device: Any = "cpu") -> torch.Tensor:
        """Rows ``lo:hi`` of Γ as a dense (hi − lo, m) tensor (``lo`` on a block boundary): zeros but for each
        coordinate's ``nnz`` signs, each written once (no two land on one entry), so building it is deterministic."""
        spec = self.spec
        if lo % spec.block_rows or not 0 <= lo < hi <= spec.input_dim:
            raise ValueError(f"dense_chunk needs 0 <= lo < hi <= r with lo on a block boundary; got {lo}:{hi}")
        device = torch.device(device)
        out = torch.zeros((hi - lo, spec.output_dim), dtype=_TORCH_DTYPES[spec.dtype], device=device)
        self._fill_dense(lo, hi, spec, out)
        return out

    def _fill_dense(self, lo: int, hi: int, spec: SketchSpec, out: torch.Tensor) -> None:
        nnz = spec.params["nnz"]
        first, last = lo // spec.block_rows, -(-hi // spec.block_rows)
        blocks = [self._block(j, spec, out.device) for j in range(first, last)]
        buckets = torch.cat([b[0] for b in blocks])[: (hi - lo) * nnz]
        signs = torch.cat([b[1].reshape(-1) for b in blocks])[: (hi - lo) * nnz]
        rows = torch.arange(hi - lo, device=out.device).repeat_interleave(nnz)
        out.index_put_((rows, buckets), signs)

    def _project_dense(self, X: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
        """X Γ as one matmul per chunk of whole blocks (about :data:`DENSE_CHUNK_BYTES` of dense Γ each)."""
        m = spec.output_dim
        chunk = max(1, DENSE_CHUNK_BYTES // (X.element_size() * m * spec.block_rows)) * spec.block_rows
        out = torch.zeros((X.shape[0], m), dtype=X.dtype, device=X.device)
        dense = torch.empty((min(chunk, spec.input_dim), m), dtype=X.dtype, device=X.device)
        for lo in range(0, spec.input_dim, chunk):
            hi = min(lo + chunk, spec.input_dim)
            part = dense[: hi - lo]
            part.zero_()
            self._fill_dense(lo, hi, spec, part)
            out.addmm_(X[:, lo:hi], part)
        return out
