"""Image features from open_clip: the logic behind the pipeline's "embed" stage (no Prefect here).

    spec = ClipSpec("ViT-B-32", pretrained="laion2b_s34b_b79k")          # a tag: needs network or a local cache
    spec = ClipSpec("ViT-B-32", pretrained="/models/vit-b-32.safetensors")  # a local weights file
    spec = ClipSpec("ViT-S-32", init_seed=0)                                 # random init, reproducible
    X = embed_images(png_bytes_list, spec)                                   # (N, embed_dim) float32, unit rows

A :class:`ClipSpec` names everything that determines the features; store ``spec.to_dict()`` (and ``digest``)
next to every vector table. ``open_clip`` (~4 s to import) and ``torch`` are imported on first use only, so that
flows can build and compare specs cheaply.

Decisions:

- **Never a 50-second retry loop.** A pretrained *tag* is first looked up in the local caches (Hugging Face hub
  cache, ``~/.cache/clip``) without any network call. If it is not cached and ``HF_HUB_OFFLINE`` (or
  ``TRANSFORMERS_OFFLINE``) is set, :func:`load_clip` raises at once. If it is not set, we do *not* flip the
  variable (huggingface_hub reads it once, at import, so setting it inside a call would not work, and it would
  change the process for everyone else); instead one TCP connection to the download host is tried with a 3 s
  limit (skipped behind an ``HTTPS_PROXY``) and an unreachable host fails at once with the same clear error.
  Downloads happen only when the host answers.
- **Random init is reproducible and private**: the towers are built on the CPU under ``torch.random.fork_rng``
  with the CPU generator seeded to ``init_seed`` (CUDA's generators untouched), so the caller's global RNG is
  left as it was. That generator is process-wide, so builds take a lock, and nothing else in skmm draws from it
  (heads come from generators of their own, ``skip_init``): a draw from another thread during a build would
  change the tower. Code of your own that draws from torch's global generator in threads beside skmm's stages
  breaks that guarantee.
- Weights always load strictly; a mismatch names the first missing/unexpected/mis-shaped keys. Tags whose
  weights were trained with QuickGELU (``openai``) get the matching activation, as open_clip's ``-quickgelu``
  model names do (plain open_clip only warns and then computes different features).
- **Precision** (``ClipSpec.precision``): ``"fp32"`` (the default) means IEEE fp32 on CUDA too (TF32 is
  switched off for the duration of a call and restored after), so CPU and GPU features agree to float32
  round-off (3e-5 measured), not bitwise. ``"tf32"`` lets CUDA's matmuls and convolutions use TF32 tensor cores
  (faster; inputs rounded to a 10-bit mantissa); it is refused on other devices, where it would compute fp32
  features under another name. ``"bf16"`` encodes under ``torch.autocast(dtype=bfloat16)`` (CUDA or CPU). Both
  are part of the spec (its dict and digest), so their features are never mixed with fp32 ones. The switches
  are process-wide: concurrent calls that want the same ones hold them together, a call that wants others
  waits until they have left, and the last one out restores the process's (``skmm._process_setting``).
- **Block size per device** (``ClipSpec.block_rows``): the fixed block (below) is 64 images by default, the CPU's
  figure; :func:`default_block_rows` gives a device's (512 on a CUDA device with 16 GiB or more, 256 on smaller
  ones). The block size is part of the spec too: the dict carries it when it is not 64 (so the default spec,
  its digest and every table written before are unchanged), since another shape may round differently.
- **Decoding overlaps encoding.** :func:`embed_images` decodes and preprocesses in ``decode_workers`` forked
  worker processes (default: cores − 1, at least 1; serial for a single block), in jobs of at most 64 images
  (``DECODE_JOB_ROWS``), so block k is encoded while later images are decoded. Each worker runs torch with 1
  thread (the parent's encode threads are unchanged); the jobs come back through shared memory, in order, and
  are regrouped into blocks (on a CUDA device by one copy into page-locked memory, then copied asynchronously).
  Small jobs keep the shared memory in flight small: 512-image CUDA blocks as jobs would hold ~0.3 GB each.
  The block composition is the serial path's, and the preprocessing is the
  same code, so the features are bitwise those of ``decode_workers=0``. Measured on the 2-core CPU (ViT-S-32,
  ~56 KB JPEGs): see bench/README.md §8. Where a process may not fork children (a daemonic process, e.g. a Dask
  worker by Dask's default, not the pipeline's; or no ``fork`` start method) decoding runs in the calling thread
  on the CPU, and in as many threads where a device encodes (:func:`_decode_threads`). ``$SKMM_DECODE_WORKERS``
  sets the default (e.g. for the flow's tasks). The default decode workers are one pool per process, shared by its
  concurrent calls with the same preprocessing and kept :data:`SHARED_POOL_LINGER_S` seconds after the last
  (:func:`_shared_pool`), so a shard's call forks none; ``decode_workers=k`` forks k for the call alone. A
  multiprocessing child stops its shared pools when it ends (:func:`_shut_down_at_exit`; it waited on their
  workers for ever), and a forked child starts without its parent's, and with new locks
  (:func:`_forget_parents_pools`).
- **On the CPU, one block worker per core.** There the caller's encode threads already keep the cores busy, so
  decode workers have no idle core to use (bench/README.md §8). By default a CPU call instead forks one *block
  worker* per torch thread it would use (``encode_workers``; ``$SKMM_ENCODE_WORKERS``): each decodes and
  encodes whole blocks with one torch thread, so one core decodes while another encodes, and no core waits on
  the others' share of a parallel region. The model is inherited by the fork (weights shared, not copied).
  Each worker holds one block's activations, so by default no more workers start than fit in half the memory
  still available (a conservative estimate per tower, :func:`_block_worker_bytes`). The blocks and their
  shapes are the same, and the thread count changes no bit, so the features are bitwise those of the other
  paths. By default a process has one pool of block workers, shared by its concurrent calls of one model (the
  flow's shard tasks run in threads): their blocks interleave in it, so one call's last blocks do not leave
  cores idle, and the pool outlives a call by :data:`SHARED_POOL_LINGER_S` seconds, so the next shard's call
  forks nothing. Before, a concurrent call took the decode workers' path beside them and oversubscribed the
  cores (bench/README.md §13, "A bounded window of shard tasks"). Off where decode workers are off, for a
  single block, for one thread, and when the caller chose ``decode_workers``.
- **Bitwise batch invariance.** On one machine and build, an image's features are the same bits whatever the
  batch size, shard split, row order or thread count: :func:`embed_images` encodes in blocks of exactly
  ``BLOCK_ROWS`` images (the last one zero-padded, pad rows dropped). Why: MKL's sgemm picks its kernel, hence
  its summation order, from the matrix shape (measured: a 384×384 product with 1–3, 5–7 or 9 rows rounds those
  rows differently than a 64-row product), so a shard's short last batch changed the last bits of its rows.
  With one shape, every block runs the same kernels; no layer mixes images, so pad rows and neighbours change
  nothing, given MKL's reproducible mode (``MKL_CBWR``, set when skmm is imported: without it, on an AVX2-only
  AMD EPYC some shapes rounded a row by its place in the block; :mod:`skmm.mkl_reproducibility`). Padding the
  caller's batches instead fixes shard counts but not batch sizes; ``torch.use_deterministic_algorithms`` and
  oneDNN off change nothing on the CPU. On CUDA the fixed shape should make cuBLAS bitwise too (it is
  deterministic per shape and GPU); not yet checked on a GPU. Cost: the last block's pad rows only (under 64
  images a call, none for a 2 048-row shard): ViT-S-32 on the 2-core CPU ran 0.87–1.05× as fast as before on
  500 images (``bench/embed_batch_invariance.py``; noise of a shared machine), but a call with a few images pays
  for a whole block.
- Images are decoded with Pillow and converted to 8-bit RGB by one rule (:func:`_to_rgb`): 16-bit samples keep
  their high byte (``v >> 8``, as Pillow itself reads 16-bit RGB(A) PNGs), 32-bit integer (``I``) samples are
  taken as 16-bit (clipped to 0–65 535, then ``>> 8``), floats (``F``) as 0.0–1.0 intensities (× 255, rounded,
  clipped; NaN → 0), alpha is dropped (as open_clip's own ``convert("RGB")`` does: LA, PA, RGBA, P with
  transparency), and every other mode (1, L, P, RGB, CMYK, YCbCr, ...) goes through Pillow's ``convert("RGB")``
  as before. So an 8-bit picture and its 16-bit, 32-bit or float rendering embed the same; before, Pillow
  clipped I;16 / I / F to 255 (white). EXIF orientation is *not* applied (as in open_clip's own pipelines),
  so the bytes alone determine the features. An image above ``max_pixels`` (width × height; Pillow's
  default limit, 89 478 485) is refused with an error naming the sample (its sha256, the sample id).
- :func:`embed_images` keeps the last two loaded models in memory (keyed by spec, device and the weights file's
  size and mtime), so embedding shard after shard does not rebuild the model.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import itertools
import json
import logging
import os
import pathlib
import re
import sys
import threading
import urllib.parse
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from skmm._cuda_math import cuda_math
from skmm._process_setting import ProcessSetting
from skmm._validation import check_worker_count
from skmm.canonical_json import canonical_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CONFIGS_DIR",
    "MAX_PIXELS",
    "TINY_MODEL",
    "ClipSpec",
    "available_cores",
    "check_model_name",
    "check_precision",
    "clear_model_cache",
    "default_block_rows",
    "default_decode_workers",
    "default_encode_workers",
    "embed_images",
    "embed_shards",
    "load_clip",
    "resolve_device",
    "shutdown_worker_pools",
]

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / "configs"
TINY_MODEL = "skmm-tiny-vit"
PRECISIONS = ("fp32", "tf32", "bf16")
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# open_clip's preference order for the checkpoint inside a local-dir export.
DIR_CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                   "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                   "pytorch_model.bin", "pytorch_model.pth", "model.pth")
PROBE_TIMEOUT_S = 3.0
# Images per forward pass, whatever the caller's batch size (see embed_images): the former default batch, so
# memory and speed stay as measured (blocks of 32 were no faster for ViT-S-32 on the CPU, slower for the tiny
# tower).
BLOCK_ROWS = 64
# CUDA blocks (default_block_rows): larger blocks keep the device busy; the smaller figure for small cards.
CUDA_BLOCK_ROWS = 512
SMALL_CUDA_BLOCK_ROWS = 256
SMALL_CUDA_BYTES = 16 * 2**30
MAX_BLOCK_ROWS = 1 << 16
# Images per decode job, whatever the block: the jobs in flight (workers + 1) sit in shared memory, 38 MB each at
# 224 px, where 512-image CUDA blocks as jobs would take 0.3 GB each.
DECODE_JOB_ROWS = 64
DECODE_WORKERS_ENV = "SKMM_DECODE_WORKERS"
ENCODE_WORKERS_ENV = "SKMM_ENCODE_WORKERS"
# The largest image decoded (width × height): Pillow's default decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS.
MAX_PIXELS = 89_478_485
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines the image features: the embedding producer's identity.

    ``model``: an open_clip model name (``open_clip.list_models()``) or ``"skmm-tiny-vit"`` (our registered tiny
    config). ``pretrained``: ``None`` (random init seeded by ``init_seed``), a tag (``"laion2b_s34b_b79k"``,
    ``"openai"``), a local weights file (``.safetensors``/``.bin``/``.pt``), or ``"local-dir:/dir"`` (an open_clip
    export: ``open_clip_config.json`` + weights; its config defines the architecture and ``model`` must agree
    with it when it is a registered name). ``ClipSpec("local-dir:/dir")`` is normalised to that form with
    ``model="local-dir"``. ``init_seed`` matters only for random init. ``image_size`` is the square input size;
    ``None`` is filled from the model's config when it can be read without importing open_clip, and a size that
    differs from the model's own resizes the position embeddings (open_clip's ``force_image_size``).
    ``weights_sha256`` (optional; see :meth:`with_weights_digest`) pins a local weights file by content: loading
    checks it, and the digest then uses it instead of the path, so moving the file keeps the identity.
    ``precision``: ``"fp32"`` (IEEE, the default), ``"tf32"`` (CUDA only) or ``"bf16"`` (autocast).
    ``block_rows``: the images per forward pass (:data:`BLOCK_ROWS` by default; :func:`default_block_rows`
    gives a device's); the dict names it only when it is not the default.
    """

    model: str
    pretrained: str | None = None
    init_seed: int = 0
    image_size: int | None = None
    precision: str = "fp32"
    weights_sha256: str | None = None
    block_rows: int = BLOCK_ROWS

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"ClipSpec model must be a non-empty open_clip model name; got {self.model!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained.strip()):
            raise ValueError(f"ClipSpec pretrained must be None or a non-empty string; got {self.pretrained!r}")
        if self.model.startswith(LOCAL_DIR):
            if self.pretrained is not None:
                raise ValueError(f"ClipSpec: model {self.model!r} already names its weights; pretrained must be None")
            object.__setattr__(self, "pretrained", self.model)
            object.__setattr__(self, "model", "local-dir")
        if self.pretrained is not None and self.pretrained.startswith(HF_HUB):
            raise ValueError(f"ClipSpec: pass a hub model as model={self.pretrained!r}, with pretrained=None")
        if self.model.startswith(HF_HUB) and self.pretrained is not None:
            raise ValueError(f"ClipSpec: model {self.model!r} already names its weights; pretrained must be None")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise ValueError(f"ClipSpec init_seed must be a non-negative integer; got {self.init_seed!r}")
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0
        ):
            raise ValueError(f"ClipSpec image_size must be None or a positive integer; got {self.image_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"ClipSpec precision must be one of {PRECISIONS}; got {self.precision!r}")
        if (isinstance(self.block_rows, bool) or not isinstance(self.block_rows, int)
                or not 0 < self.block_rows <= MAX_BLOCK_ROWS):
            raise ValueError(f"ClipSpec block_rows must be an integer in 1..{MAX_BLOCK_ROWS}; got {self.block_rows!r}")
        if self.weights_sha256 is not None:
            if not isinstance(self.weights_sha256, str) or not _SHA256.fullmatch(self.weights_sha256):
                raise ValueError(
                    f"ClipSpec weights_sha256 must be 64 lowercase hex digits; got {self.weights_sha256!r}"
                )
            if _pretrained_kind(self.pretrained) not in ("file", "local-dir"):
                raise ValueError("ClipSpec weights_sha256 applies only to a local weights file or a local-dir")
        if self.image_size is None:
            object.__setattr__(self, "image_size", _native_image_size(self.model, self.pretrained))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (round-trips through :meth:`from_dict`). ``block_rows`` appears only when it is not
        :data:`BLOCK_ROWS`: the default spec's dict (and digest, and the tables that carry it) predate it."""
        data = asdict(self)
        if data["block_rows"] == BLOCK_ROWS:
            del data["block_rows"]
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {"model", "pretrained", "init_seed", "image_size", "precision", "weights_sha256", "block_rows"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown ClipSpec field(s): {sorted(extra)}")
        return cls(**data)

    @property
    def digest(self) -> str:
        """sha256 of what determines the features: ``init_seed`` counts only for random init, and a pinned
        ``weights_sha256`` stands in for the weights' path."""
        ident = self.to_dict()
        if self.pretrained is not None:
            ident["init_seed"] = None
        if self.weights_sha256 is not None:
            ident["pretrained"] = f"sha256:{self.weights_sha256}"
        del ident["weights_sha256"]  # block_rows, when present, stays: another block shape, other bits
        return hashlib.sha256(canonical_json(ident).encode()).hexdigest()

    def with_weights_digest(self) -> ClipSpec:
        """A copy with ``weights_sha256`` set from the local weights file's bytes (reads the whole file)."""
        kind = _pretrained_kind(self.pretrained)
        if kind not in ("file", "local-dir"):
            raise ValueError(
                f"with_weights_digest needs a local weights file or local-dir; pretrained={self.pretrained!r}"
            )
        return replace(self, weights_sha256=_sha256_file(_local_weights_path(self)))


def _pretrained_kind(pretrained: str | None) -> str:
    """'random', 'local-dir', 'file' (looks like a path) or 'tag'."""
    if pretrained is None:
        return "random"
    if pretrained.startswith(LOCAL_DIR):
        return "local-dir"
    p = pretrained
    if os.sep in p or "/" in p or p.startswith(("~", ".")) or p.lower().endswith(WEIGHT_SUFFIXES):
        return "file"
    return "tag"


def _local_dir(pretrained: str) -> pathlib.Path:
    return pathlib.Path(pretrained[len(LOCAL_DIR):]).expanduser()


def _local_weights_path(spec: ClipSpec) -> pathlib.Path:
    """The weights file a 'file' or 'local-dir' spec loads; ValueError when it does not exist."""
    assert spec.pretrained is not None
    if _pretrained_kind(spec.pretrained) == "local-dir":
        directory = _local_dir(spec.pretrained)
        if not directory.is_dir():
            raise ValueError(f"local-dir weights directory not found: {directory}")
        for name in DIR_CHECKPOINTS:
            if (directory / name).is_file():
                return directory / name
        found = sorted(p for s in WEIGHT_SUFFIXES for p in directory.glob(f"*{s}"))
        if not found:
            raise ValueError(f"no weights file (*.safetensors, *.bin, *.pth) in local-dir {directory}")
        return found[0]
    path = pathlib.Path(spec.pretrained).expanduser()
    if path.is_dir():
        raise ValueError(
            f"weights path {path} is a directory; for an open_clip export use pretrained='local-dir:{path}'"
        )
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    return path


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _square(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    return None


def _native_image_size(model: str, pretrained: str | None) -> int | None:
    """The model config's image size, read from JSON without importing open_clip; None if not found."""
    try:
        if pretrained is not None and pretrained.startswith(LOCAL_DIR):
            cfg = json.loads((_local_dir(pretrained) / "open_clip_config.json").read_text())["model_cfg"]
        elif "open_clip" in sys.modules:
            _open_clip()  # make sure our configs are registered
            cfg = sys.modules["open_clip"].get_model_config(model.replace("/", "-"))
        else:
            cfg = None
            path = CONFIGS_DIR / f"{model}.json"
            if not path.is_file():
                import importlib.util

                found = importlib.util.find_spec("open_clip")
                roots = list(found.submodule_search_locations or []) if found else []
                path = pathlib.Path(roots[0]) / "model_configs" / f"{model.replace('/', '-')}.json" if roots else path
            if path.is_file():
                cfg = json.loads(path.read_text())
        return _square(cfg["vision_cfg"]["image_size"]) if cfg else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ loading

_REGISTER_LOCK = threading.Lock()
_SEEDED_BUILD_LOCK = threading.Lock()  # see load_clip: seeded random init uses the process-wide RNG
_REGISTERED = False


def _open_clip():
    """Import open_clip (lazily: ~4 s) and register our configs directory once."""
    global _REGISTERED
    import open_clip

    if not _REGISTERED:
        with _REGISTER_LOCK:
            if not _REGISTERED:
                open_clip.add_model_config(CONFIGS_DIR)
                _REGISTERED = True
    return open_clip


def resolve_device(device: Any = None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_block_rows(device: Any = None) -> int:
    """The fixed block size for ``device`` (``None``: as :func:`resolve_device`): :data:`BLOCK_ROWS` (64) on the
    CPU and other devices, 512 on a CUDA device with 16 GiB or more, 256 on a smaller one."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return BLOCK_ROWS
    import torch

    total = torch.cuda.get_device_properties(dev if dev.index is not None else torch.cuda.current_device()).total_memory
    return CUDA_BLOCK_ROWS if total >= SMALL_CUDA_BYTES else SMALL_CUDA_BLOCK_ROWS


def check_precision(precision: str, device: Any = None) -> None:
    """ValueError unless ``precision`` is known and can run on ``device`` (``"tf32"`` needs CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision != "tf32":
        return
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"precision 'tf32' needs a CUDA device (TF32 is a tensor-core mode), not {dev.type!r}: "
                         "on this device it would compute fp32 features under another name; use 'fp32' (the "
                         "default) or 'bf16'")


def available_cores() -> int:
    """The cores this process may use (its CPU affinity; the machine's count where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _env_count(name: str) -> int | None:
    """The non-negative integer in environment variable ``name``; None when it is unset or blank."""
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    if not env.isdigit():
        raise ValueError(f"{name} must be a non-negative integer; got {env!r}")
    return int(env)


def default_decode_workers() -> int:
    """Decode worker processes by default: ``$SKMM_DECODE_WORKERS`` when set (0: decode in the calling thread),
    else the cores this process may use, less one for encoding (at least 1)."""
    env = _env_count(DECODE_WORKERS_ENV)
    return max(available_cores() - 1, 1) if env is None else env


def default_encode_workers(threads: int) -> int:
    """Block worker processes by default on the CPU: ``$SKMM_ENCODE_WORKERS`` when set (0: off), else one per
    torch thread the call would use (``threads``), none for a single thread."""
    env = _env_count(ENCODE_WORKERS_ENV)
    return (threads if threads >= 2 else 0) if env is None else env


def _check_model_name(open_clip, name: str) -> None:
    if name.startswith(HF_HUB) or open_clip.get_model_config(name.replace("/", "-")) is not None:
        return
    names = open_clip.list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    examples = [n for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-S-32", TINY_MODEL) if n in names]
    raise ValueError(
        f"unknown open_clip model {name!r}; {hint}valid names include {', '.join(examples)} "
        f"({len(names)} in open_clip.list_models())"
    )


def check_model_name(name: str) -> None:
    """Fail fast on a model name open_clip does not know, with the same ValueError as loading would raise.

    The common case costs no open_clip import (~4 s): a name found among open_clip's bundled configs or ours
    passes at once. Anything else (including names registered at run time with ``open_clip.add_model_config``)
    goes to the full check, which imports open_clip and suggests close names."""
    if name == "local-dir" or name.startswith((LOCAL_DIR, HF_HUB)):  # resolved (and checked) when loaded
        return
    if "open_clip" not in sys.modules:
        import importlib.util

        known = {p.stem for p in CONFIGS_DIR.glob("*.json")}
        spec = importlib.util.find_spec("open_clip")
        for location in (spec.submodule_search_locations or []) if spec else []:
            known |= {p.stem for p in pathlib.Path(location, "model_configs").glob("*.json")}
        if name.replace("/", "-") in known:
            return
    _check_model_name(_open_clip(), name)


def _hub_offline() -> bool:
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    if env in {"1", "ON", "YES", "TRUE"}:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect (DNS included) bounded by ``timeout`` seconds; True behind an HTTPS proxy (not probed)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket

    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _hub_cached(repo: str) -> bool:
    """Whether an hf-hub model's config is in the local Hugging Face cache (no network call)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id=repo, filename="open_clip_config.json"), str)
    except Exception:  # malformed repo ids and the like: let open_clip report them
        return False


def _offline_error(spec: ClipSpec, why: str) -> ValueError:
    if spec.model.startswith(HF_HUB):
        what = f"hub model {spec.model!r}"
    else:
        what = f"pretrained tag {spec.pretrained!r} for model {spec.model!r}"
    return ValueError(
        f"{what} cannot be loaded: {why}; tags and hub models need network access or a local cache (download "
        "once where there is network, then set HF_HUB_OFFLINE=1), or pass a local weights file: "
        "pretrained='/path/to/weights.safetensors' or 'local-dir:/dir'"
    )


def _cached_tag_file(open_clip, tag_cfg: dict) -> str | None:
    """The locally cached weights for a tag's config, found without any network call."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(tag_cfg["hf_hub"])
            filename = filename or "open_clip_pytorch_model.bin"
            candidates = [filename]
            if filename == "open_clip_pytorch_model.bin":
                candidates.insert(0, "open_clip_model.safetensors")
            elif filename.endswith((".bin", ".pth")):
                candidates.insert(0, filename[:-4] + ".safetensors")
            for name in candidates:
                hit = try_to_load_from_cache(repo_id=repo, filename=name)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    if tag_cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _tag_weights(open_clip, spec: ClipSpec, tag_cfg: dict) -> str:
    """A tag's weights file: from the cache, or downloaded when the network is there; fails fast otherwise."""
    cached = _cached_tag_file(open_clip, tag_cfg)
    if cached:
        return cached
    if _hub_offline():
        raise _offline_error(spec, "it is not in the local cache and HF_HUB_OFFLINE is set")
    if tag_cfg.get("hf_hub"):
        host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    else:
        host = urllib.parse.urlparse(tag_cfg.get("url", "")).hostname
    if not host or not _reachable(host):
        raise _offline_error(spec, f"it is not in the local cache and {host or 'its host'} cannot be reached")
    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as e:  # network errors come in many types
        raise ValueError(f"could not download weights for tag {spec.pretrained!r} of {spec.model!r}: {e}") from e


def _first(keys: Iterable[str], k: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:k]) + (f" (+{len(keys) - k} more)" if len(keys) > k else "")


def _load_weights(open_clip, model, path: pathlib.Path, name: str) -> None:
    """Strictly load ``path`` into ``model``; one-line ValueErrors for unreadable or mismatched weights."""
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
        return
    except Exception as e:
        error = e
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as e:
        raise ValueError(f"could not read weights at {path}: {type(e).__name__}: {e}") from e
    own = model.state_dict()
    parts = []
    if missing := set(own) - set(state):
        parts.append(f"missing keys {_first(missing)}")
    if unexpected := set(state) - set(own):
        parts.append(f"unexpected keys {_first(unexpected)}")
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(getattr(state[k], "shape", ())))
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model "
                     f"{tuple(own[k].shape)}")
    detail = "; ".join(parts) or str(error).strip().splitlines()[0]
    raise ValueError(f"weights at {path} do not match model {name}: {detail}") from error


class _DropRandomInitWarning(logging.Filter):
    """open_clip logs "No pretrained weights loaded" on the root logger even when we load the weights ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_clip(spec: ClipSpec, device: Any = None):
    """Build the model ``spec`` names, in eval mode on ``device``; returns ``(model, preprocess)``.

    ``preprocess`` is open_clip's evaluation transform (PIL image → CHW float tensor). Every user error (unknown
    model, missing/unreadable/mismatched weights, a tag that cannot be fetched) is a one-line ValueError.
    """
    if not isinstance(spec, ClipSpec):
        raise TypeError(f"load_clip expects a ClipSpec; got {type(spec).__name__}")
    import torch

    dev = resolve_device(device)
    open_clip = _open_clip()
    kind = _pretrained_kind(spec.pretrained)
    kwargs: dict[str, Any] = {"precision": "fp32", "pretrained_image": False, "pretrained_text": False}
    weights: pathlib.Path | None = None
    arch = spec.model

    if kind == "local-dir":
        assert spec.pretrained is not None
        directory = _local_dir(spec.pretrained)
        config = directory / "open_clip_config.json"
        if not config.is_file():
            raise ValueError(f"local-dir {directory}: open_clip_config.json not found (is it an open_clip export?)")
        try:
            model_cfg = json.loads(config.read_text())["model_cfg"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"local-dir {directory}: open_clip_config.json has no valid 'model_cfg' ({e})") from e
        registered = open_clip.get_model_config(spec.model) if spec.model != "local-dir" else None
        if registered is not None and (registered.get("embed_dim"), registered.get("vision_cfg")) != (
            model_cfg.get("embed_dim"), model_cfg.get("vision_cfg")
        ):
            raise ValueError(f"local-dir {directory} holds a different architecture than model {spec.model!r}")
        weights = _local_weights_path(spec)
        arch = f"{LOCAL_DIR}{directory}"
        kwargs["load_weights"] = False  # we load (and diagnose) the weights ourselves
    elif spec.model.startswith(HF_HUB):
        repo = spec.model[len(HF_HUB):]
        host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
        if _hub_offline() and not _hub_cached(repo):
            raise _offline_error(spec, "it is not in the local cache and HF_HUB_OFFLINE is set")
        if not _hub_offline() and not _reachable(host):
            raise _offline_error(spec, f"{host} cannot be reached (with a cached copy, set HF_HUB_OFFLINE=1)")
    else:
        _check_model_name(open_clip, spec.model)
        if kind == "file":
            weights = _local_weights_path(spec)
        elif kind == "tag":
            assert spec.pretrained is not None
            tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
            if not tag_cfg and os.path.isfile(spec.pretrained):  # a bare file name in the working directory
                tag_cfg, weights = {}, pathlib.Path(spec.pretrained)
            elif not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(spec.model)
                raise ValueError(
                    f"pretrained {spec.pretrained!r} is neither a weights file nor a known tag for model "
                    f"{spec.model!r} (tags: {', '.join(tags) if tags else 'none'})"
                )
            if weights is None:
                weights = pathlib.Path(_tag_weights(open_clip, spec, tag_cfg))
            for ours, theirs in (("image_mean", "mean"), ("image_std", "std"),
                                 ("image_interpolation", "interpolation"), ("image_resize_mode", "resize_mode")):
                if tag_cfg.get(theirs) is not None:
                    kwargs[ours] = tag_cfg[theirs]
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))

    if spec.weights_sha256 is not None and weights is not None:
        actual = _sha256_file(weights)
        if actual != spec.weights_sha256:
            raise ValueError(
                f"weights at {weights} have sha256 {actual[:12]}…, the spec pins {spec.weights_sha256[:12]}…"
            )
    native = _native_size_of(open_clip, arch)
    if spec.image_size is not None and spec.image_size != native:
        kwargs["force_image_size"] = spec.image_size

    # Build on the CPU under a private, seeded RNG: reproducible towers, caller's RNG untouched. torch's default
    # generator is process-wide, so seeded builds in concurrent threads (shards embedded in parallel) would
    # interleave their draws: one build at a time, and no other draw from it anywhere in skmm (see the module
    # docstring; tests/skmm/test_clip_ft.py checks the FT path).
    with _SEEDED_BUILD_LOCK, torch.random.fork_rng(devices=[]), _quiet_open_clip():
        # The CPU generator only: the build is on the CPU, and torch.manual_seed would also reseed every CUDA
        # device's generator, which fork_rng(devices=[]) does not restore.
        torch.random.default_generator.manual_seed(spec.init_seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, device="cpu", **kwargs)
        except (RuntimeError, FileNotFoundError, ImportError) as e:
            raise ValueError(f"could not build open_clip model {spec.model!r}: {str(e).strip().splitlines()[0]}") from e
    if weights is not None:
        _load_weights(open_clip, model, weights, spec.model)
    model = model.to(dev).eval()
    return model, preprocess


def _native_size_of(open_clip, arch: str) -> int | None:
    if arch.startswith(LOCAL_DIR):
        return _native_image_size("local-dir", arch)
    if arch.startswith(HF_HUB):
        return None
    cfg = open_clip.get_model_config(arch.replace("/", "-"))
    return _square(cfg["vision_cfg"].get("image_size")) if cfg else None


# ------------------------------------------------------------------------------------------------ embedding

_CACHE: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()
_CACHE_SIZE = 2


def clear_model_cache() -> None:
    """Forget the models :func:`embed_images` keeps between calls (and shut down the idle worker pools holding
    one)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    shutdown_worker_pools()


def _weights_stamp(spec: ClipSpec) -> tuple | None:
    if _pretrained_kind(spec.pretrained) not in ("file", "local-dir"):
        return None
    try:
        path = _local_weights_path(spec)
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except (ValueError, OSError):
        return None


def _device_key(device: torch.device) -> str:
    """``device`` as the model cache keys it: "cuda" is the current CUDA device by its index, so "cuda" and
    "cuda:0" share one tower (and its decode pool) instead of loading two."""
    if device.type == "cuda" and device.index is None:
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _cached_model(spec: ClipSpec, device: torch.device):
    spec = replace(spec, precision="fp32", block_rows=BLOCK_ROWS)  # one tower whatever the precision and block
    key = (spec, _device_key(device), _weights_stamp(spec))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    with _LOAD_LOCK:  # threads missing the cache together load the tower once: it is cached before they look
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        loaded = load_clip(spec, device)
        with _CACHE_LOCK:
            _CACHE[key] = loaded
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return loaded


def _read_threads() -> int:
    import torch

    return torch.get_num_threads()


def _write_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


_THREADS = ProcessSetting("torch's thread count", _read_threads, _write_threads)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads in this thread for the block, then restore its count.

    torch (OpenMP) keeps a count per thread, and ``set_num_threads`` also sets the count that threads started
    later take. This thread's own count is set and restored by the call; that default is held like the other
    process-wide settings (:class:`~skmm._process_setting.ProcessSetting`: the last call out restores it), so
    overlapping calls no longer leave it at one call's count.
    """
    import torch

    if n is None:
        yield
        return
    own = torch.get_num_threads()
    with _THREADS.hold(n):
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(own)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's autocast: bfloat16 for ``"bf16"``, nothing otherwise."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_rgb(im):
    """``im`` as 8-bit RGB by the module's one rule (see the module docstring, "Decisions")."""
    from PIL import Image

    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        levels = np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(levels.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        levels = np.rint(np.clip(values, 0.0, 1.0) * 255.0)
        return Image.fromarray(levels.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:  # via RGBA: same colours, without Pillow's warning
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _too_large(data: Any, index: int, size: tuple[int, int] | None, max_pixels: int) -> ValueError:
    dims = f"{size[0]}×{size[1]} = {size[0] * size[1]} pixels" if size else "over twice Pillow's own pixel limit"
    return ValueError(f"image {index} (sample {hashlib.sha256(data).hexdigest()}) is {dims}, above the limit of "
                      f"{max_pixels} pixels (skmm curate --max-pixels); ingest quarantines such images")


def _check_bytes(data: Any, index: int) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image {index}: expected encoded image bytes, got {type(data).__name__}")


def _decode(data: Any, index: int, preprocess, max_pixels: int = MAX_PIXELS):
    """Encoded image bytes → the preprocessed tensor; ValueError naming the image (and, when it is too large,
    the sample) if it cannot be decoded or has more than ``max_pixels`` pixels (checked before decoding)."""
    from PIL import Image

    _check_bytes(data, index)
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            rgb = _to_rgb(im) if size[0] * size[1] <= max_pixels else None
    except Image.DecompressionBombError:
        raise _too_large(data, index, None, max_pixels) from None
    except Exception as e:  # Pillow raises many types for bad input
        raise ValueError(f"image {index} could not be decoded ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if rgb is None:
        raise _too_large(data, index, size, max_pixels)
    return preprocess(rgb)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _serial_blocks(images: Iterable[Any], rows: int, batch_size: int, preprocess,
                   max_pixels: int) -> Iterator[torch.Tensor]:
    """Decode in the calling thread, ``batch_size`` images at a time; yield stacked blocks of ``rows`` images
    (the last one shorter)."""
    import torch

    pending: list[torch.Tensor] = []  # decoded images waiting for a full block
    index = 0
    for batch in _batches(images, batch_size):
        pending.extend(_decode(b, index + i, preprocess, max_pixels) for i, b in enumerate(batch))
        index += len(batch)
        while len(pending) >= rows:
            yield torch.stack(pending[:rows])
            del pending[:rows]
    if pending:
        yield torch.stack(pending)


_WORKER: dict[str, Any] = {}  # a worker's model, preprocess, pixel limit, … (set by its initializer)
SHARED_POOL_LINGER_S = 10.0  # an unused shared worker pool is shut down after this many seconds


@dataclass(eq=False)
class _SharedPool:
    """Worker processes of one kind ("block": decode + encode; "decode"), shared by this process's concurrent
    calls with the same inputs (``objects``, compared by identity: the model, the preprocessing; ``params`` by
    value): their jobs interleave in one pool (one call's last jobs do not leave cores idle), and no call forks
    its own."""

    kind: str
    objects: tuple
    params: tuple
    workers: int
    executor: Any
    users: int = 0
    timer: threading.Timer | None = None

    def serves(self, objects: tuple, params: tuple) -> bool:
        return all(a is b for a, b in zip(self.objects, objects, strict=True)) and self.params == params

    def stop_lingering(self) -> None:
        """Cancel the shut-down timer started when its last user left, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_SHARED_POOLS: dict[str, _SharedPool] = {}
_SHARED_POOLS_CHANGE = threading.Condition()  # guards _SHARED_POOLS; notified when a pool's last user leaves
_EXIT_HOOK_PID: int | None = None  # the process whose exit shuts its shared pools down (see _shut_down_at_exit)
_INHERITED_POOLS: list[_SharedPool] = []  # a forked child's copies of its parent's pools: kept, never used


def _shut_down_at_exit() -> None:
    """Stop every shared pool of this process and join its workers, whatever their users (the process ends).

    A multiprocessing child ends in ``multiprocessing.util._exit_function``, which joins the child's own children
    and never runs the interpreter shutdown that stops ``concurrent.futures`` pools: a lingering pool's workers
    waited for work for ever, and the child with them. This runs as one of that function's finalizers, before the
    pools' queues are closed (their finalizers' priority is 10). In the main process the interpreter has stopped
    the pools already, and this finds nothing left to do."""
    with _SHARED_POOLS_CHANGE:
        pools = list(_SHARED_POOLS.values())
        _SHARED_POOLS.clear()
    for pool in pools:
        pool.stop_lingering()
        pool.executor.shutdown(wait=True, cancel_futures=True)


def _hook_exit() -> None:
    """Register :func:`_shut_down_at_exit` once per process (a multiprocessing child starts with no finalizers)."""
    global _EXIT_HOOK_PID
    if _EXIT_HOOK_PID != os.getpid():
        import multiprocessing.util

        multiprocessing.util.Finalize(None, _shut_down_at_exit, exitpriority=100)
        _EXIT_HOOK_PID = os.getpid()


def _forget_parents_pools() -> None:
    """In a forked child: start without shared pools, and with new locks.

    The parent's pool objects were copied, not the threads that feed their workers, so a job sent there never ran;
    shutting them down, or letting them be collected, would signal the parent's workers through the pipes both
    share, so they are kept aside, unused. The module's locks are new: another thread of the parent may have held
    one (a tower loading takes seconds) when it forked, and that thread does not exist in the child."""
    global _SHARED_POOLS_CHANGE, _REGISTER_LOCK, _SEEDED_BUILD_LOCK, _CACHE_LOCK, _LOAD_LOCK, _ONE_IMAGE_LOCK
    _INHERITED_POOLS.extend(_SHARED_POOLS.values())
    _SHARED_POOLS.clear()
    _SHARED_POOLS_CHANGE = threading.Condition()
    _REGISTER_LOCK, _SEEDED_BUILD_LOCK, _CACHE_LOCK, _LOAD_LOCK, _ONE_IMAGE_LOCK = (
        threading.Lock(), threading.Lock(), threading.Lock(), threading.Lock(), threading.Lock())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_pools)


@contextlib.contextmanager
def _shared_pool(kind: str, objects: tuple, params: tuple, workers: int, initializer,
                 wait: bool) -> Iterator[_SharedPool | None]:
    """This process's shared pool of ``kind`` for these inputs, started (``workers`` processes, each begun by
    ``initializer(*objects, *params)``) when there is none. While a pool of the kind serves other inputs, a call
    waits until it has no user (``wait``), or gets None (a pool of its own, then). Left running
    :data:`SHARED_POOL_LINGER_S` seconds after its last user (the next shard's call reuses it); a broken pool (a
    killed worker) is dropped."""
    with _SHARED_POOLS_CHANGE:
        while True:
            pool = _SHARED_POOLS.get(kind)
            if pool is not None and _pool_broken(pool.executor):
                _drop_shared_pool(pool)
                continue
            if pool is not None and pool.serves(objects, params):
                break
            if pool is None or pool.users == 0:
                if pool is not None:
                    _drop_shared_pool(pool)
                _hook_exit()
                executor = _process_pool(workers, initializer, (*objects, *params))
                pool = _SHARED_POOLS[kind] = _SharedPool(kind, objects, params, workers, executor)
                break
            if not wait:
                pool = None
                break
            _SHARED_POOLS_CHANGE.wait()  # the pool serves other inputs
        if pool is not None:
            pool.stop_lingering()
            pool.users += 1
    if pool is None:
        yield None
        return
    try:
        yield pool
    finally:
        with _SHARED_POOLS_CHANGE:
            pool.users -= 1
            if pool.users == 0:
                if _pool_broken(pool.executor) or _SHARED_POOLS.get(kind) is not pool:
                    _drop_shared_pool(pool)
                else:
                    pool.timer = threading.Timer(SHARED_POOL_LINGER_S, _linger_ended, (pool,))
                    pool.timer.daemon = True
                    pool.timer.start()
            _SHARED_POOLS_CHANGE.notify_all()


@contextlib.contextmanager
def _call_pool(kind: str, objects: tuple, params: tuple, workers: int, initializer, shared: bool,
               wait: bool) -> Iterator[tuple[Any, int]]:
    """``(executor, workers)`` for one call: this process's shared pool of ``kind`` when ``shared`` and it serves
    these inputs (:func:`_shared_pool`), else ``workers`` processes of the call's own, shut down when it ends."""
    if shared:
        with _shared_pool(kind, objects, params, workers, initializer, wait) as pool:
            if pool is not None:
                yield pool.executor, pool.workers
                return
    with _process_pool(workers, initializer, (*objects, *params)) as executor:
        yield executor, workers


def _pool_broken(executor) -> bool:
    return bool(getattr(executor, "_broken", False))


def _drop_shared_pool(pool: _SharedPool) -> None:
    """Shut ``pool`` down and forget it (call with :data:`_SHARED_POOLS_CHANGE` held)."""
    pool.stop_lingering()
    if _SHARED_POOLS.get(pool.kind) is pool:
        del _SHARED_POOLS[pool.kind]
    pool.executor.shutdown(wait=False, cancel_futures=True)


def shutdown_worker_pools() -> None:
    """Shut this process's idle shared worker pools (block and decode workers) down now: their memory back at
    once, instead of :data:`SHARED_POOL_LINGER_S` seconds after their last call."""
    with _SHARED_POOLS_CHANGE:
        for pool in list(_SHARED_POOLS.values()):
            if pool.users == 0:
                _drop_shared_pool(pool)


def _linger_ended(pool: _SharedPool) -> None:
    with _SHARED_POOLS_CHANGE:
        if pool.users == 0 and pool.timer is not None:
            pool.timer = None
            _drop_shared_pool(pool)


def _init_decode_worker(preprocess, max_pixels: int) -> None:
    """A decode worker's start: one torch thread (the parent's encode threads own the cores)."""
    import torch

    torch.set_num_threads(1)
    _WORKER.update(preprocess=preprocess, max_pixels=max_pixels)


def _decode_block(batch: list[bytes], start: int) -> torch.Tensor:
    """One block decoded in a worker: its images stacked (sent back through shared memory)."""
    return _decode_stack(batch, start, _WORKER["preprocess"], _WORKER["max_pixels"])


def _decode_stack(batch: list[bytes], start: int, preprocess, max_pixels: int) -> torch.Tensor:
    """``batch`` decoded and preprocessed, stacked (its first image is image ``start`` of the call)."""
    import torch

    return torch.stack([_decode(b, start + i, preprocess, max_pixels) for i, b in enumerate(batch)])


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


def _jobs(images: Iterable[Any], rows: int) -> Iterator[tuple[list[Any], int]]:
    """The input as ``(images, index of the first)`` jobs of ``rows`` images, type-checked here (so that a wrong
    item is named by its index, not by a pickling error) and with memoryviews sent as bytes."""
    start = 0
    for batch in _batches(images, rows):
        for i, b in enumerate(batch):
            _check_bytes(b, start + i)
        yield [bytes(b) if isinstance(b, memoryview) else b for b in batch], start
        start += len(batch)


def _process_pool(workers: int, initializer, initargs: tuple):
    """``workers`` forked processes, each started by ``initializer(*initargs)``.

    A worker sends its tensors back through shared memory, passing each one's file descriptor over a socket in a
    ``pymp-*`` temp folder. Made in the worker, that folder is removed only by the worker's own exit handlers, so
    a worker killed (by the out-of-memory killer, say) or terminated with its broken pool left it in the system's
    temp folder. This process's folder is made first instead: the workers inherit it, and it goes when this
    process exits.

    Pillow's format plugins are imported first too, by the thread that forks (at the pool's first ``submit``). A
    worker forked while another thread was inside the process's first ``Image.open`` inherited that import's
    module lock, held by a thread the worker does not have, and its own first ``Image.open`` waited forever. Here
    the import waits for the other thread's to finish, and the workers find every plugin loaded."""
    import multiprocessing
    import multiprocessing.util
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing  # noqa: F401 - registers the reductions that return tensors via shared memory
    from PIL import Image

    Image.init()
    multiprocessing.util.get_temp_dir()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=initializer,
                               initargs=initargs)


def _in_workers(images: Iterable[Any], rows: int, executor, job, inflight_jobs: int,
                who: str = "a worker process", fewer: str = "ask for fewer") -> Iterator[Any]:
    """``job(images, start)`` on each block of ``rows`` images, in ``executor`` (a pool the caller owns: its
    own, or one shared with other calls), results in order; ``inflight_jobs`` jobs are queued at a time, so the
    workers never wait for the caller; closing the generator cancels this call's queued jobs. A worker process
    killed from outside raises RuntimeError naming ``who`` and how to run ``fewer``."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    todo = _jobs(images, rows)
    inflight: deque[Future] = deque()
    try:
        for batch, start in itertools.islice(todo, inflight_jobs):
            inflight.append(executor.submit(job, batch, start))
        while inflight:
            try:
                result = inflight.popleft().result()
            except BrokenProcessPool as e:
                raise RuntimeError(f"{who} died, killed from outside (e.g. by the out-of-memory killer): {e} "
                                   f"Fewer workers need less memory: {fewer}.") from e
            for batch, start in itertools.islice(todo, 1):
                inflight.append(executor.submit(job, batch, start))
            yield result
    finally:
        for future in inflight:
            future.cancel()


def _regrouped(chunks: Iterable[torch.Tensor], rows: int, pin: bool = False) -> Iterator[torch.Tensor]:
    """Consecutive stacked images regrouped into tensors of ``rows`` (the last one shorter); each assembled by one
    copy into a new tensor, page-locked when ``pin`` (for an asynchronous copy to a CUDA device)."""
    import torch

    pending: list[torch.Tensor] = []
    have = 0

    def take(n: int) -> torch.Tensor:
        nonlocal pending, have
        if not pin and len(pending) == 1 and len(pending[0]) == n:
            out, pending = pending[0], []
        else:
            out = torch.empty((n, *pending[0].shape[1:]), dtype=pending[0].dtype, pin_memory=pin)
            filled = 0
            while filled < n:
                part = pending[0][: n - filled]
                out[filled:filled + len(part)] = part
                filled += len(part)
                rest = pending[0][len(part):]
                pending = ([rest] if len(rest) else []) + pending[1:]
        have -= n
        return out

    for chunk in chunks:
        pending.append(chunk)
        have += len(chunk)
        while have >= rows:
            yield take(rows)
    if have:
        yield take(have)


def _parallel_blocks(images: Iterable[Any], rows: int, preprocess, max_pixels: int, workers: int,
                     pin: bool = False, threads: bool = False, shared: bool = False) -> Iterator[torch.Tensor]:
    """The blocks of :func:`_serial_blocks`, decoded by ``workers`` forked processes (or threads of this process
    when ``threads``) in jobs of at most :data:`DECODE_JOB_ROWS` images (so the shared memory in flight stays
    small whatever the block), regrouped in order into blocks of ``rows`` (page-locked when ``pin``);
    ``workers + 1`` jobs in flight, so the caller encodes block k while later images are decoded. ``shared``:
    the processes are this process's shared decode pool (:func:`_shared_pool`) when it serves this
    preprocessing or is free, else a pool of this call's own."""
    job = min(rows, DECODE_JOB_ROWS)
    chunks = (_decoded_in_threads(images, job, preprocess, max_pixels, workers) if threads
              else _decoded_in_processes(images, job, preprocess, max_pixels, workers, shared))
    if job == rows and not pin:
        return chunks
    return _closing(_regrouped(chunks, rows, pin), chunks)


def _decoded_in_threads(images: Iterable[Any], job: int, preprocess, max_pixels: int,
                        workers: int) -> Iterator[torch.Tensor]:
    """Jobs of ``job`` images decoded in order by ``workers`` threads of this process."""
    import functools
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="skmm-decode") as executor:
        yield from _in_workers(images, job, executor,
                               functools.partial(_decode_stack, preprocess=preprocess, max_pixels=max_pixels),
                               workers + 1)


def _decoded_in_processes(images: Iterable[Any], job: int, preprocess, max_pixels: int, workers: int,
                          shared: bool) -> Iterator[torch.Tensor]:
    """Jobs of ``job`` images decoded in order by ``workers`` processes: the shared decode pool when ``shared``
    and it is free for this preprocessing, else a pool of this call's own."""
    with _call_pool("decode", (preprocess,), (max_pixels,), workers, _init_decode_worker, shared,
                    wait=False) as (executor, n):
        yield from _in_workers(images, job, executor, _decode_block, n + 1, who="a decode worker process",
                               fewer=f"decode_workers= or ${DECODE_WORKERS_ENV} (0: none)")


def _closing(outer: Iterator[Any], inner: Iterator[Any]) -> Iterator[Any]:
    """``outer``'s items; closing it (or finishing) closes ``inner`` too (the worker pool behind it)."""
    try:
        yield from outer
    finally:
        inner.close()


def _init_block_worker(model, preprocess, max_pixels: int, rows: int, normalize: bool, precision: str) -> None:
    """A block worker's start: one torch thread (each core runs its own worker); the model is the caller's,
    inherited by the fork (its weights are shared, not copied)."""
    import torch

    torch.set_num_threads(1)
    _WORKER.update(model=model, preprocess=preprocess, max_pixels=max_pixels, rows=rows, normalize=normalize,
                   precision=precision)


def _embed_block(batch: list[bytes], start: int) -> np.ndarray:
    """One block decoded and encoded in a block worker: its rows' features."""
    import torch

    w = _WORKER
    with torch.inference_mode():
        block = _decode_stack(batch, start, w["preprocess"], w["max_pixels"])
        features = _encode_block(w["model"], block, w["rows"], torch.device("cpu"), w["normalize"], w["precision"])
    return features.numpy()


def _block_worker_features(images: Iterable[Any], rows: int, workers: int, model, preprocess, max_pixels: int,
                           normalize: bool, precision: str, shared: bool = False) -> Iterator[np.ndarray]:
    """Each block's features, decoded and encoded by ``workers`` forked processes (one torch thread each), in
    order; two jobs per worker in flight. ``shared``: in this process's shared pool (:func:`_shared_pool`; a call
    with another model waits for it), else in a pool of this call's own."""
    with _call_pool("block", (model, preprocess), (max_pixels, rows, normalize, precision), workers,
                    _init_block_worker, shared, wait=True) as (executor, n):
        yield from _in_workers(images, rows, executor, _embed_block, 2 * n, who="a block worker process",
                               fewer=f"encode_workers= or ${ENCODE_WORKERS_ENV} (0: none)")


def _decode_workers(requested: int | None, total: int | None, rows: int, device: torch.device | None = None) -> int:
    """How many decode processes this call uses: ``requested`` (0 = serial), or by default cores − 1 unless
    the input fits one block; 0 where the process may not fork (with a warning when workers were asked for; on
    a ``device`` other than the CPU, :func:`_decode_threads` decode instead)."""
    instead = ("decoding in threads of this process" if device is not None and device.type != "cpu"
               else "decoding in the calling thread")
    return _if_forkable(_wanted_decoders(requested, total, rows), requested, "decode_workers", instead)


def _wanted_decoders(requested: int | None, total: int | None, rows: int) -> int:
    """Decoders asked for, wherever they run: ``requested``, or by default cores − 1 (``$SKMM_DECODE_WORKERS``)
    unless the input fits one block (nothing to overlap)."""
    if requested is not None:
        return requested
    return 0 if total is not None and total <= rows else default_decode_workers()


def _decode_threads(requested: int | None, total: int | None, rows: int, device: torch.device) -> int:
    """Decode threads where decode processes cannot run (a process that may not fork, e.g. a daemonic Dask
    worker) and the device, not the CPU, encodes: ``requested``, or by default as many as decode processes
    would be (cores − 1, none for one block, ``$SKMM_DECODE_WORKERS``). Pillow's decoding and resizing and
    torch's ops release the GIL: on 2 cores, 2 threads decoded 1.73× as fast as one (bench/decode_threads.py).
    None on the CPU, whose cores encode."""
    if device.type == "cpu" or _can_fork():
        return 0
    return _wanted_decoders(requested, total, rows)


def _if_forkable(workers: int, requested: int | None, name: str, instead: str) -> int:
    """``workers``, or 0 where this process may not fork children (a daemonic process, or no ``fork`` start
    method), with a warning when they were asked for (``requested``)."""
    if workers and not _can_fork():
        if requested:
            log.warning("%s=%d ignored: this process may not fork children (daemonic, or no 'fork' start method); "
                        "%s", name, requested, instead)
        return 0
    return workers


def _encode_workers(requested: int | None, decode_requested: int | None, total: int | None, rows: int,
                    device: torch.device, threads: int) -> int:
    """How many block workers this call uses: processes that each decode and encode whole blocks with one torch
    thread (CPU only). ``requested`` is used as given; by default (``None``) one per torch thread of the call
    (:func:`default_encode_workers`), unless the caller chose the decode arrangement (``decode_requested`` not
    None), the input fits one block, or decode worker processes are off (``$SKMM_DECODE_WORKERS=0``). 0 where the
    process may not fork (with a warning when workers were asked for)."""
    if device.type != "cpu":
        if requested:
            raise ValueError(f"encode_workers is for the CPU; on {device.type} the device encodes (set "
                             "decode_workers for the decoding processes)")
        return 0
    if requested is None:
        if decode_requested is not None or (total is not None and total <= rows):
            return 0
        if _env_count(ENCODE_WORKERS_ENV) is None and _env_count(DECODE_WORKERS_ENV) == 0:
            return 0  # worker processes are off
        workers = default_encode_workers(threads)
    else:
        workers = requested
    return _if_forkable(workers, requested, "encode_workers", "encoding in the calling process")


def _available_memory_bytes() -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, or less under a cgroup v2 limit (a
    container); None when unknown."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            left = max(int(limit) - used, 0)
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


WORKER_BASE_BYTES = 32 << 20  # a block worker's own memory before any block (measured: ~20 MiB with the tiny tower)


def _block_worker_bytes(model, rows: int) -> int | None:
    """A conservative estimate of one block worker's own memory for a block of ``rows`` images:
    :data:`WORKER_BASE_BYTES` plus the block's.

    ViT towers: twice the input block plus the largest activations of a block pass (attention scores and softmax,
    the MLP's hidden layer and its GELU, six copies of the residual stream), float32. Other towers (ResNets):
    three times ``rows`` × (one input image + the largest input + output of any one module in a one-image forward
    pass, :func:`_one_image_peak_bytes`). Measured private memory per worker at ``rows=64``
    (bench/block_worker_memory.py), against the estimate: ViT-S-32 136–205 MiB (251), ViT-B-32 207–283 MiB
    (397), RN50 and RN101 777–899 MiB (1 318). None when the tower's input size is unknown or that pass fails.
    """
    visual = getattr(model, "visual", None)
    size = _square(getattr(visual, "image_size", None))
    if size is None:
        return None
    transformer = getattr(visual, "transformer", None)
    grid = getattr(visual, "grid_size", None)
    try:
        block = transformer.resblocks[0]
        width, heads, hidden = transformer.width, block.attn.num_heads, block.mlp.c_fc.out_features
        tokens = grid[0] * grid[1] + 1
    except (AttributeError, IndexError, TypeError):
        peak = _one_image_peak_bytes(visual, size)
        return None if peak is None else WORKER_BASE_BYTES + 3 * rows * (4 * 3 * size * size + peak)
    per_image = 3 * size * size + 2 * heads * tokens * tokens + 2 * tokens * hidden + 6 * tokens * width
    return WORKER_BASE_BYTES + 2 * 4 * rows * per_image


_ONE_IMAGE_PEAKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tower -> bytes (per model, once)
_ONE_IMAGE_LOCK = threading.Lock()


def _one_image_peak_bytes(visual, size: int) -> int | None:
    """The largest input + output bytes of any module of ``visual`` in a forward pass of one zero image of
    ``size`` px (measured once per tower, then kept); None if the tower cannot run one.

    Forward hooks see every thread's passes through the tower (the model is shared by the calls of a process),
    so only this thread's pass is counted.
    """
    import torch

    def nbytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, list | tuple):
            return sum(nbytes(v) for v in value)
        return 0

    with _ONE_IMAGE_LOCK:
        if visual in _ONE_IMAGE_PEAKS:
            return _ONE_IMAGE_PEAKS[visual]
        me, peak = threading.get_ident(), 0

        def hook(module, inputs, output) -> None:
            nonlocal peak
            if threading.get_ident() == me:
                peak = max(peak, nbytes(inputs) + nbytes(output))

        handles = []
        try:
            param = next(visual.parameters())
            for module in visual.modules():
                handles.append(module.register_forward_hook(hook))
            with torch.inference_mode():
                visual(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
        except Exception as e:  # an unknown tower: no estimate (and no cap) rather than a failed call
            log.debug("no one-image memory figure for %s: %s", type(visual).__name__, e)
            peak = None
        finally:
            for handle in handles:
                handle.remove()
        with contextlib.suppress(TypeError):  # kept, the failures too (a tower that cannot be weakly referenced)
            _ONE_IMAGE_PEAKS[visual] = peak
        return peak


def _memory_capped(workers: int, model, rows: int) -> int:
    """``workers``, fewer when their estimated memory (:func:`_block_worker_bytes`) would pass half the memory
    still available; 0 (the decode workers' path) when fewer than two would fit."""
    need, available = _block_worker_bytes(model, rows), _available_memory_bytes()
    if not workers or need is None or available is None:
        return workers
    fit = available // 2 // need
    if fit >= workers:
        return workers
    log.info("block workers: %d of %d fit in half the available memory (%.1f GiB, ~%.2f GiB each)%s", fit,
             workers, available / 2**30, need / 2**30, "" if fit >= 2 else "; using the decode workers instead")
    return fit if fit >= 2 else 0


def _encode_block(model, block: torch.Tensor, rows: int, device: torch.device, normalize: bool,
                  precision: str) -> torch.Tensor:
    """Encode up to ``rows`` stacked preprocessed images as one zero-padded block of exactly ``rows`` images;
    the real rows' features, still on ``device``.

    Every forward pass then has the same shapes, so the math library picks the same kernels (and summation
    order) for every block: an image's features do not depend on how many images share its call. The pad rows
    are dropped; no layer mixes rows (attention is within an image), so they cannot change the real ones. On
    CUDA the block is pinned and copied asynchronously.
    """
    import torch

    n = len(block)
    if n != rows:
        padded = block.new_zeros((rows, *block.shape[1:]))
        padded[:n] = block
        block = padded
    if device.type == "cuda" and not block.is_pinned():
        block = block.pin_memory()
    with _autocast(device, precision):
        features = model.encode_image(block.to(device, non_blocking=True))
    features = features.float()
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    return features[:n]


def _fetch_async(features: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying a block's features to the host: ``(host tensor, CUDA event or None)`` for :func:`_fetched`.

    On CUDA the copy goes into pinned memory without blocking, and an event marks its end. A blocking ``.cpu()``
    of block k issued after block k+1 was queued waited for block k+1 too (one stream), so the device idled while
    the host gathered, regrouped and pinned block k+2; waiting on block k's event lets the host do that while the
    device encodes k+1. Off CUDA the features are already on the host."""
    import torch

    if features.device.type != "cuda":
        return features, None
    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)  # queued on the current stream of the features' device
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(features.device))  # that stream: not the current device's ("cuda:1")
    return host, done


def _fetched(pending: tuple[torch.Tensor, Any]) -> np.ndarray:
    """The features :func:`_fetch_async` started copying, once there: a plain numpy copy, so the pinned buffer
    goes back to torch's host cache at once (a shard's whole output is never held pinned)."""
    host, done = pending
    if done is None:
        return host.numpy()
    done.synchronize()  # never read a non-blocking device-to-host copy before its event
    return host.numpy().copy()


def _embed_dim(model, spec: ClipSpec, device: torch.device) -> int:
    import torch

    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(dim, int):
        return dim
    size = spec.image_size or 224
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])


def embed_images(
    images: Iterable[bytes],
    spec: ClipSpec,
    *,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = False,
    normalize: bool = True,
    num_threads: int | None = None,
    max_pixels: int = MAX_PIXELS,
    decode_workers: int | None = None,
    encode_workers: int | None = None,
) -> np.ndarray:
    """Embed encoded images (PNG/JPEG/… bytes) with ``spec``'s image tower: an (N, embed_dim) float32 array.

    Images stream through (an iterator is never materialised): they are decoded with Pillow as RGB and
    preprocessed, encoded under ``torch.inference_mode()`` in fixed blocks of ``spec.block_rows`` (64 by
    default) images (the last block zero-padded) at ``spec.precision``, and L2-normalised when ``normalize``.
    Row i is bitwise a function of image i's bytes (on one machine and build): batch size, row order, shard
    split, thread count and decode workers change no bit, because every forward pass has the same shape.
    ``decode_workers``: processes that decode and preprocess while the tower encodes (``None``: cores − 1, at
    least 1, none for input that fits one block; ``0``: in the calling thread, ``batch_size`` images at a time;
    ``batch_size`` changes no arithmetic). ``device=None`` picks CUDA when available. ``num_threads`` sets
    torch's intra-op threads for this call only (use 1 per worker when shards run in parallel processes). A bad
    image raises ValueError naming its index; an image of more than ``max_pixels`` pixels (width × height)
    raises ValueError naming its sample (sha256) before decoding. ``precision="tf32"`` on a non-CUDA device
    raises ValueError. ``encode_workers`` (CPU only): processes that each decode *and* encode whole blocks with one
    torch thread, instead of decode workers feeding the caller's threads (``None``: one per torch thread of the
    call, when it has two or more, the input spans several blocks and ``decode_workers`` is not given; ``0``:
    off). By default the process's concurrent calls of one model share one pool of them (:func:`_shared_pool`).
    """
    import torch

    from skmm.mkl_reproducibility import ensure_reproducible_mkl

    ensure_reproducible_mkl()  # an image's features independent of its place in a block
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads <= 0
    ):
        raise ValueError(f"num_threads must be None or a positive integer; got {num_threads!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer; got {max_pixels!r}")
    check_worker_count(decode_workers, "decode_workers")
    check_worker_count(encode_workers, "encode_workers")
    if isinstance(images, bytes | bytearray | memoryview):
        raise TypeError("images must be an iterable of encoded images, not a single bytes object (wrap it in a list)")
    dev = resolve_device(device)
    check_precision(spec.precision, dev)
    model, preprocess = _cached_model(spec, dev)
    rows = spec.block_rows
    total = len(images) if hasattr(images, "__len__") else None
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    block_workers = _encode_workers(encode_workers, decode_workers, total, rows, dev, threads)
    shared = bool(block_workers) and encode_workers is None  # the default: one pool per process, shared
    if shared:
        block_workers = _memory_capped(block_workers, model, rows)  # as many as the memory holds
    return _embed(images, spec, model, preprocess, dev, rows, total, batch_size, progress, normalize,
                  num_threads, max_pixels, decode_workers, block_workers, shared)


def _embed(images: Iterable[Any], spec: ClipSpec, model, preprocess, dev: torch.device, rows: int,
           total: int | None, batch_size: int, progress: bool, normalize: bool, num_threads: int | None,
           max_pixels: int, decode_workers: int | None, block_workers: int, shared: bool = False) -> np.ndarray:
    """:func:`embed_images` once its arguments are checked and its model loaded."""
    import torch

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc=f"embed {spec.model}")
    out: list[np.ndarray] = []
    if block_workers:
        blocks = _block_worker_features(images, rows, block_workers, model, preprocess, max_pixels, normalize,
                                        spec.precision, shared)
    else:
        workers = _decode_workers(decode_workers, total, rows, dev)
        decode_threads = 0 if workers else _decode_threads(decode_workers, total, rows, dev)
        blocks = (_parallel_blocks(images, rows, preprocess, max_pixels, workers or decode_threads,
                                   pin=dev.type == "cuda", threads=bool(decode_threads),
                                   shared=decode_workers is None) if workers or decode_threads
                  else _serial_blocks(images, rows, batch_size, preprocess, max_pixels))
    pending: tuple[torch.Tensor, Any] | None = None  # the last block's features, read after the next is queued
    try:
        if block_workers:
            for features in blocks:
                out.append(features)
                if bar is not None:
                    bar.update(len(features))
        else:
            with _torch_threads(num_threads), cuda_math(dev, spec.precision == "tf32"), torch.inference_mode():
                for block in blocks:
                    fetching = _fetch_async(_encode_block(model, block, rows, dev, normalize, spec.precision))
                    if pending is not None:
                        out.append(_fetched(pending))
                    pending = fetching
                    if bar is not None:
                        bar.update(len(block))
                if pending is not None:
                    out.append(_fetched(pending))
        if not out:
            with torch.inference_mode():
                return np.zeros((0, _embed_dim(model, spec, dev)), dtype=np.float32)
    finally:
        blocks.close()  # stops the workers early when encoding (or a worker) failed
        if bar is not None:
            bar.close()
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def embed_shards(shards: Iterable[Iterable[bytes]], spec: ClipSpec, **kwargs: Any) -> list[np.ndarray]:
    """Embed each shard independently (one array per shard, same options as :func:`embed_images`).

    Shards share nothing but the cached model, so they can equally be sent to parallel workers one by one; the
    rows are bitwise the same however the images were split (fixed-shape blocks, see :func:`embed_images`).
    """
    return [embed_images(shard, spec, **kwargs) for shard in shards]
