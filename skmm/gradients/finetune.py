"""Finetuning (FT) gradients: per-sample gradients of the last layers, sketched batch by batch.

SkMM's FT setting (SKMM.md §2) needs the gradient of the cross-entropy with uniformly random pseudo-labels
w.r.t. the finetuned parameters, at the pre-trained weights, for every pool sample. With r in the 1e5–1e6
range the N×r gradient matrix must never exist: :func:`sketch_gradients` computes one batch of per-sample
gradients (torch.func ``vmap(grad)``), projects it at once with the single seeded projector of the whole pool,
and keeps only the (batch, m) sketch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from skmm._validation import check_positive_int
from skmm.gradients.features import _check_labels, pseudo_labels

__all__ = [
    "gradient_dim",
    "iter_sketch_gradients",
    "last_k_parameter_names",
    "per_sample_gradients",
    "sketch_gradients",
]

LossArg = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("cross_entropy", "mse")


def _resolve_loss(loss: LossArg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss of (output of one sample as a batch of 1, its target as a batch of 1) -> scalar."""
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y)
    if loss == "mse":
        return lambda out, y: F.mse_loss(out.reshape(-1), y.reshape(-1).to(out.dtype))
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES} or a callable(output, target)")


def _check_param_names(model: nn.Module, param_names: Sequence[str]) -> list[str]:
    if isinstance(param_names, str):
        raise TypeError("param_names must be a sequence of parameter names, not a single string")
    names = list(param_names)
    if not names:
        raise ValueError("param_names is empty: choose at least one parameter (see last_k_parameter_names)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"param_names has duplicates: {dup}")
    known = dict(model.named_parameters())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; the model has e.g. {list(known)[:8]}")
    return names


def gradient_dim(model: nn.Module, param_names: Sequence[str]) -> int:
    """r: the total number of entries of the named parameters (the length of one flattened gradient)."""
    params = dict(model.named_parameters())
    return int(sum(params[n].numel() for n in _check_param_names(model, param_names)))


def per_sample_gradients(
    model: nn.Module,
    inputs: Any,
    labels: Any,
    param_names: Sequence[str],
    loss: LossArg = "cross_entropy",
) -> torch.Tensor:
    """Per-sample gradients of ``loss`` w.r.t. the named parameters, flattened: a (batch, r) tensor.

    Row i is the concatenation, in the order of ``param_names``, of ∂loss(model(x_i), y_i)/∂θ flattened
    row-major, at the model's current weights; r is the total numel of those parameters (all other
    parameters and buffers are held fixed). Computed with torch.func (``functional_call`` + ``vmap(grad)``) in
    eval mode (dropout off, batch-norm statistics frozen; the previous mode is restored), with no autograd
    graph built on the model. Inputs are moved to the model's device (floating inputs also to its dtype); the
    result lives there too. ``loss`` is "cross_entropy" (integer ``labels``), "mse" (regression targets,
    mean over outputs) or a callable ``loss(output, target) -> scalar`` applied to one sample as a batch of 1.
    Memory grows as batch × r: choose the batch size accordingly.
    """
    names = _check_param_names(model, param_names)
    loss_fn = _resolve_loss(loss)
    params = dict(model.named_parameters())
    ref = params[names[0]]
    x = torch.as_tensor(inputs, device=ref.device)
    if x.is_floating_point() and x.dtype != ref.dtype:
        x = x.to(ref.dtype)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (batch, ...); got shape {tuple(x.shape)}")
    if loss == "cross_entropy":
        y = _check_labels(torch.as_tensor(labels), x.shape[0], np.iinfo(np.int64).max).to(ref.device)
    else:
        y = torch.as_tensor(labels, device=ref.device)
        if y.ndim < 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have one entry per sample ({x.shape[0]}); "
                             f"got shape {tuple(y.shape)}")

    chosen = {n: params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in chosen}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})

    def sample_loss(theta: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **theta}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if loss == "cross_entropy":  # out-of-range targets would be a device-side assert on CUDA
                out = functional_call(model, {**fixed, **chosen}, (x[:1],))
                if out.ndim != 2:
                    raise ValueError(f"cross_entropy needs model outputs of shape (batch, classes); got "
                                     f"{tuple(out.shape)}")
                if int(y.max()) >= out.shape[1]:
                    raise ValueError(f"labels must lie in [0, {out.shape[1]}) (the model's number of "
                                     f"outputs); got max {int(y.max())}")
            grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(chosen, x, y)
    finally:
        model.train(was_training)
    flat = torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"{len(bad)} per-sample gradient(s) hold NaN or inf (first: batch row {bad[0]}); "
                         "check the inputs and the model's weights")
    return flat


def _owning_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def last_k_parameter_names(
    model: nn.Module,
    k: int,
    head: str | nn.Module | None = None,
    blocks: str | None = None,
) -> list[str]:
    """Names of the parameters of the model's last ``k`` blocks (plus an optional head): the FT layer set.

    Blocks are chosen by the first rule that applies:

    1. ``blocks`` given: the dotted path of an ``nn.ModuleList``/``nn.Sequential``; take its last k children.
    2. The model has exactly one ``nn.ModuleList`` named ``transformer.resblocks`` or
       ``*.transformer.resblocks`` (open_clip's ViT towers): its last k children. If several match (a whole
       CLIP model has an image and a text tower), pass ``blocks`` to choose.
    3. Otherwise: the last k modules that own parameters directly, in ``named_modules()`` order (for an MLP,
       its last k Linear layers).

    ``head`` (a submodule or its dotted name) adds all its parameters. Parameters are included whether or
    not they require grad. The names are returned in ``model.named_parameters()`` order, without duplicates.
    """
    k = check_positive_int(k, "k")
    modules = dict(model.named_modules())
    if blocks is not None:
        if blocks not in modules or not isinstance(modules[blocks], nn.ModuleList | nn.Sequential):
            raise ValueError(f"blocks={blocks!r} is not a ModuleList/Sequential of the model")
        container: nn.Module | None = modules[blocks]
    else:
        found = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)
                 and (n == "transformer.resblocks" or n.endswith(".transformer.resblocks"))]
        if len(found) > 1:
            raise ValueError(f"several block lists match {found}; pass blocks= to choose one")
        container = modules[found[0]] if found else None
    if container is not None:
        children = list(container.children())
        if k > len(children):
            raise ValueError(f"k={k} is more than the {len(children)} blocks available")
        chosen_modules = children[-k:]
    else:
        owners = _owning_modules(model)
        if k > len(owners):
            raise ValueError(f"k={k} is more than the {len(owners)} modules that own parameters")
        chosen_modules = [m for _, m in owners[-k:]]
    if head is not None:
        if isinstance(head, str):
            if head not in modules:
                raise ValueError(f"head={head!r} is not a submodule of the model")
            head = modules[head]
        if not any(m is head for m in modules.values()):
            raise ValueError("head is not a submodule of the model")
        chosen_modules.append(head)
    wanted = {id(p) for m in chosen_modules for p in m.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in wanted]
    if not names:
        raise ValueError("the chosen modules own no parameters")
    return names


def iter_sketch_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    param_names: Sequence[str],
    projector: Any,
    num_classes: int,
    seed: int,
    sample_keys: Iterable[Any],
    loss: LossArg = "cross_entropy",
) -> Iterator[tuple[list[Any], np.ndarray]]:
    """Yield ``(keys, sketch)`` per input batch: the sketched per-sample pseudo-label gradients of that batch.

    See :func:`sketch_gradients`; this is its streaming form (for writing shards as they are computed).
    """
    names = _check_param_names(model, param_names)
    r = gradient_dim(model, names)
    spec = projector.spec
    if spec.input_dim != r:
        raise ValueError(f"the projector's input_dim ({spec.input_dim}) must equal r = {r}, the number of "
                         f"entries of the {len(names)} chosen parameter(s)")
    if isinstance(sample_keys, str):
        raise TypeError("sample_keys must be a sequence of keys (one per sample), not a single string")
    keys = sample_keys.tolist() if isinstance(sample_keys, np.ndarray | torch.Tensor) else list(sample_keys)
    if not keys:
        raise ValueError("sample_keys is empty: there is no sample to sketch")
    labels = pseudo_labels(keys, num_classes, seed)
    lo = 0
    for batch in batches:
        if isinstance(batch, tuple | list | dict):
            raise TypeError("batches must yield input tensors only (e.g. `(x for x, _ in loader)`); the "
                            "pseudo-labels come from sample_keys")
        b = len(batch)
        if lo + b > len(keys):
            raise ValueError(f"batches hold more samples than sample_keys ({len(keys)})")
        grads = per_sample_gradients(model, batch, torch.from_numpy(labels[lo:lo + b]), names, loss=loss)
        sketch = projector.project(grads)
        yield keys[lo:lo + b], sketch.detach().cpu().numpy()
        lo += b
    if lo != len(keys):
        raise ValueError(f"batches held {lo} samples but sample_keys has {len(keys)}")


def sketch_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    param_names: Sequence[str],
    projector: Any,
    num_classes: int,
    seed: int,
    sample_keys: Iterable[Any],
    loss: LossArg = "cross_entropy",
) -> np.ndarray:
    """Sketched FT gradients G̃ = GΓ of a pool, (N, m), without ever forming the N×r matrix G.

    ``batches`` yields input tensors (any batch sizes) whose rows, concatenated, are the samples named by
    ``sample_keys`` (ints or strings, one per sample, in the same order). Each sample's pseudo-label is
    ``pseudo_labels([key], num_classes, seed)``, so the rows do not depend on batching, order or sharding.
    Per batch: per-sample gradients w.r.t. ``param_names`` (see :func:`per_sample_gradients`), then at once
    ``projector.project`` — the same seeded projector for the whole pool, whose input_dim must equal r.
    Runs on the model's device. Store ``projector.spec``, ``param_names`` and ``seed`` with the result.
    """
    parts = [s for _, s in iter_sketch_gradients(model, batches, param_names, projector, num_classes, seed,
                                                  sample_keys, loss=loss)]
    return np.concatenate(parts, axis=0)
