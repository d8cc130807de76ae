"""Finetuning the last k layers of an open_clip image tower with a new linear head (the paper's FT setting).

    ft = LastLayersFinetuner(ClipSpec("ViT-B-32", "openai"), k=1, epochs=50).fit(images, labels, val_i, val_l)
    ft.predict(test_images); data = ft.state_bytes(); LastLayersFinetuner.from_bytes(data).predict(...)

The model, its head initialisation and the trained layer set are those of :mod:`skmm.gradients.clip_ft`, so a
finetuner with the same spec, k, classes and seed starts exactly where the FT-mode gradients were taken.

Decisions:

- **Trained**: the last ``k`` residual blocks, the tower's layers after them (``ln_post``, ``proj``) and the head
  (:func:`~skmm.gradients.clip_ft.ft_parameter_names`); everything else is frozen (``requires_grad=False``).
  Adam, mean cross-entropy, two parameter groups: ``lr`` for the tower's layers, ``head_lr`` for the head;
  ``weight_decay`` is Adam's (L2) on both.
- **Eval mode throughout**: open_clip ViT towers have no batch-norm and no dropout in their blocks at the
  default config (patch dropout is 0), so train mode would change nothing but randomness; eval mode keeps the
  run a pure function of (data, seed).
- **The frozen prefix runs once**: the tokens entering the first trained block are computed once per image
  (no augmentation: open_clip's evaluation transform) and kept on the CPU (ViT-B/32: ~150 KB per image);
  each epoch only runs the trained suffix. Same result as a full forward, L−k blocks cheaper per epoch. The val
  images' tokens are kept only up to ``val_cache_bytes`` (default 4 GiB: 27 000 ViT-B/32 images, 4 000 of a
  ViT-L/14); above it each epoch's val pass decodes and runs the full tower again, in the same batches, so the
  val accuracies, the best epoch and the weights are bitwise the same (``val_tokens_cached_`` says which).
  Images are decoded as in the FT gradient stage: by worker processes on CUDA, while the device runs the prefix
  of the batch before; in the calling thread on the CPU. Bitwise the same tokens either way.
- **Reproducible**: the head is seeded (``init_head``), shuffling uses a ``torch.Generator`` seeded with
  ``seed``; on the same device and thread count the same seed gives bit-identical weights. TF32 is off on CUDA.
- **Best epoch**: with a validation split the epoch with the highest val accuracy is kept (the earliest on
  ties); without one, the last epoch. Val labels unseen in training count as errors.
- **Serialisation**: ``state_bytes`` is a safetensors file of the *trained tensors only* (the base weights are
  named by the ClipSpec) and ONE metadata key ``"skmm"`` holding canonical JSON (safetensors writes its metadata
  map in hash order, so several keys would make the bytes, and the artifact's content hash, vary by run).
"""

from __future__ import annotations

import json
import numbers
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from skmm._validation import check_positive_int
from skmm.canonical_json import canonical_json
from skmm.gradients.clip_ft import (
    FEATURES,
    HEAD_INIT,
    VisualWithHead,
    _check_images,
    _check_seed,
    _decode_plan,
    _decoded_batches,
    build_ft_model,
    ft_parameter_names,
)

__all__ = ["FORMAT", "VAL_CACHE_BYTES", "LastLayersFinetuner", "model_format"]

FORMAT = "skmm-last-layers/1"
META_KEY = "skmm"
VAL_CACHE_BYTES = 4 * 2**30  # val prefix tokens kept across epochs at most; above it they are recomputed per epoch


def _read_safetensors_header(data: Any) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected safetensors bytes; got {type(data).__name__}")
    data = bytes(data)
    try:
        (size,) = struct.unpack("<Q", data[:8])
        if size > len(data) - 8:
            raise ValueError("header longer than the file")
        header = json.loads(data[8:8 + size])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header
    except Exception as exc:
        raise ValueError(f"not a safetensors file ({type(exc).__name__}: {exc})") from None


def model_format(data: bytes) -> str | None:
    """The ``format`` recorded in an skmm model file ("skmm-linear-probe/1", "skmm-last-layers/1", …), or None.

    Lets a caller (the evaluate stage) dispatch on the kind of model without loading it. ValueError when the
    bytes are not a safetensors file at all.
    """
    meta = _read_safetensors_header(data).get("__metadata__") or {}
    try:
        info = json.loads(meta[META_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    return info.get("format") if isinstance(info, dict) else None


def _check_labels(labels: Any, n: int, name: str) -> list[Any]:
    if isinstance(labels, str | bytes):
        raise TypeError(f"{name} must be a sequence of labels, not a single {type(labels).__name__}")
    out = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    if len(out) != n:
        raise ValueError(f"{name} must have one label per image ({n}); got {len(out)}")
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, str | numbers.Integral)]
    if bad:
        raise TypeError(f"{name} must be strings or integers (JSON-storable class names); got e.g. {bad[0]!r}")
    return [v if isinstance(v, str) else int(v) for v in out]


class LastLayersFinetuner:
    """Finetune the last ``k`` blocks of ``spec``'s image tower plus a new linear head on labelled images.

    ``spec``: a :class:`~skmm.models.clip.ClipSpec` or its dict. ``lr`` for the tower's trained layers,
    ``head_lr`` for the head. ``device=None`` picks CUDA when available. ``val_cache_bytes``: the most val
    prefix tokens kept across epochs (see the module docstring; it changes memory and time, never a result, so it
    is not recorded). After :meth:`fit`: ``classes_`` (sorted), ``param_names_``, ``best_epoch_`` (1-based),
    ``history_`` (per epoch: train loss and accuracy, val accuracy), ``val_tokens_cached_``, ``model_`` (a
    :class:`~skmm.gradients.clip_ft.VisualWithHead`).
    """

    def __init__(self, spec: Any, k: int = 1, epochs: int = 5, lr: float = 1e-4, head_lr: float = 1e-2,
                 batch_size: int = 32, weight_decay: float = 0.0, seed: int = 0, device: Any = None,
                 val_cache_bytes: int = VAL_CACHE_BYTES) -> None:
        from skmm.models.clip import ClipSpec

        if isinstance(spec, dict):
            spec = ClipSpec.from_dict(spec)
        if not isinstance(spec, ClipSpec):
            raise TypeError(f"spec must be a ClipSpec or its dict; got {type(spec).__name__}")
        self.spec = spec
        self.k = check_positive_int(k, "k")
        self.epochs = check_positive_int(epochs, "epochs")
        self.lr = self._check_rate(lr, "lr")
        self.head_lr = self._check_rate(head_lr, "head_lr")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not (
                0 <= weight_decay < float("inf")):
            raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        self.seed = _check_seed(seed)
        self.device = device
        if isinstance(val_cache_bytes, bool) or not isinstance(val_cache_bytes, numbers.Integral) or \
                val_cache_bytes < 0:
            raise ValueError(f"val_cache_bytes must be an integer >= 0; got {val_cache_bytes!r}")
        self.val_cache_bytes = int(val_cache_bytes)

    @staticmethod
    def _check_rate(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < float("inf")):
            raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
        return float(value)

    # ------------------------------------------------------------------------------------------ model
    def _device(self) -> torch.device:
        from skmm.models.clip import resolve_device

        return resolve_device(self.device)

    def _build(self, num_classes: int) -> None:
        model, self._preprocess = build_ft_model(self.spec, num_classes, self.seed, self._device())
        names = ft_parameter_names(model, self.k)
        trained = set(names)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trained)
        self.model_: VisualWithHead = model
        self.param_names_ = names

    def _token_batches(self, images: list[Any]) -> Iterator[torch.Tensor]:
        """Tokens entering the first trained block, ``batch_size`` images at a time, on the CPU; the images are
        decoded as in the FT gradient stage (by worker processes on CUDA, in this thread on the CPU)."""
        model, dev = self.model_, self._device()
        workers, threads = _decode_plan(None, len(images), self.batch_size, dev)
        batches = _decoded_batches(images, self.batch_size, self._preprocess, workers, threads=threads)
        try:
            with torch.no_grad():
                for _, pixels in batches:
                    yield model.prefix(pixels.to(dev), self.k).cpu()
        finally:
            batches.close()  # stops the decode workers when the caller stops early

    def _tokens(self, images: list[Any]) -> torch.Tensor:
        """Tokens entering the first trained block, for every image, on the CPU."""
        return torch.cat(list(self._token_batches(images)))

    def _cached_val_tokens(self, images: list[Any]) -> torch.Tensor | None:
        """All val tokens when they fit ``val_cache_bytes`` (known after the first batch), else None."""
        batches = self._token_batches(images)
        first = next(batches)
        if first[0].numel() * first.element_size() * len(images) > self.val_cache_bytes:
            batches.close()
            return None
        return torch.cat([first, *batches])

    def _streamed_logits(self, images: list[Any]) -> torch.Tensor:
        """The logits :meth:`_logits` gives on cached tokens, from the images: the same ``batch_size`` batches
        through the prefix and then the suffix, so the same bits, holding one batch of tokens."""
        model, dev, parts = self.model_, self._device(), []
        with torch.no_grad():
            for tokens in self._token_batches(images):
                parts.append(model.suffix(tokens.to(dev), self.k).float().cpu())
        return torch.cat(parts)

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        model, dev, parts = self.model_, self._device(), []
        with torch.no_grad():
            for lo in range(0, len(tokens), self.batch_size):
                parts.append(model.suffix(tokens[lo:lo + self.batch_size].to(dev), self.k).float().cpu())
        return torch.cat(parts)

    def _trained_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.model_.named_parameters())
        return {n: params[n].detach().clone() for n in self.param_names_}

    # ------------------------------------------------------------------------------------------ fit / predict
    def fit(self, images: Sequence[bytes], labels: Sequence[Any], val_images: Sequence[bytes] | None = None,
            val_labels: Sequence[Any] | None = None, classes: Sequence[Any] | None = None) -> LastLayersFinetuner:
        """Train on encoded images and their labels; keep the best epoch by val accuracy when a val split is given.

        ``classes``: the full label set (e.g. the dataset's), so the head has one output per class even when the
        coreset misses some — then it starts exactly at the head the FT-mode gradients were taken at.
        """
        from skmm._cuda_math import ieee_fp32

        images = _check_images(images)
        if not images:
            raise ValueError("images is empty: there is nothing to finetune on")
        y_list = _check_labels(labels, len(images), "labels")
        if len({type(v) for v in y_list}) > 1:
            raise TypeError("labels mix strings and integers; use one kind")
        if classes is not None:
            known = set(_check_labels(classes, len(classes), "classes"))
            unknown = sorted(set(y_list) - known, key=repr)
            if unknown:
                raise ValueError(f"labels {unknown[:5]!r} are not among the given classes")
            classes = sorted(known)
        else:
            classes = sorted(set(y_list))
        if len(classes) < 2:
            raise ValueError(f"finetuning a classifier needs at least 2 classes among the samples; got {len(classes)}")
        if (val_images is None) != (val_labels is None):
            raise ValueError("pass both val_images and val_labels, or neither")
        if val_images is not None:
            val_images = _check_images(val_images, "val_images")
            val_list = _check_labels(val_labels, len(val_images), "val_labels")
            if not val_images:
                val_images = None
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[v] for v in y_list], dtype=torch.long)

        self._build(len(classes))  # ValueError when k exceeds the tower's blocks
        self.classes_ = np.asarray(classes)
        dev, model = self._device(), self.model_
        params = dict(model.named_parameters())
        tower = [params[n] for n in self.param_names_ if not n.startswith("head.")]
        head = [params[n] for n in self.param_names_ if n.startswith("head.")]
        optimizer = torch.optim.Adam([{"params": tower, "lr": self.lr}, {"params": head, "lr": self.head_lr}],
                                     weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        history: list[dict[str, Any]] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        with ieee_fp32(dev):
            tokens = self._tokens(images)
            val_tokens = self._cached_val_tokens(val_images) if val_images is not None else None
            self.val_tokens_cached_ = val_tokens is not None
            for epoch in range(1, self.epochs + 1):
                order = torch.randperm(len(images), generator=gen)
                total, correct = 0.0, 0
                for lo in range(0, len(order), self.batch_size):
                    idx = order[lo:lo + self.batch_size]
                    target = y[idx].to(dev)
                    logits = model.suffix(tokens[idx].to(dev), self.k)
                    loss = F.cross_entropy(logits, target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(1) == target).sum())
                record: dict[str, Any] = {"epoch": epoch, "train_loss": total / len(images),
                                          "train_accuracy": correct / len(images)}
                if val_images is not None:
                    logits = self._logits(val_tokens) if val_tokens is not None else self._streamed_logits(val_images)
                    pred = self.classes_[logits.argmax(1).numpy()]
                    acc = float(np.mean([p == t for p, t in zip(pred.tolist(), val_list, strict=True)]))
                    record["val_accuracy"] = acc
                    if best is None or acc > best[0]:
                        best = (acc, epoch, self._trained_state())
                history.append(record)
        if best is not None:
            self.best_val_accuracy_, self.best_epoch_, state = best
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t)
        else:
            self.best_val_accuracy_, self.best_epoch_ = None, self.epochs
        self.history_ = history
        for p in params.values():
            p.requires_grad_(False)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_") or not hasattr(self, "classes_"):
            raise ValueError("this LastLayersFinetuner is not fitted yet: call fit() or from_bytes() first")

    def decision_function(self, images: Sequence[bytes]) -> np.ndarray:
        """Logits, (N, classes) float32, columns in ``classes_`` order."""
        from skmm._cuda_math import ieee_fp32

        self._check_fitted()
        images = _check_images(images)
        if not images:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        with ieee_fp32(self._device()):
            return self._logits(self._tokens(images)).numpy().astype(np.float32)

    def predict(self, images: Sequence[bytes]) -> np.ndarray:
        """Predicted labels (elements of ``classes_``), one per image."""
        scores = self.decision_function(images)
        return self.classes_[scores.argmax(1)] if len(scores) else self.classes_[:0]

    # ------------------------------------------------------------------------------------------ serialisation
    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "k": self.k,
            "classes": [c.item() if hasattr(c, "item") else c for c in self.classes_],
            "params": list(self.param_names_),
            "epochs": self.epochs,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "best_epoch": self.best_epoch_,
            "best_val_accuracy": self.best_val_accuracy_,
            "head": {"init": HEAD_INIT, "seed": self.seed, "features": FEATURES},
        }

    def state_bytes(self) -> bytes:
        """Deterministic safetensors bytes: the trained tensors only, plus one canonical-JSON metadata key."""
        from safetensors.torch import save

        self._check_fitted()
        params = dict(self.model_.named_parameters())
        tensors = {n: params[n].detach().to("cpu", torch.float32).contiguous() for n in self.param_names_}
        header = {META_KEY: canonical_json(self._metadata())}
        return save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes, *, spec: Any = None, device: Any = None) -> LastLayersFinetuner:
        """Rebuild a fitted finetuner from :meth:`state_bytes`: the base tower from the recorded spec (or ``spec``,
        e.g. the same weights at a new path) with the stored tensors in place of its trained layers.

        ValueError when the bytes are not such a file, or when the tensors do not fit the model (missing or
        unexpected names, wrong shapes).
        """
        from safetensors.torch import load

        header = _read_safetensors_header(data)
        meta = header.get("__metadata__") or {}
        try:
            info = json.loads(meta[META_KEY])
        except (KeyError, TypeError, ValueError):
            info = {}
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            found = info.get("format") if isinstance(info, dict) else None
            raise ValueError(f"not a last-layers model file (format {found!r}; expected {FORMAT!r})")
        try:
            ft = cls(spec if spec is not None else info["spec"], k=info["k"], epochs=info["epochs"], lr=info["lr"],
                     head_lr=info["head_lr"], batch_size=info["batch_size"], weight_decay=info["weight_decay"],
                     seed=info["seed"], device=device)
            classes, stored_names = list(info["classes"]), list(info["params"])
            best_epoch, best_val = info["best_epoch"], info["best_val_accuracy"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed last-layers metadata: {type(exc).__name__}: {exc}") from None
        if len(classes) < 2 or len(set(map(repr, classes))) != len(classes):
            raise ValueError(f"malformed last-layers metadata: classes must be >= 2 distinct labels; got {classes!r}")
        try:
            tensors = load(bytes(data))
        except Exception as exc:
            raise ValueError(f"corrupt last-layers model file: {type(exc).__name__}: {exc}") from None

        ft._build(len(classes))
        expected = ft.param_names_
        params = dict(ft.model_.named_parameters())
        missing = [n for n in expected if n not in tensors]
        unexpected = sorted(set(tensors) - set(expected))
        where = f"model {ft.spec.model!r} with k={ft.k}"
        if missing or unexpected or stored_names != expected:
            parts = []
            if missing:
                parts.append(f"missing tensors {missing[:3]}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))
            if unexpected:
                parts.append(f"unexpected tensors {unexpected[:3]}"
                             + (f" (+{len(unexpected) - 3})" if len(unexpected) > 3 else ""))
            if not parts:
                parts.append("the recorded parameter list differs")
            raise ValueError(f"the file's tensors do not match {where}: {'; '.join(parts)}")
        shapes = [n for n in expected if tuple(tensors[n].shape) != tuple(params[n].shape)]
        if shapes:
            n = shapes[0]
            raise ValueError(f"the file's tensors do not match {where}: {len(shapes)} shape mismatch(es), e.g. {n}: "
                             f"file {tuple(tensors[n].shape)} vs model {tuple(params[n].shape)}")
        bad = [n for n in expected if not tensors[n].is_floating_point() or not bool(torch.isfinite(tensors[n]).all())]
        if bad:
            raise ValueError(f"the file's tensor {bad[0]} is not finite floating point")
        with torch.no_grad():
            for n in expected:
                params[n].copy_(tensors[n].to(params[n].dtype))
        for p in params.values():
            p.requires_grad_(False)
        ft.classes_ = np.asarray(classes)
        ft.best_epoch_, ft.best_val_accuracy_ = best_epoch, best_val
        ft.history_ = []
        return ft
