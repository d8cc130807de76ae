"""The projector interface: a seeded linear map R^r -> R^m applied batch by batch.

Every projector is identified by a :class:`SketchSpec`. ``project`` accepts a numpy array or a torch tensor
(CPU or CUDA) of shape (batch, r) and returns the same kind of object with shape (batch, m). Each output row
depends only on its input row and the spec, so a pool can be sketched in any batch size, shard split or row
order and give the same rows (up to floating-point summation order).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from skmm._validation import check_positive_int
from skmm.mkl_reproducibility import ensure_reproducible_mkl
from skmm.sketch.spec import SketchSpec

__all__ = ["BlockProjector", "Projector"]

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _nbytes(block: tuple[torch.Tensor, ...]) -> int:
    """The bytes a cached block holds."""
    return sum(b.element_size() * b.numel() for b in block)


def _block_rng(seed: int, block: int) -> np.random.Generator:
    """Generator for one block of Γ: a pure function of (seed, block index), on every machine."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, block])))


class Projector(ABC):
    """A seeded sketch Γ ∈ R^{r×m}; subclasses define how Γ is drawn and applied."""

    kind: str = ""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        random_state: int = 0,
        dtype: str = "float32",
        block_rows: int = 1024,
    ) -> None:
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.random_state = random_state
        self.dtype = dtype
        self.block_rows = block_rows

    def _extra_params(self) -> dict[str, Any]:
        return {}

    @property
    def spec(self) -> SketchSpec:
        """The serialisable identity of this sketch (validated on access)."""
        return SketchSpec(
            kind=self.kind,
            input_dim=check_positive_int(self.input_dim, "input_dim (r)"),
            output_dim=check_positive_int(self.output_dim, "output_dim (m)"),
            seed=self.random_state,
            dtype=self.dtype,
            block_rows=check_positive_int(self.block_rows, "block_rows"),
            params=self._extra_params(),
        )

    def fit(self, X: Any = None, y: Any = None) -> Projector:
        """Validate the parameters (the sketch is data-independent); returns self for scikit-learn pipelines."""
        self.spec_ = self.spec
        if X is not None:
            self._check_input(X)
        return self

    def transform(self, X: Any) -> Any:
        """Alias of :meth:`project`."""
        return self.project(X)

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        return self.fit(X).project(X)

    def _check_input(self, X: Any) -> torch.Tensor:
        t = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X))
        if t.ndim != 2:
            raise ValueError(f"project expects a 2-D batch of shape (batch, {self.input_dim}); got shape "
                             f"{tuple(t.shape)}")
        if t.shape[1] != self.input_dim:
            raise ValueError(f"project expects {self.input_dim} input coordinates per row (the spec's r); "
                             f"got {t.shape[1]}")
        if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
            raise ValueError(f"project expects real numbers; got dtype {t.dtype}")
        return t

    def project(self, X: Any) -> Any:
        """Return X Γ for a batch X of shape (batch, r): numpy in, numpy out; torch in, torch out (same device)."""
        spec = self.spec
        ensure_reproducible_mkl()  # a row's sketch independent of its place in X
        is_numpy = not isinstance(X, torch.Tensor)
        t = self._check_input(X).to(_TORCH_DTYPES[spec.dtype])
        with torch.no_grad():
            out = self._project(t, spec)
        return out.cpu().numpy() if is_numpy else out

    @abstractmethod
    def _project(self, X: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
        """Apply Γ to a validated batch in the spec's dtype, on X's device."""


class BlockProjector(Projector):
    """A sketch whose rows are drawn ``block_rows`` at a time from (seed, block index) and never stored whole.

    Blocks are regenerated on demand; up to ``cache_bytes`` of them are kept per device (LRU), so small
    sketches are drawn once and sketches of any size run in bounded memory. Threads may share a projector (the
    cache is locked; a block is drawn outside the lock); a copy or pickle starts with an empty cache.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        random_state: int = 0,
        dtype: str = "float32",
        block_rows: int = 1024,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        super().__init__(input_dim, output_dim, random_state, dtype, block_rows)
        self.cache_bytes = cache_bytes
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self._cache_key: str | None = None
        self._cached = 0
        self._cache_lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_cache", "_cache_key", "_cached", "_cache_lock"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    @abstractmethod
    def _draw_block(self, rng: np.random.Generator, rows: int, spec: SketchSpec) -> tuple[np.ndarray, ...]:
        """Draw the random numbers of one block of ``rows`` input coordinates."""

    @abstractmethod
    def _apply_block(self, X_block: torch.Tensor, block: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        """Add X_block Γ_block into ``out`` (batch, m) in place."""

    def _block(self, j: int, spec: SketchSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (j, str(device))
        with self._cache_lock:
            if self._cache_key != spec.digest:  # parameters changed since the cache was filled
                self._cache.clear()
                self._cached = 0
                self._cache_key = spec.digest
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        rows = min(spec.block_rows, spec.input_dim - j * spec.block_rows)
        arrays = self._draw_block(_block_rng(spec.seed, j), rows, spec)
        block = tuple(torch.from_numpy(a).to(device) for a in arrays)
        size = _nbytes(block)
        with self._cache_lock:
            if size <= self.cache_bytes and self._cache_key == spec.digest and key not in self._cache:
                self._cache[key] = block
                self._cached += size
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= _nbytes(old)
        return block

    def _project(self, X: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
        out = torch.zeros((X.shape[0], spec.output_dim), dtype=X.dtype, device=X.device)
        n_blocks = -(-spec.input_dim // spec.block_rows)
        for j in range(n_blocks):
            lo = j * spec.block_rows
            hi = min(lo + spec.block_rows, spec.input_dim)
            self._apply_block(X[:, lo:hi], self._block(j, spec, X.device), out)
        return out
