"""The automatic sketch dimension (``sketch_dim="auto"``) in pieces a stored sketch can stream through.

The rule (:func:`skmm.select.spectrum.auto_sketch_dim`) needs the pool moment SᵀS/N of the m_max-column sketch S,
its eigenvectors, and S projected onto the leading m of them. In memory
(:func:`skmm.select.moment_matching.selection_sketch`) S is one array; at N = 10^7 (10 GB at m_max = 256) a
select task instead keeps the small m_max × m_max moment as an artifact and reads S once more, row group by
row group, straight into the N × m result. Both paths go through the functions below with the same
``BLOCK_ROWS``-row blocks, aligned on multiples of ``BLOCK_ROWS`` in the pool's order (:func:`reblock`), so the
moment, the eigenvectors and the projected rows agree bit for bit: the same selection either way.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from skmm.canonical_json import canonical_json
from skmm.select.spectrum import AUTO_M_FLOOR, AUTO_M_RANK_MULTIPLE, auto_sketch_dim, signal_rank

__all__ = ["BLOCK_ROWS", "MOMENT_FORMAT", "add_gram", "auto_projection", "eigen_moments", "fit_on_reduced",
           "moment_from_bytes", "moment_to_bytes", "project_rows", "reblock", "row_blocks"]

BLOCK_ROWS = 65536  # rows per float64 block of the moment, and per block of the projection
MOMENT_FORMAT = "skmm-sketch-moment/1"


def row_blocks(S: np.ndarray, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of an in-memory pool in ``block_rows``-row views."""
    for lo in range(0, S.shape[0], block_rows):
        yield lo, S[lo:lo + block_rows]


def reblock(chunks: Iterable[tuple[int, np.ndarray]], dim: int, block_rows: int = BLOCK_ROWS,
            dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """Regroup consecutive (first row, rows) chunks (e.g. a table's row groups) into the blocks of
    :func:`row_blocks`: ``block_rows`` rows starting at multiples of ``block_rows`` (the last one shorter).

    A chunk that is exactly such a block passes through without a copy; the others are gathered in one
    ``block_rows`` × ``dim`` buffer, reused: use each block before asking for the next."""
    buf = np.empty((block_rows, dim), dtype=dtype)
    start, fill = 0, 0  # the pending block's first row, rows gathered in buf
    for lo, rows in chunks:
        if lo != start + fill:
            raise ValueError(f"chunks must be consecutive: got rows from {lo}, expected {start + fill}")
        if fill == 0 and len(rows) == block_rows:
            yield lo, rows
            start = lo + block_rows
            continue
        pos = 0
        while pos < len(rows):
            take = min(block_rows - fill, len(rows) - pos)
            buf[fill:fill + take] = rows[pos:pos + take]
            fill, pos = fill + take, pos + take
            if fill == block_rows:
                yield start, buf
                start, fill = start + block_rows, 0
    if fill:
        yield start, buf[:fill]


def add_gram(sigma: np.ndarray, block: np.ndarray) -> None:
    """sigma += blockᵀ block in float64 (one block's float64 copy, never the pool's)."""
    rows = block.astype(np.float64)
    sigma += rows.T @ rows


def eigen_moments(sigma_sum: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs, descending (eigenvalues clipped at 0), of Σ̃ = SᵀS/N from the float64 sum SᵀS."""
    lam, V = np.linalg.eigh(sigma_sum / num_rows)
    order = np.argsort(-lam)
    return np.maximum(lam[order], 0.0), V[:, order]


def auto_projection(lam: np.ndarray, V: np.ndarray, dtype: Any = np.float32) -> tuple[np.ndarray, dict[str, Any]]:
    """(the leading m eigenvectors as an m_max × m ``dtype`` matrix, the record of the choice), with m from
    :func:`~skmm.select.spectrum.auto_sketch_dim` (the same for every budget)."""
    m = auto_sketch_dim(lam)
    total = float(lam.sum())
    auto = {"rule": f"m = max({AUTO_M_FLOOR}, {AUTO_M_RANK_MULTIPLE} x signal rank), at most m_max; the leading "
                    "eigenvectors of the m_max-column sketch",
            "m_max": int(V.shape[0]), "m": m, "signal_rank": signal_rank(lam),
            "energy_share": float(lam[:m].sum() / total) if total > 0 else 1.0}
    return V[:, :m].astype(dtype), auto


def project_rows(blocks: Iterable[tuple[int, np.ndarray]], V: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[lo:lo+len(rows)] = rows @ V for each (first row, rows) block; returns ``out``."""
    for lo, rows in blocks:
        out[lo:lo + len(rows)] = rows @ V
    return out


def moment_to_bytes(sigma_sum: np.ndarray, num_rows: int, **meta: Any) -> bytes:
    """Deterministic safetensors bytes of the float64 SᵀS, with N and ``meta`` as one canonical-JSON key."""
    from safetensors.numpy import save

    info = {**meta, "format": MOMENT_FORMAT, "num_rows": int(num_rows), "block_rows": BLOCK_ROWS}
    return save({"gram": np.ascontiguousarray(sigma_sum, dtype=np.float64)}, metadata={"skmm": canonical_json(info)})


def moment_from_bytes(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """(SᵀS, its metadata: num_rows, block_rows, …) from :func:`moment_to_bytes`; ValueError for anything else."""
    from safetensors.numpy import load

    try:
        tensors = load(data)
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        info = json.loads(header["__metadata__"]["skmm"])
    except Exception as exc:
        raise ValueError(f"not a sketch-moment file: {type(exc).__name__}") from None
    sigma = tensors.get("gram")
    if info.get("format") != MOMENT_FORMAT or sigma is None or sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"not a sketch-moment file (format {info.get('format')!r})")
    if info.get("block_rows") != BLOCK_ROWS:
        raise ValueError(f"sketch moment accumulated in {info.get('block_rows')}-row blocks, not {BLOCK_ROWS}")
    return sigma, info


def fit_on_reduced(selector: Any, S: np.ndarray, y: np.ndarray | None, auto: dict[str, Any]) -> Any:
    """Fit a copy of ``selector`` (built with ``sketch_dim="auto"``) on S already projected to its automatic m,
    and record ``auto`` as that fit would: the same indices, weights and info as ``selector.fit`` on the full
    m_max-column sketch. Returns the fitted copy (``selector`` itself keeps its parameters)."""
    if selector.get_params().get("sketch_dim") != "auto":
        raise ValueError("fit_on_reduced takes a selector built with sketch_dim='auto'")
    fitted = type(selector)(**{**selector.get_params(), "sketch_dim": None}).fit(S, y)
    fitted.set_params(sketch_dim="auto")
    fitted.selection_ = dataclasses.replace(fitted.selection_, params=fitted.get_params(),
                                            info={**fitted.selection_.info, "auto_sketch": auto})
    return fitted
