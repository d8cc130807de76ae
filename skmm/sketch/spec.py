"""The serialisable identity of a sketch: two sketches with equal specs are the same linear map."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from skmm.canonical_json import canonical_json

__all__ = ["SketchSpec"]

KINDS = ("gaussian", "rademacher", "sjlt", "kronecker")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class SketchSpec:
    """Everything that determines a sketch matrix Γ (input_dim × output_dim).

    ``kind`` picks the distribution, ``seed`` the draw; ``block_rows`` is the number of input coordinates per
    regenerated block (it changes which random numbers land where, so it is part of the identity); ``scaling``
    names the normalisation (``"jl"``: E‖xΓ‖² = ‖x‖²); ``params`` holds kind-specific settings (``nnz`` for
    SJLT, ``left_dim``/``right_dim``/``factor`` for the Kronecker sketch). Store ``to_dict()`` next to every
    sketched array and refuse to combine arrays whose digests differ.
    """

    kind: str
    input_dim: int
    output_dim: int
    seed: int
    dtype: str = "float32"
    block_rows: int = 1024
    scaling: str = "jl"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sketch kind {self.kind!r}; expected one of {KINDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"sketch dtype must be one of {DTYPES}; got {self.dtype!r}")
        for name in ("input_dim", "output_dim", "block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"sketch {name} must be a positive integer; got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"sketch seed must be a non-negative integer; got {self.seed!r}")
        if self.scaling != "jl":
            raise ValueError(f"unknown sketch scaling {self.scaling!r}; only 'jl' is defined")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stable across runs (keys sorted when serialised)."""
        return asdict(self)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace."""
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: the sketch's identity in artifact names and caches."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SketchSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {"kind", "input_dim", "output_dim", "seed", "dtype", "block_rows", "scaling", "params"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown sketch spec field(s): {sorted(extra)}")
        return cls(**{**data, "params": dict(data.get("params", {}))})
