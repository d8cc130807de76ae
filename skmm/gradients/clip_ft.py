"""FT-mode gradients of an open_clip image tower: the pipeline's "gradients + sketch" stage for finetuning.

SkMM's FT setting (SKMM.md §2): per-sample cross-entropy gradients, with uniformly random pseudo-labels, of the
parameters that finetuning will train, at the weights finetuning starts from; projected batch by batch with ONE
seeded projector, so the N×r gradient matrix never exists.

    G̃, producer = ft_gradient_sketch(png_bytes, sample_ids, ClipSpec("ViT-B-32", "openai"),
                                      k=1, num_classes=196, sketch_dim=512, seed=0)

The model and the trained layer set are shared with :class:`skmm.finetune.LastLayersFinetuner`, so the gradients
are taken exactly at the finetuner's starting point θ0 when both use the same spec, k, class count and seed.

Decisions:

- **Model**: ``VisualWithHead(visual, head)``: logits = head(normalize(visual(x))), a linear head on the
  **L2-normalised** image features (the CLIP convention, and the features of the LP mode and of every other
  stage). Only open_clip ``VisionTransformer`` towers (``transformer.resblocks``) are supported.
- **Head init**: seeded Gaussian, weight ~ N(0, 1/d), bias 0 (:func:`init_head`). *Not* zero: with a zero head
  the logits do not depend on the tower, so every gradient w.r.t. the tower's blocks is exactly 0 and the sketch
  would only see the head. With N(0, 1/d) rows (norm ≈ 1) the logits start near 0 (p ≈ uniform) and the block
  and head gradients have comparable scales.
- **Trained layer set** (:func:`ft_parameter_names`): the last ``k`` residual blocks, everything of the tower
  *after* them (``ln_post``, ``proj``, attention pooling if any) and the head. Freezing ``ln_post``/``proj``
  between trained blocks and a trained head would not be "the last layers"; they are tiny next to a block.
- **Cost**: the frozen prefix (patch embedding and the first L−k blocks) runs once per batch as an ordinary
  batched forward without autograd; only the trained suffix goes through ``vmap(grad)``
  (:func:`skmm.gradients.per_sample_gradients`). Memory grows as batch_size × r.
- **Batch size** (:func:`ft_batch_size`): 32 on the CPU (so CPU rows and caches are what they always were); on
  CUDA the largest power of two in [1, 1024] whose estimated footprint (12·r bytes of gradient rows per sample,
  :func:`ft_activation_bytes` of activations, the sketch's row) fits in a quarter of the device's memory (its
  total, not what is free at the moment, so the batch does not depend on what else runs). An out-of-memory
  error still halves the batch and retries it (down to 1). The batch size is a run setting, not part of the
  producer: a row depends on it only through float rounding (~1e-7), like the device.
- **Sketch**: sparse JL ("sjlt") by default; see :func:`ft_gradient_sketch` for why not the dense Gaussian.
- **Decoding off the critical path on CUDA**: images are decoded and preprocessed in ``decode_workers`` forked
  processes (by default on CUDA the embed stage's: cores − 1, none for a single batch, ``$SKMM_DECODE_WORKERS``),
  64 images per job whatever the batch, while the gradients of the batch before are computed; the batch is
  pinned and copied asynchronously. Serial decoding would cap the stage at the CPU's decode rate (~2.6 ms per
  ~56 KB JPEG on one core, bench/README.md §8) whatever the device. On the CPU the default stays serial: the
  gradients keep the cores busy, and a decode worker made the stage slower (measured 0.79–0.88× on 2 cores).
  The rows are bitwise those of serial decoding at the same batch size; on CUDA by design too (the SJLT
  sketch is a matmul there, not an atomic ``index_add_``: :mod:`skmm.sketch.sjlt`), asserted by a CUDA test not
  yet run on a device. The finetuner
  (:class:`skmm.finetune.LastLayersFinetuner`) decodes its token passes the same way.
- fp32 throughout; TF32 off on CUDA during the call (as in embedding), so rows agree across batch sizes,
  orders and devices to ~1e-5.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skmm._process_setting import ProcessSetting
from skmm._validation import check_positive_int, check_worker_count
from skmm.gradients.features import pseudo_labels
from skmm.gradients.finetune import gradient_dim, last_k_parameter_names, per_sample_gradients

__all__ = [
    "FEATURES",
    "HEAD_INIT",
    "PROJECTOR_KINDS",
    "VisualWithHead",
    "build_ft_model",
    "decode_images",
    "ft_activation_bytes",
    "ft_batch_size",
    "ft_gradient_sketch",
    "ft_parameter_names",
    "init_head",
]

FEATURES = "l2-normalised"
HEAD_INIT = "normal(0,1/d),bias=0"
PROJECTOR_KINDS = ("gaussian", "rademacher", "sjlt")
BLOCKS = "visual.transformer.resblocks"
# Modules of an open_clip VisionTransformer that run after the residual blocks (plus the `proj` parameter).
_POST_MODULES = ("attn_pool", "attn_pool_contrastive", "ln_post")
_VMAP_FALLBACK = r"There is a performance drop because we have not yet implemented the batching rule"
CPU_BATCH = 32  # the FT batch on the CPU (and every non-CUDA device): the value before batches were sized
MAX_BATCH = 1024
MEMORY_FRACTION = 0.25  # of the CUDA device's memory, for one batch's gradients, activations and sketch
GRAD_COPIES = 3  # float32 (batch, r) tensors alive at the peak: vmap's per-parameter grads, their concatenation,
# and the backward's per-sample weight-gradient products (plus a bool finite mask): 12·r bytes a sample
log = logging.getLogger(__name__)


def _check_vit(visual: nn.Module) -> None:
    ok = (all(hasattr(visual, a) for a in ("_embeds", "_pool", "proj", "transformer"))
          and isinstance(getattr(visual.transformer, "resblocks", None), nn.ModuleList))
    if not ok:
        raise ValueError(f"FT mode needs an open_clip VisionTransformer image tower (transformer.resblocks); "
                         f"{type(visual).__name__} towers (ResNet, timm) are not supported")


class VisualWithHead(nn.Module):
    """An open_clip ViT image tower and a linear head on its L2-normalised features: ``forward(pixels) -> logits``.

    :meth:`prefix` and :meth:`suffix` split the same computation at block ``L - k`` (``forward`` is
    ``suffix(prefix(x, k), k)`` for every k), so the frozen prefix can run once, batched and without autograd.
    """

    def __init__(self, visual: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        _check_vit(visual)
        self.visual = visual
        self.head = head

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= self.num_blocks:
            raise ValueError(f"k must be an integer in [0, {self.num_blocks}] (the tower's blocks); got {k!r}")
        return int(k)

    def prefix(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        """Tokens entering block ``L - k``, batch first: (batch, tokens, width)."""
        k = self._check_k(k)
        v = self.visual
        return self._run_blocks(v._embeds(pixels), list(v.transformer.resblocks)[:self.num_blocks - k])

    def _run_blocks(self, x: torch.Tensor, blocks: list) -> torch.Tensor:
        """Tokens (batch first) through ``blocks``, in the layout the transformer expects."""
        if not blocks:
            return x
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def features(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """The last ``k`` blocks, pooling and projection: unnormalised image features (batch, embed_dim)."""
        k = self._check_k(k)
        v = self.visual
        x = self._run_blocks(tokens, list(v.transformer.resblocks)[self.num_blocks - k:])
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled

    def suffix(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Logits from the tokens entering block ``L - k``."""
        return self.head(F.normalize(self.features(tokens, k), dim=-1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(pixels, 0), 0)


class _Suffix(VisualWithHead):
    """The same tower and head (shared, same parameter names) whose forward is ``suffix(tokens, k)``, in the
    model's mode: a new module starts in train mode, and per_sample_gradients puts a model back in the mode it
    found, which then reached the shared tower (train mode from the second batch on: other bits)."""

    def __init__(self, model: VisualWithHead, k: int) -> None:
        super().__init__(model.visual, model.head)
        self.k = self._check_k(k)
        self.train(model.training)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.suffix(tokens, self.k)


def init_head(embed_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The head every FT model starts from: weight ~ N(0, 1/embed_dim) drawn on the CPU from ``seed``, bias 0.

    Nothing is drawn from torch's process-wide generator (``skip_init``: no default init). A seeded tower build
    in another thread holds that generator (``load_clip``), and a draw landing inside it would change its tower.
    """
    embed_dim = check_positive_int(embed_dim, "embed_dim")
    num_classes = _check_num_classes(num_classes)
    seed = _check_seed(seed)
    head = nn.utils.skip_init(nn.Linear, embed_dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, embed_dim, generator=gen) / math.sqrt(embed_dim))
        head.bias.zero_()
    return head


def build_ft_model(spec: Any, num_classes: int, seed: int = 0, device: Any = None) -> tuple[VisualWithHead, Any]:
    """``(model, preprocess)``: a fresh ``VisualWithHead`` (eval mode, fp32, on ``device``: CUDA when available)
    for ``spec``'s image tower with an :func:`init_head` head, and open_clip's evaluation transform."""
    from skmm.models.clip import ClipSpec, load_clip, resolve_device

    if isinstance(spec, dict):
        spec = ClipSpec.from_dict(spec)
    dev = resolve_device(device)
    clip, preprocess = load_clip(spec, "cpu")
    visual = clip.visual
    _check_vit(visual)
    dim = getattr(visual, "output_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"could not read the image tower's output dimension for {spec.model!r}")
    model = VisualWithHead(visual, init_head(dim, num_classes, seed))
    return model.to(dev).eval(), preprocess


def ft_parameter_names(model: VisualWithHead, k: int) -> list[str]:
    """The FT layer set: the last ``k`` blocks, the tower's modules after them, and the head.

    In ``model.named_parameters()`` order. ValueError for k < 1 or k above the number of blocks.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a positive integer; got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1 (the number of last blocks to train); got {k}")
    if k > model.num_blocks:
        raise ValueError(f"k={k} is more than the {model.num_blocks} blocks of the image tower")
    chosen = set(last_k_parameter_names(model, int(k), head="head", blocks=BLOCKS))
    post = tuple(f"visual.{m}." for m in _POST_MODULES)
    return [n for n, _ in model.named_parameters() if n in chosen or n == "visual.proj" or n.startswith(post)]


def decode_images(images: Sequence[Any], preprocess: Any, offset: int = 0) -> torch.Tensor:
    """Decode encoded images (bytes) with Pillow as RGB and preprocess them: a (batch, 3, H, W) tensor."""
    from skmm.models.clip import _decode

    return torch.stack([_decode(b, offset + i, preprocess) for i, b in enumerate(images)])


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (cross-entropy over one class has zero gradient); "
                         f"got {num_classes}")
    return int(num_classes)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def _check_images(images: Any, name: str = "images") -> list[Any]:
    if isinstance(images, bytes | bytearray | memoryview | str):
        raise TypeError(f"{name} must be a sequence of encoded images, not a single {type(images).__name__}")
    return list(images)


def ft_activation_bytes(model: VisualWithHead, k: int) -> int:
    """A conservative per-image estimate of the activation memory of one FT batch, in bytes (float32).

    ``k + 1`` blocks (the trained ones under ``vmap(grad)``, and one frozen prefix block's transient forward)
    at ``48·T·W + 8·H·T²`` floats each (T tokens, W width, H heads), plus the image twice. Measured on the CPU
    with ``torch.autograd.graph.saved_tensors_hooks`` (tests/skmm/test_ft_batch.py), a block saves ~18·T·W
    floats per image for its backward, attention included, on the tiny tower and on ViT-B-32 (T=50, W=768,
    H=12): the estimate is ≥ 2.5× that, room for the backward's activation gradients, which are as large.
    """
    k = model._check_k(k)
    v = model.visual
    tokens, width = (int(d) for d in v.positional_embedding.shape)
    heads = int(getattr(v.transformer.resblocks[0].attn, "num_heads", 1))
    size = v.image_size if isinstance(v.image_size, tuple | list) else (v.image_size, v.image_size)
    block = 48 * tokens * width + 8 * heads * tokens * tokens
    return 4 * ((k + 1) * block + 2 * 3 * int(size[0]) * int(size[1]))


def ft_batch_size(device: Any, num_params: int, sketch_dim: int | None, *, activation_bytes: int = 0,
                  fixed_bytes: int = 0, memory_bytes: int | None = None, fraction: float = MEMORY_FRACTION,
                  max_batch: int = MAX_BATCH) -> int:
    """The FT batch size for ``device``: :data:`CPU_BATCH` (32) off CUDA; on CUDA the largest power of two in
    [1, ``max_batch``] whose footprint fits ``fraction`` of the device's memory less ``fixed_bytes``.

    Per image: ``GRAD_COPIES`` float32 rows of the ``num_params`` (r) gradient coordinates, the sketched row
    (``sketch_dim`` floats) and ``activation_bytes`` (:func:`ft_activation_bytes`). ``memory_bytes``: the device
    memory to size for; ``None`` takes the device's total (``torch.cuda.get_device_properties``), not what is
    free at the moment: the batch, and so a row's bits, must not depend on what else holds the device (the
    other shard task in flight, another process; a batch that does not fit is halved). Give a figure to size
    for another device, or to test. ``fixed_bytes``: memory taken once the run starts (e.g. the SJLT cache). A
    batch of 1 is returned even when one image does not fit the budget (the run will tell).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return CPU_BATCH
    num_params = check_positive_int(num_params, "num_params")
    max_batch = check_positive_int(max_batch, "max_batch")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction!r}")
    if memory_bytes is None:
        memory_bytes = torch.cuda.get_device_properties(dev).total_memory
    per_image = 4 * GRAD_COPIES * num_params + 4 * (sketch_dim or 0) + int(activation_bytes)
    fits = int((fraction * int(memory_bytes) - int(fixed_bytes)) // per_image)
    if fits < 1:
        return 1
    return min(1 << (fits.bit_length() - 1), 1 << (max_batch.bit_length() - 1))


class _Halving:
    """Batches of rows that halve on a CUDA out-of-memory error, across the calls of one stage run."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.warned = False

    def rows(self, n: int, step: Callable[[int, int], np.ndarray]) -> list[np.ndarray]:
        """``step(lo, hi)`` over ``[0, n)`` in batches of at most ``batch_size``; on a CUDA out-of-memory error the
        batch is halved and the same rows retried (down to 1, then the error propagates); later batches keep the
        smaller size. Logged once (a warning) per :class:`_Halving`."""
        rows: list[np.ndarray] = []
        lo = 0
        while lo < n:
            hi = min(lo + self.batch_size, n)
            try:
                rows.append(step(lo, hi))
            except torch.cuda.OutOfMemoryError:
                if hi - lo == 1:
                    raise
                smaller = (hi - lo) // 2
                if not self.warned:
                    log.warning("FT gradients: out of memory on a batch of %d images; retrying it with %d (and "
                                "halving again if needed)", hi - lo, smaller)
                    self.warned = True
                self.batch_size = smaller
            else:
                lo = hi
                continue
            if torch.cuda.is_available():  # outside the except block: the error's frames no longer hold the tensors
                torch.cuda.empty_cache()
        return rows


def _is_vmap_fallback_filter(f: tuple) -> bool:
    return f[0] == "ignore" and f[1] is not None and f[1].pattern == _VMAP_FALLBACK


def _ignore_vmap_fallback(ignore: bool) -> None:
    if ignore:
        warnings.filterwarnings("ignore", message=_VMAP_FALLBACK)
        return
    warnings.filters[:] = [f for f in warnings.filters if not _is_vmap_fallback_filter(f)]
    mutated = getattr(warnings, "_filters_mutated", None)  # what catch_warnings calls: resets the registries
    if mutated is not None:
        mutated()


_VMAP_WARNING = ProcessSetting("the vmap fallback warning's filter",
                               lambda: any(map(_is_vmap_fallback_filter, warnings.filters)), _ignore_vmap_fallback)


@contextlib.contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    """torch's warning that vmap falls back to a loop for an op without a batching rule, hidden for the call.

    The filter is process-wide, so concurrent calls hold it together (:class:`~skmm._process_setting.ProcessSetting`):
    a per-call ``warnings.catch_warnings()`` is not thread-safe, and with two calls overlapping, the first out
    dropped the second's filter and the second out left the first's in place for good. Only this filter is added
    and taken away; the others are left as they are.
    """
    with _VMAP_WARNING.hold(True):
        yield


def _padded_rows(rows: int, batch_size: int, device: torch.device) -> int:
    """The rows a batch of ``rows`` is zero-padded to: ``batch_size`` off CUDA (one shape for every pass, so a
    row's bits do not depend on its batch); on CUDA, where the batch may be 1 024,
    the smallest power of two ≥ ``rows`` up to ``batch_size`` (a shard's short last batch costs under twice its
    rows, not a whole batch)."""
    if device.type != "cuda" or rows >= batch_size:
        return batch_size
    return min(batch_size, 1 << (rows - 1).bit_length())


def _ft_decode_workers(requested: int | None, total: int, batch_size: int, device: torch.device) -> int:
    """Decode processes for the stage: ``requested``, or by default none on the CPU (the gradients keep every core
    busy: a decode worker made the stage 0.79–0.88× as fast, bench/README.md §5) and the embed stage's rule on
    CUDA (cores − 1, none when the images fit one batch or ``$SKMM_DECODE_WORKERS=0``); none where the process
    may not fork."""
    from skmm.models.clip import _decode_workers

    if requested is None and device.type == "cpu":
        return 0
    return _decode_workers(requested, total, batch_size, device)


def _decode_plan(requested: int | None, total: int, batch_size: int, device: torch.device) -> tuple[int, bool]:
    """``(workers, threads)``: :func:`_ft_decode_workers` processes, or where the process may not fork, as many
    decode threads on CUDA (:func:`skmm.models.clip._decode_threads`)."""
    from skmm.models.clip import _decode_threads

    workers = _ft_decode_workers(requested, total, batch_size, device)
    if workers:
        return workers, False
    threads = _decode_threads(requested, total, batch_size, device)
    return threads, bool(threads)


def _decoded_batches(images: Sequence[Any], batch_size: int, preprocess: Any, workers: int,
                     pin: bool = False, threads: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, pixels)`` for consecutive batches of ``batch_size`` images, decoded in this thread or by
    ``workers`` processes, or threads when ``threads`` (the embed stage's decode jobs, regrouped; page-locked
    when ``pin``)."""
    if not workers:
        for lo in range(0, len(images), batch_size):
            yield lo, decode_images(images[lo:lo + batch_size], preprocess, lo)
        return
    from skmm.models.clip import MAX_PIXELS, _parallel_blocks

    batches = _parallel_blocks(images, batch_size, preprocess, MAX_PIXELS, workers, pin=pin, threads=threads)
    lo = 0
    try:
        for pixels in batches:
            yield lo, pixels
            lo += len(pixels)
    finally:
        batches.close()


def ft_gradient_sketch(
    images: Sequence[bytes],
    sample_ids: Sequence[str],
    spec: Any,
    *,
    k: int = 1,
    num_classes: int,
    sketch_dim: int | None,
    seed: int = 0,
    batch_size: int | None = None,
    device: Any = None,
    projector_kind: str = "sjlt",
    decode_workers: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Sketched per-sample FT gradients of a pool: ``(G̃ (N, m) float32, producer)``, rows in input order.

    ``images``: encoded images (PNG/JPEG bytes); ``sample_ids``: one key per image (the content-hash ids).
    Sample i's pseudo-label is ``pseudo_labels([sample_ids[i]], num_classes, seed)``; its row is the
    cross-entropy gradient of ``build_ft_model(spec, num_classes, seed)`` w.r.t. :func:`ft_parameter_names`
    (r entries), projected by ``make_projector(projector_kind, r, sketch_dim, seed)``: one projector for the
    whole pool. A row depends only on the image, its id and the arguments: on the CPU at one batch size bitwise,
    whatever the order, the shard or the rows beside it (every batch is zero-padded to ``batch_size``); across
    batch sizes, and on CUDA (:func:`_padded_rows`), to float32 rounding.
    ``sketch_dim=None`` or ``>= r`` returns the unsketched gradients (N, r) with ``producer["sketch"] = None``.
    ``projector_kind`` defaults to "sjlt" (sparse JL: same guarantee, O(r) per sample, Γ drawn once and cached):
    the dense "gaussian"/"rademacher" sketches regenerate all r×m entries of Γ on the CPU for every batch
    (ViT-B/32, k=1: r ≈ 7.5M, so 3.8G normals per batch at m=512: minutes per batch), fine only for small r.
    The producer records everything that determines the rows; store it with them.
    ``batch_size=None``: :func:`ft_batch_size` (32 on the CPU, sized to the device's memory on CUDA); a CUDA
    out-of-memory error halves the batch and retries it. ``decode_workers``: processes that decode while the
    gradients are computed (``None``: cores − 1 on CUDA, none on the CPU; ``0``: in the calling thread).
    Neither the batch, the device nor the decode workers are in the producer.
    """
    from skmm._cuda_math import ieee_fp32
    from skmm.mkl_reproducibility import ensure_reproducible_mkl
    from skmm.models.clip import ClipSpec, resolve_device
    from skmm.sketch import make_projector

    ensure_reproducible_mkl()  # a row's gradients independent of its place in a batch
    if isinstance(spec, dict):
        spec = ClipSpec.from_dict(spec)
    if not isinstance(spec, ClipSpec):
        raise TypeError(f"spec must be a ClipSpec or its dict; got {type(spec).__name__}")
    images = _check_images(images)
    if isinstance(sample_ids, str):
        raise TypeError("sample_ids must be a sequence of ids, not a single string")
    ids = list(sample_ids)
    if not images:
        raise ValueError("images is empty: there is no sample to compute gradients for")
    if len(ids) != len(images):
        raise ValueError(f"sample_ids must name every image: {len(ids)} ids for {len(images)} images")
    C = _check_num_classes(num_classes)
    seed = _check_seed(seed)
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    check_worker_count(decode_workers, "decode_workers")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a positive integer; got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1 (the number of last blocks to train); got {k}")
    if projector_kind not in PROJECTOR_KINDS:
        raise ValueError(f"projector_kind must be one of {PROJECTOR_KINDS}; got {projector_kind!r}")
    if sketch_dim is not None:
        sketch_dim = check_positive_int(sketch_dim, "sketch_dim")
    labels = torch.from_numpy(pseudo_labels(ids, C, seed))

    dev = resolve_device(device)
    model, preprocess = build_ft_model(spec, C, seed, dev)
    names = ft_parameter_names(model, k)
    r = gradient_dim(model, names)
    projector = None
    if sketch_dim is not None and sketch_dim < r:
        # SJLT's whole Γ (r bucket indices and signs, 12 bytes per coordinate) fits the per-device block cache
        # up to r ≈ 90M, so it is drawn once per pool instead of once per batch.
        extra = {"cache_bytes": min(max(256 * 2**20, 12 * r + 2**20), 1 << 30)} if projector_kind == "sjlt" else {}
        projector = make_projector(projector_kind, r, sketch_dim, seed, **extra)
    if batch_size is None:
        cache = getattr(projector, "cache_bytes", 0) if projector is not None else 0
        if projector_kind == "sjlt" and projector is not None and dev.type == "cuda":
            from skmm.sketch.sjlt import DENSE_CHUNK_BYTES

            cache += DENSE_CHUNK_BYTES  # the chunk of dense Γ the CUDA sketch multiplies by
        batch_size = ft_batch_size(dev, r, sketch_dim if projector is not None else None,
                                   activation_bytes=ft_activation_bytes(model, int(k)), fixed_bytes=cache)
        log.info("FT gradients: batch size %d on %s (r = %d)", batch_size, dev, r)
    suffix = _Suffix(model, int(k))

    def step(pixels: torch.Tensor, lo: int, hi: int) -> np.ndarray:
        # Zero-padded (_padded_rows): every pass has one shape, so a row's bits do not depend on how many rows
        # share its batch (a shard's last one), nor on its shard or place.
        pixels = pixels.to(dev, non_blocking=True)
        y = labels[lo:hi]
        pad = _padded_rows(hi - lo, halving.batch_size, dev) - (hi - lo)
        if pad > 0:
            pixels = torch.cat([pixels, pixels.new_zeros((pad, *pixels.shape[1:]))])
            y = torch.cat([y, y.new_zeros(pad)])
        with torch.no_grad():
            tokens = model.prefix(pixels, int(k))
        grads = per_sample_gradients(suffix, tokens, y, names)
        out = projector.project(grads) if projector is not None else grads
        return out[:hi - lo].detach().float().cpu().numpy()

    halving = _Halving(batch_size)
    rows: list[np.ndarray] = []
    workers, threads = _decode_plan(decode_workers, len(images), batch_size, dev)
    batches = _decoded_batches(images, batch_size, preprocess, workers, pin=dev.type == "cuda", threads=threads)
    try:
        with ieee_fp32(dev), _quiet_vmap_fallback():
            for lo, pixels in batches:
                rows.extend(halving.rows(len(pixels), lambda a, b, p=pixels, o=lo: step(p[a:b], o + a, o + b)))
    finally:
        batches.close()  # stops the decode workers early when a batch failed
    producer = {
        "mode": "ft",
        "model": spec.to_dict(),
        "k": int(k),
        "params": names,
        "r": int(r),
        "num_classes": C,
        "pseudo_label_seed": seed,
        "head": {"init": HEAD_INIT, "seed": seed, "features": FEATURES},
        "loss": "cross_entropy",
        "sketch": projector.spec.to_dict() if projector is not None else None,
    }
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32), producer
