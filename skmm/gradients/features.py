"""Linear probing (LP) gradients: normalised frozen features, a linear head's gradient factors, pseudo-labels.

For a linear head W ∈ R^{C×d} on frozen features φ(x), the cross-entropy gradient w.r.t. W is the rank-one
matrix (p − onehot(y)) φᵀ, so its flattened form (row-major vec, x[c·d + j]) is (p − y) ⊗ φ. We return the two
factors instead of the C·d vector so that :meth:`skmm.sketch.KroneckerProjector.project_factors` can sketch it
in O((C + d)·m) per sample. Functions accept numpy arrays or torch tensors and return the same kind.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from skmm._validation import check_positive_int

__all__ = ["linear_head_gradient_factors", "normalize_features", "pseudo_labels"]


def _check_features(X: Any, name: str) -> Any:
    """Return ``X`` (numpy or torch, same kind) as a 2-D, non-empty, finite floating array.

    Float dtypes are kept; integer input becomes float64 (numpy) or torch's default dtype (torch).
    """
    if isinstance(X, torch.Tensor):
        t = X.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers; got dtype {t.dtype}")
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        shape, finite_rows = tuple(t.shape), None
        if t.ndim == 2 and t.numel() > 0:
            finite_rows = torch.isfinite(t).all(dim=1).cpu().numpy()
        arr: Any = t
    else:
        arr = np.asarray(X)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
        shape, finite_rows = arr.shape, None
        if arr.ndim == 2 and arr.size > 0:
            finite_rows = np.isfinite(arr).all(axis=1)
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_samples, n_features); got {len(shape)}-D shape {shape}"
            + (" (reshape a single sample with X.reshape(1, -1))" if len(shape) == 1 else "")
        )
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 rows")
    if shape[1] == 0:
        raise ValueError(f"{name} has 0 features (shape {shape})")
    if finite_rows is not None and not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise ValueError(f"{name} has {bad.size} row(s) with NaN or inf values (first: row {int(bad[0])})")
    return arr


def normalize_features(X: Any, eps: float = 1e-12) -> Any:
    """Scale each row of ``X`` to unit L2 norm (the CLIP-embedding convention used for linear probing).

    Numpy in, numpy out; torch in, torch out on the same device (float dtypes are kept). A row whose norm is
    at most ``eps`` (e.g. an all-zero row) is divided by ``eps`` instead, so a zero row stays zero rather than
    becoming NaN; such a row contributes nothing to the moments. Raises ValueError for input that is not
    2-D, is empty or holds NaN/inf.
    """
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    arr = _check_features(X, "X")
    if isinstance(arr, torch.Tensor):
        norms = torch.linalg.vector_norm(arr, dim=1, keepdim=True).clamp_min(eps)
        return arr / norms
    norms = np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), eps)
    return arr / norms


def _check_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> Any:
    """Return integer class labels of shape (n,) in [0, num_classes), numpy or torch as given."""
    is_torch = isinstance(labels, torch.Tensor)
    arr = labels.detach().cpu().numpy() if is_torch else np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per sample); got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}); got values in [{arr.min()}, {arr.max()}]")
    return labels.long() if is_torch else arr.astype(np.int64)


def _like(a: Any, ref: Any) -> Any:
    """``a`` as the same kind of array as ``ref`` (numpy, or torch on ref's device), in ref's dtype."""
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(a).to(device=ref.device, dtype=ref.dtype)
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.astype(ref.dtype, copy=False)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def linear_head_gradient_factors(
    features: Any,
    labels: Any,
    num_classes: int,
    *,
    logits: Any = None,
    probs: Any = None,
) -> tuple[Any, Any]:
    """The two factors (p − onehot(y), φ) of the per-sample cross-entropy gradient of a linear head.

    For a head W ∈ R^{C×d} (no bias) with logits z = Wφ, ∂CE/∂W = (p − onehot(y)) φᵀ with p = softmax(z);
    flattened row-major this is the Kronecker product (p − y) ⊗ φ, which
    ``KroneckerProjector(left_dim=C, right_dim=d, ...).project_factors(*factors)`` sketches without forming
    it. Give the head's current ``logits`` or ``probs`` (not both), each of shape (batch, C); with neither,
    the head is taken to be zero-initialised, so p = 1/C for every class.

    ``features`` is used as given: pass ``normalize_features(X)`` if the head is trained on L2-normalised
    features. ``labels`` are class indices in [0, num_classes) (e.g. from :func:`pseudo_labels`).

    Returns ``(residual, features)`` of shapes (batch, C) and (batch, d): numpy if ``features`` is numpy,
    torch (on the features' device) if it is a tensor.
    """
    C = check_positive_int(num_classes, "num_classes")
    phi = _check_features(features, "features")
    n = phi.shape[0]
    if logits is not None and probs is not None:
        raise ValueError("give either logits or probs, not both")
    is_torch = isinstance(phi, torch.Tensor)
    given, given_name = (logits, "logits") if logits is not None else (probs, "probs")
    y = _check_labels(labels, n, C)
    if given is None:  # zero-initialised head: uniform probabilities
        p = _like(np.full((n, C), 1.0 / C), phi)
    else:
        scores = _check_features(given, given_name)
        if tuple(scores.shape) != (n, C):
            raise ValueError(f"{given_name} must have shape ({n}, {C}) (batch, num_classes); "
                             f"got {tuple(scores.shape)}")
        scores = _like(scores, phi)
        if logits is not None:
            p = torch.softmax(scores, dim=1) if is_torch else _softmax(scores)
        else:
            if (scores < 0).any() or (abs(scores.sum(1) - 1) > 1e-3).any():
                raise ValueError("probs must be non-negative with rows summing to 1 "
                                 "(use logits= for raw scores)")
            p = scores
    onehot = np.zeros((n, C))
    onehot[np.arange(n), np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)] = 1.0
    onehot = _like(onehot, phi)
    return p - onehot, phi


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool | np.bool_) or not isinstance(key, numbers.Integral):
        raise TypeError(f"sample keys must be ints (global row indices) or strings (sample ids); got {key!r} "
                        f"of type {type(key).__name__}")
    return str(int(key))


def pseudo_labels(sample_keys: Iterable[Any], num_classes: int, seed: int) -> np.ndarray:
    """Uniformly random class labels, one per sample, each a pure function of (seed, sample key).

    The label of key k is ``blake2b(f"{seed}:{k}") mod num_classes`` (64-bit digest, so the modulo bias is
    negligible). It does not depend on batch position, so a sample gets the same pseudo-label whatever the
    batch size, order or sharding. Keys are ints (global row indices) or strings (content-hash sample ids);
    note that the int 5 and the string "5" are the same key. Returns an int64 array of shape (N,).
    """
    C = check_positive_int(num_classes, "num_classes")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if isinstance(sample_keys, str):
        raise TypeError("sample_keys must be a sequence of keys, not a single string")
    if isinstance(sample_keys, torch.Tensor | np.ndarray):
        if sample_keys.ndim != 1:
            raise ValueError(f"sample_keys must be 1-D; got shape {tuple(sample_keys.shape)}")
        sample_keys = sample_keys.tolist()
    def label(key: Any) -> int:
        digest = hashlib.blake2b(f"{int(seed)}:{_key_text(key)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % C

    out = [label(k) for k in sample_keys]
    return np.asarray(out, dtype=np.int64).reshape(-1)
