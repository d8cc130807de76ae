"""Convex SkMM on a torch device (CUDA when present): the same steps, dtypes and order as the numpy path.

The N-sized work — the pivoted seeding's residuals and draws, building P = (SV)² from the sketch, the power
iteration for L, each FISTA step's Pᵀw and P·g, and the capped-simplex projection — runs as torch ops on
``device``; every m-sized quantity (the moments d, the gap, the objective, the momentum scalars) is brought back
and computed by the numpy code's own expressions. The moment SᵀS/N and its eigenpairs stay on the host (one pass;
the same λ and V as the numpy path), and so do the discretisation and every draw from ``rng``.
Device memory: the solver holds P (N × m, the sketch's dtype; the sketch is sent in row chunks), the seeding
holds the sketch itself (after the solver has let P go), each plus O(N) vectors and one row chunk's workspace.

Where the result can differ from the numpy path (and only there): the float64 products S·V, the float32
products Pᵀw and P·g, and the projection's float64 sums reduce in the device library's order, not numpy's BLAS
order. Each differs by rounding (float32: ~1e-7 relative per product); FISTA carries these differences, so the
weights agree to rounding, not bitwise, and a discretisation can differ only where a row sits on a boundary
(a weight tied with another, or a systematic-sampling point within rounding of a cumulative weight). The
seeding draws each pivot from the same uniform number as numpy's ``rng.choice(N, p=residual/Σresidual)``
(inverse CDF), so its rows differ only when that number falls within rounding (~1e-16) of a CDF step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skmm.select.adaptive import fill_uniformly, orthogonal_part, pivot_rule

__all__ = ["CHUNK_ROWS", "CPU_CHUNK_ROWS", "device_label", "fista_on_device", "greedy_on_device",
           "pivoted_rows_on_device", "resolve_device", "top_k_torch"]

CHUNK_ROWS = 1 << 18  # CUDA: rows of the sketch per transfer and per float64 pass (64 MiB of float32 at m = 64)
CPU_CHUNK_ROWS = 16384  # torch's CPU device (a check of the device code, slower than numpy): cache-sized blocks


def _chunk(dev: torch.device, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows is not None else CHUNK_ROWS if dev.type == "cuda" else CPU_CHUNK_ROWS


def resolve_device(device: Any) -> torch.device | None:
    """None: the numpy path; "auto": CUDA when available, else the numpy path; "cpu", "cuda", "cuda:k": torch."""
    if device is None:
        return None
    if not isinstance(device, str):
        raise ValueError(f"device must be None, 'auto', 'cpu' or 'cuda[:k]'; got {device!r}")
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be None, 'auto', 'cpu' or 'cuda[:k]'; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, 'auto', 'cpu' or 'cuda[:k]'; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device (device='auto' falls back "
                         "to the numpy path)")
    return dev


def device_label(dev: torch.device | None) -> str:
    """What the selection records: "numpy", "cpu" or "cuda:k (device name)"."""
    if dev is None:
        return "numpy"
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def _torch_dtype(dtype: Any) -> torch.dtype:
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def build_moments(S: np.ndarray, V: np.ndarray, rel: np.ndarray, dtype: Any, dev: torch.device,
                  chunk_rows: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """(P = (SV)² on the device in ``dtype``, strata on the host): the sketch goes over in row chunks."""
    N, m = S.shape
    chunk_rows = _chunk(dev, chunk_rows)
    P = torch.empty((N, m), dtype=_torch_dtype(dtype), device=dev)
    strata = np.empty(N, dtype=np.int64)
    V_d = torch.from_numpy(np.ascontiguousarray(V, dtype=np.float64)).to(dev)
    rel_d = torch.from_numpy(np.ascontiguousarray(rel, dtype=np.float64)).to(dev)
    for lo in range(0, N, chunk_rows):
        block = torch.from_numpy(np.ascontiguousarray(S[lo:lo + chunk_rows])).to(dev).double()
        H2 = block @ V_d
        del block
        H2 *= H2
        P[lo:lo + chunk_rows] = H2
        strata[lo:lo + chunk_rows] = torch.argmax(H2 * rel_d, dim=1).cpu().numpy()
    return P, strata


def project_capped_simplex_torch(v: torch.Tensor, cap: float, total: float = 1.0, tau0: float | None = None,
                                 max_iter: int = 200) -> tuple[torch.Tensor, float]:
    """:func:`skmm.select.projection.project_capped_simplex` on a float64 device vector, step for step."""
    N = v.numel()
    if cap * N < total * (1 - 1e-12):
        raise ValueError(f"infeasible: {N} entries capped at {cap} cannot sum to {total}")
    if cap * N <= total * (1 + 1e-12):
        return torch.full_like(v, cap, dtype=torch.float64), float(v.min()) - cap
    lo, hi = float(v.min()) - cap, float(v.max())
    warm = tau0 is not None and np.isfinite(tau0)
    tau = float(np.clip(tau0, lo, hi)) if warm else 0.5 * (lo + hi)
    zero = torch.zeros((), dtype=torch.float64, device=v.device)
    for _ in range(max_iter):
        shifted = v - tau
        upper = shifted >= cap
        free = (shifted > 0) & ~upper
        # one transfer for the four reductions (counts exact in float64 below 2^53)
        n_free, n_upper, s_free, v_free = torch.stack([
            free.sum(dtype=torch.float64), upper.sum(dtype=torch.float64),
            torch.where(free, shifted, zero).sum(), torch.where(free, v, zero).sum()]).tolist()
        n_free, n_upper = int(n_free), int(n_upper)
        s = s_free + cap * n_upper
        if s == total:
            break
        if s > total:
            lo = tau
        else:
            hi = tau
        if n_free:
            newton = (v_free + cap * n_upper - total) / n_free
            if lo < newton < hi:
                if abs(float((v - newton).clamp_(0.0, cap).sum()) - total) <= 1e-12 * total:
                    tau = newton
                    break
                tau = newton
                continue
        tau = 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(lo), abs(hi)):
            break
    return (v - tau).clamp_(0.0, cap), float(tau)


def fista_on_device(S: np.ndarray, n: int, V: np.ndarray, rel: np.ndarray, target: np.ndarray,
                    scale_j: np.ndarray | None, init: np.ndarray | None, max_iter: int, tol: float, dtype: Any,
                    dev: torch.device) -> tuple[np.ndarray, float, int, np.ndarray]:
    """The numpy solver's P build, Lipschitz estimate and FISTA loop on ``dev``: (best w, its f, steps, strata).
    Float32 products in IEEE float32 as numpy's, never TF32 (whatever the process set), with the flags held as the
    other CUDA calls hold them (:func:`skmm._cuda_math.ieee_fp32`): a tf32 embedding in another thread waits."""
    from skmm._cuda_math import ieee_fp32

    with ieee_fp32(dev):
        return _fista(S, n, V, rel, target, scale_j, init, max_iter, tol, dtype, dev)


def _fista(S, n, V, rel, target, scale_j, init, max_iter, tol, dtype, dev):
    N, m = S.shape
    P, strata = build_moments(S, V, rel, dtype, dev)
    if scale_j is not None:
        P *= torch.from_numpy(scale_j.astype(dtype)).to(dev)
    cap = 1.0 / n
    u = torch.full((m,), 1.0 / np.sqrt(m), dtype=P.dtype, device=dev)
    for _ in range(30):
        u = P.T @ (P @ u)
        u /= torch.linalg.vector_norm(u)
    L = 2.0 * float(torch.linalg.vector_norm(P @ u)) ** 2 * 1.05 + 1e-300

    def moments(w: torch.Tensor) -> np.ndarray:
        return (P.T @ w.to(P.dtype)).cpu().numpy().astype(np.float64)

    def objective(d: np.ndarray) -> float:
        gap = np.maximum(target - d, 0.0)
        return float(gap @ gap)

    w0 = init if init is not None else np.full(N, 1.0 / N)
    w0 = torch.from_numpy(np.ascontiguousarray(w0, dtype=np.float64)).to(dev)
    if not bool(torch.isfinite(w0).all()):
        raise ValueError("v has NaN or inf entries")
    w, tau = project_capped_simplex_torch(w0, cap)
    del w0
    d_w = moments(w)
    f = objective(d_w)
    best_w, best_f, steps = w, f, 0
    z, d_z, t = w, d_w, 1.0
    scale = float(target @ target) or 1.0
    for step in range(1, max_iter + 1):
        if best_f <= tol * scale:
            break
        steps = step
        gap_z = np.maximum(target - d_z, 0.0)
        grad = P @ torch.from_numpy((-2.0 * gap_z).astype(dtype)).to(dev)
        w_next, tau = project_capped_simplex_torch(z - grad / L, cap, tau0=tau)
        del grad
        d_next = moments(w_next)
        f_next = objective(d_next)
        if f_next > f:
            z, d_z, t = w_next, d_next, 1.0
        else:
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            beta = float((t - 1.0) / t_next)  # a Python float: numpy's scalar would coerce the tensor
            z, d_z, t = w_next + beta * (w_next - w), d_next + beta * (d_next - d_w), t_next
        w, d_w, f = w_next, d_next, f_next
        if f < best_f:
            best_w, best_f = w, f
    return best_w.cpu().numpy(), best_f, steps, strata


def _to_device(S: np.ndarray, dev: torch.device, chunk_rows: int | None = None) -> torch.Tensor:
    """The sketch on the device in its own dtype, sent in row chunks (no second host copy)."""
    chunk_rows = _chunk(dev, chunk_rows)
    out = torch.empty(S.shape, dtype=_torch_dtype(S.dtype), device=dev)
    for lo in range(0, S.shape[0], chunk_rows):
        out[lo:lo + chunk_rows] = torch.from_numpy(np.ascontiguousarray(S[lo:lo + chunk_rows]))
    return out


def _rows_float64(S: torch.Tensor, fn, chunk_rows: int) -> torch.Tensor:
    return torch.cat([fn(S[lo:lo + chunk_rows].double()) for lo in range(0, S.shape[0], chunk_rows)])


def pivoted_rows_on_device(S: np.ndarray, k: int, rng: np.random.Generator, dev: torch.device,
                           chunk_rows: int | None = None, S_d: torch.Tensor | None = None,
                           pivoting: str | float = "sampled", lead_pivots: int | None = None) -> list[int]:
    """:func:`skmm.select.adaptive.randomly_pivoted_rows` (float64 row blocks, no ``exclude``) with the residual
    norms and their updates on ``dev``: the same draws from ``rng``, the same basis arithmetic on the host.
    ``S_d``: the sketch already on ``dev`` (else it is sent). ``pivoting``, ``lead_pivots``: as there."""
    rule = pivot_rule(pivoting)
    N, d = S.shape
    chunk_rows = _chunk(dev, chunk_rows)
    S_d = _to_device(S, dev, chunk_rows) if S_d is None else S_d
    residual = _rows_float64(S_d, lambda b: (b * b).sum(dim=1), chunk_rows)
    picked: list[int] = []
    basis = np.zeros((min(k, d), d))
    rank = 0
    scale = float(residual.max()) if N else 0.0
    for i in range(k):
        power, band = rule if lead_pivots is None or i < lead_pivots else (1.0, 0.0)
        total = float(residual.sum())
        if total <= 1e-12 * max(scale, 1e-300) or rank == basis.shape[0]:
            fill_uniformly(picked, N, k, rng)
            break
        if power == np.inf:  # greedy pivoting: the first arg-max, no draw
            p = int(torch.argmax(residual))
            if band > 0:  # "directed": as adaptive._directed_pivot
                q, norm = orthogonal_part(S[p], basis, rank)
                if norm > 0:
                    v = torch.from_numpy(q / norm).to(dev)
                    proj = _rows_float64(S_d, lambda b, v=v: b @ v, chunk_rows) ** 2
                    proj = torch.where(residual <= 0, 0.0, proj)
                    proj = torch.where(proj < band * proj.max(), 0.0, proj)
                    cdf = torch.cumsum(proj / float(proj.sum()), dim=0)
                    cdf /= cdf[-1].clone()
                    u = torch.tensor([rng.random()], dtype=torch.float64, device=dev)
                    p = int(torch.searchsorted(cdf, u, right=True)[0])
                    del cdf, proj
        else:
            weights = residual
            if power != 1.0 or band > 0:  # as adaptive._pick_pivot: relative to the largest, banded, powered
                weights = residual / residual.max()
                weights = torch.where(weights < band, 0.0, weights) ** power
            wsum = total if weights is residual else float(weights.sum())
            cdf = torch.cumsum(weights / wsum, dim=0)  # rng.choice(N, p=…) is this inverse CDF at one uniform draw
            cdf /= cdf[-1].clone()
            u = torch.tensor([rng.random()], dtype=torch.float64, device=dev)
            p = int(torch.searchsorted(cdf, u, right=True)[0])
            del cdf, weights
        q, norm = orthogonal_part(S[p], basis, rank)
        picked.append(p)
        residual[p] = 0.0
        if norm > 0:
            basis[rank] = q / norm
            direction = torch.from_numpy(basis[rank].copy()).to(dev)
            along = _rows_float64(S_d, lambda b, v=direction: b @ v, chunk_rows)
            residual = torch.clamp_min(residual - along**2, 0.0)
            residual[picked] = 0.0
            rank += 1
    return picked


def top_k_torch(score: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`skmm.select.greedy_moment_matching.top_k` on the device: the k largest, ties by index."""
    if k == 1:
        return torch.argmax(score).reshape(1)  # the first maximum, as np.argmax
    kth = torch.topk(score, k).values[-1]
    above = torch.nonzero(score > kth).flatten()
    rows = torch.cat([above, torch.nonzero(score == kth).flatten()[:k - above.numel()]]).sort().values
    return rows[torch.argsort(-score[rows], stable=True)]


def greedy_on_device(S: np.ndarray, sigma: np.ndarray, eps: float, n_seed: int, n: int, block: int,
                     pick, rng: np.random.Generator, dev: torch.device,
                     chunk_rows: int | None = None, pivoting: str | float = "sampled",
                     lead_pivots: int | None = None) -> tuple[list[int], int]:
    """SkMMv2's seeding and greedy steps with the sketch, the per-row numerator and leverage on ``dev``; the m × m
    solves on the host, as the numpy path. ``pick(score, k, rng)`` is the numpy sampler, used at temperature > 0
    (None: the greedy top-k on the device). Returns (rows in selection order, rows seeded)."""
    N, m = S.shape
    chunk_rows = _chunk(dev, chunk_rows)
    S_d = _to_device(S, dev, chunk_rows)
    seeds = pivoted_rows_on_device(S, n_seed, rng, dev, chunk_rows, S_d, pivoting, lead_pivots) if n_seed else []
    chosen = torch.zeros(N, dtype=torch.bool, device=dev)
    order = list(seeds)
    if seeds:
        chosen[seeds] = True
    seeded = S[seeds].astype(np.float64)
    A = seeded.T @ seeded + eps * np.eye(m)
    A_d, sigma_d = torch.from_numpy(A).to(dev), torch.from_numpy(np.ascontiguousarray(sigma)).to(dev)
    num, lev = torch.empty(N, dtype=torch.float64, device=dev), torch.empty(N, dtype=torch.float64, device=dev)
    for lo in range(0, N, chunk_rows):
        rows = S_d[lo:lo + chunk_rows].double()
        W = torch.linalg.solve(A_d, rows.T).T
        lev[lo:lo + chunk_rows] = (W * rows).sum(dim=1)
        num[lo:lo + chunk_rows] = ((W @ sigma_d) * W).sum(dim=1)
    del A_d, W, rows
    minus_inf = torch.tensor(-np.inf, dtype=torch.float64, device=dev)
    while len(order) < n:
        score = torch.where(chosen, minus_inf, num / (1.0 + lev))
        take = min(block, n - len(order))
        picks = top_k_torch(score, take).tolist() if pick is None else pick(score.cpu().numpy(), take, rng).tolist()
        del score
        for p in picks:
            s_p = S[p].astype(np.float64)
            a = np.linalg.solve(A, s_p)
            M = torch.from_numpy(np.column_stack([a, np.linalg.solve(A, sigma @ a)])).to(dev)
            Sw_t = _rows_float64(S_d, lambda b, M=M: b @ M, chunk_rows)
            Sw, t = Sw_t[:, 0], Sw_t[:, 1]
            lev_p, num_p = lev[p].item(), num[p].item()
            denom = 1.0 + lev_p
            num += Sw * (Sw * (num_p / denom) - 2.0 * t) / denom
            lev -= Sw**2 / denom
            del Sw_t, Sw, t
            A += np.outer(s_p, s_p)
            chosen[p] = True
            order.append(int(p))
    return order, len(seeds)
