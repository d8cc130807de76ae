"""Linear probing: a linear head on frozen, standardised features — the paper's LP setting.

Classification: StandardScaler + multinomial LogisticRegression (L2, strength ``C``); regression: StandardScaler
+ Ridge (``alpha``). ``C``/``alpha`` may be a grid: the value with the best score on a *validation* split is
kept (never the evaluation split). Weights serialise to safetensors bytes with their metadata, so a model
artifact is identified by its content hash.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error
from sklearn.preprocessing import StandardScaler

from skmm._validation import check_matrix
from skmm.canonical_json import canonical_json

__all__ = ["LinearProbe", "evaluate_predictions"]

TASKS = ("classification", "regression")


def evaluate_predictions(task: str, y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """accuracy and macro-F1 (classification) or MAE (regression)."""
    if task == "classification":
        return {"accuracy": float(accuracy_score(y_true, y_pred)),
                "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}
    if task == "regression":
        return {"mae": float(mean_absolute_error(np.asarray(y_true, float), np.asarray(y_pred, float)))}
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


class LinearProbe:
    """Linear head on frozen features, scikit-learn style (``fit`` returns self, learned state ends in ``_``).

    ``strengths``: the grid of C (classification) or alpha (regression); with more than one value, pass
    ``X_val``/``y_val`` to ``fit`` to choose by validation score (accuracy, or −MAE).
    """

    def __init__(self, task: str = "classification", strengths: Sequence[float] = (1.0,), max_iter: int = 2000,
                 random_state: int = 0) -> None:
        self.task = task
        self.strengths = strengths
        self.max_iter = max_iter
        self.random_state = random_state

    def _make(self, strength: float):
        if self.task == "classification":
            return LogisticRegression(C=strength, max_iter=self.max_iter, random_state=self.random_state)
        return Ridge(alpha=strength)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> LinearProbe:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {self.task!r}")
        strengths = [float(s) for s in self.strengths]
        if not strengths or any(not s > 0 for s in strengths):
            raise ValueError(f"strengths must be a non-empty list of positive numbers; got {self.strengths!r}")
        X = check_matrix(X, "X")
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have one label per row of X ({X.shape[0]}); got shape {y.shape}")
        if self.task == "classification" and np.unique(y).size < 2:
            raise ValueError("a classification probe needs at least 2 classes among the selected samples; got "
                             f"{np.unique(y).size}")
        if len(strengths) > 1 and (X_val is None or y_val is None):
            raise ValueError("choosing among several strengths needs a validation split (X_val, y_val)")
        if self.task == "regression":
            try:
                y = y.astype(np.float64)
                y_val = None if y_val is None else np.asarray(y_val).astype(np.float64)
            except ValueError as exc:
                raise ValueError(f"regression needs numeric labels: {exc}") from None
        scaler = StandardScaler().fit(X)
        Z = scaler.transform(X)
        best = None
        scores = {}
        for s in strengths:
            head = self._make(s).fit(Z, y)
            if len(strengths) == 1:
                best = (s, head)
                break
            pred = head.predict(scaler.transform(check_matrix(X_val, "X_val")))
            metrics = evaluate_predictions(self.task, y_val, pred)
            score = metrics["accuracy"] if self.task == "classification" else -metrics["mae"]
            scores[s] = score
            if best is None or score > scores[best[0]]:
                best = (s, head)
        self.strength_, head = best
        self.validation_scores_ = scores
        self.mean_, self.scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        self.coef_ = np.atleast_2d(head.coef_).astype(np.float64)
        self.intercept_ = np.atleast_1d(head.intercept_).astype(np.float64)
        self.classes_ = head.classes_ if self.task == "classification" else None
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        Z = (check_matrix(X, "X") - self.mean_) / self.scale_
        return Z @ self.coef_.T + self.intercept_

    def predict(self, X: Any) -> np.ndarray:
        scores = self.decision_function(X)
        if self.task == "regression":
            return scores[:, 0]
        if scores.shape[1] == 1:  # binary logistic regression: one column
            return self.classes_[(scores[:, 0] > 0).astype(int)]
        return self.classes_[np.argmax(scores, axis=1)]

    # ---------------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        """safetensors bytes: weights as tensors, task/classes/strength as metadata (deterministic)."""
        tensors = {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_}
        classes = None if self.classes_ is None else [c.item() if hasattr(c, "item") else c for c in self.classes_]
        meta = {"format": "skmm-linear-probe/1", "task": self.task, "strength": float(self.strength_),
                "classes": classes}
        # One metadata key holding canonical JSON: safetensors writes its metadata map in hash order, which
        # would make the bytes (and so the model's content hash) differ from run to run.
        header = {"skmm": canonical_json(meta)}
        return st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> LinearProbe:
        """Inverse of :meth:`to_bytes`; a clear ValueError for anything else."""
        try:
            tensors = st_load(data)
            header_len = struct.unpack("<Q", data[:8])[0]
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        except Exception as exc:
            raise ValueError(f"not a linear-probe safetensors file: {type(exc).__name__}") from None
        try:
            info = json.loads(meta["skmm"])
        except (KeyError, ValueError):
            info = {}
        if info.get("format") != "skmm-linear-probe/1":
            raise ValueError(f"not a linear-probe safetensors file (format {info.get('format')!r})")
        probe = cls(task=info["task"])
        probe.coef_, probe.intercept_ = tensors["coef"], tensors["intercept"]
        probe.mean_, probe.scale_ = tensors["mean"], tensors["scale"]
        probe.classes_ = None if info["classes"] is None else np.asarray(info["classes"])
        probe.strength_ = float(info["strength"])
        probe.validation_scores_ = {}
        return probe
