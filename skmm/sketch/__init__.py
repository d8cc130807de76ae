"""Seeded sketching projectors R^r -> R^m, one module per kind, identified by a :class:`SketchSpec`."""

from __future__ import annotations

from typing import Any

from skmm.sketch.base import BlockProjector, Projector
from skmm.sketch.dense import GaussianProjector, RademacherProjector
from skmm.sketch.kronecker import KroneckerProjector
from skmm.sketch.sjlt import SJLTProjector
from skmm.sketch.spec import KINDS, SketchSpec

__all__ = [
    "BlockProjector",
    "GaussianProjector",
    "KroneckerProjector",
    "Projector",
    "RademacherProjector",
    "SJLTProjector",
    "SketchSpec",
    "make_projector",
    "projector_from_spec",
]


def make_projector(kind: str, input_dim: int, output_dim: int, random_state: int = 0, **params: Any) -> Projector:
    """Build a projector by kind name ("gaussian", "rademacher", "sjlt", "kronecker")."""
    if kind == "gaussian":
        proj: Projector = GaussianProjector(input_dim, output_dim, random_state, **params)
    elif kind == "rademacher":
        proj = RademacherProjector(input_dim, output_dim, random_state, **params)
    elif kind == "sjlt":
        proj = SJLTProjector(input_dim, output_dim, random_state, **params)
    elif kind == "kronecker":
        left, right = params.pop("left_dim", None), params.pop("right_dim", None)
        if left is None or right is None or left * right != input_dim:
            raise ValueError("a Kronecker sketch needs left_dim * right_dim == input_dim "
                             f"(got left_dim={left}, right_dim={right}, input_dim={input_dim})")
        proj = KroneckerProjector(left, right, output_dim, random_state, **params)
    else:
        raise ValueError(f"unknown sketch kind {kind!r}; expected one of {KINDS}")
    return proj.fit()


def projector_from_spec(spec: SketchSpec | dict) -> Projector:
    """Rebuild the exact projector a recorded spec describes."""
    spec = spec if isinstance(spec, SketchSpec) else SketchSpec.from_dict(spec)
    params = dict(spec.params)
    return make_projector(spec.kind, spec.input_dim, spec.output_dim, spec.seed, dtype=spec.dtype,
                          **({} if spec.kind == "kronecker" else {"block_rows": spec.block_rows}), **params)
