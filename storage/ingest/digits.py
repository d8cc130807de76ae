"""The bundled default pool: scikit-learn's 1797 real handwritten digits, rendered as PNGs (nothing is
downloaded), through the same streaming writer as every other source."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np

from storage.artifacts import ArtifactStore
from storage.datasets import sample_id
from storage.ingest.common import DEFAULT_SHARD_ROWS, IngestResult, check_common
from storage.ingest.writer import DatasetWriter

__all__ = ["DIGITS_URI", "ingest_digits", "render_digit_png"]

DIGITS_URI = "sklearn://datasets/load_digits"


def render_digit_png(pixels: np.ndarray, image_size: int = 32,
                     resample: Literal["nearest", "bilinear"] = "nearest") -> bytes:
    """One 8×8 digits image (values 0..16) as RGB PNG bytes, the same bytes on every run.

    Values map to 0..255 (round(v·255/16): background black, ink white), are upscaled to ``image_size`` and
    encoded with fixed parameters and *no* compression (deflate level 0, stored blocks): compressed deflate
    streams differ between zlib and zlib-ng builds of Pillow, stored blocks do not, so the sample ids of the
    bundled pool do not depend on how Pillow was built.
    """
    from PIL import Image

    if resample not in ("nearest", "bilinear"):
        raise ValueError(f"resample must be 'nearest' or 'bilinear'; got {resample!r}")
    arr = np.asarray(pixels, dtype=np.float64)
    if arr.shape != (8, 8):
        raise ValueError(f"a digits image is 8×8; got shape {arr.shape}")
    gray = np.rint(np.clip(arr, 0, 16) * (255.0 / 16.0)).astype(np.uint8)
    method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.BILINEAR
    img = Image.fromarray(gray)  # uint8 2-D → mode "L"
    if image_size != 8:
        img = img.resize((image_size, image_size), method)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=0, optimize=False)
    return buf.getvalue()


def ingest_digits(store: ArtifactStore, *, image_size: int = 32, seed: int = 0, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, resample: Literal["nearest", "bilinear"] = "nearest",
                  shard_rows: int = DEFAULT_SHARD_ROWS) -> IngestResult:
    """The bundled default pool: scikit-learn's ``load_digits()`` (1797 real 8×8 handwritten digits, 10 classes;
    nothing is downloaded) rendered by :func:`render_digit_png`, label = the digit as a string, splits by
    :func:`assign_split`, ``source_uri`` = ``sklearn://datasets/load_digits#index=<i>``.

    Identical images would collapse (``n_duplicates_collapsed``); with scikit-learn 1.9.1's copy all 1797 are
    distinct, so it is 0 and the dataset has 1797 samples. The same arguments give the same dataset version
    (and the same shard and manifest artifacts) on every run.
    """
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be an integer in [8, 1024]; got {image_size!r}")
    check_common(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, shard_rows=shard_rows)
    digits = load_digits()
    with DatasetWriter(store, source_name=DIGITS_URI, shard_rows=shard_rows, seed=seed, val_fraction=val_fraction,
                       test_fraction=test_fraction) as writer:
        for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
            data = render_digit_png(pixels, image_size, resample)
            writer.add(sample_id(data), f"{DIGITS_URI}#index={i}", str(int(target)), None, data)
        return writer.finish(source=DIGITS_URI)
