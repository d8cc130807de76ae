"""The bundled digits pool: deterministic rendering and dataset."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
from ingest_pools import make_pool
from PIL import Image

from storage.artifacts import ArtifactStore
from storage.datasets import read_samples
from storage.ingest import (
    ingest_digits,
    ingest_image_folder,
    render_digit_png,
)


def test_render_digit_png_is_deterministic_and_decodes():
    pixels = (np.arange(64).reshape(8, 8) % 17).astype(float)
    pixels[-1, -1] = 16
    a = render_digit_png(pixels, 32)
    assert a == render_digit_png(pixels.copy(), 32)
    img = Image.open(io.BytesIO(a))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    arr = np.asarray(img)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[-1, -1].tolist() == [255, 255, 255]  # 0 → black, 16 → white
    assert render_digit_png(pixels, 32, "bilinear") != a
    assert render_digit_png(pixels, 32, "bilinear") == render_digit_png(pixels, 32, "bilinear")


def test_ingest_digits_is_deterministic(store):
    from sklearn.datasets import load_digits

    start = time.perf_counter()
    first = ingest_digits(store)
    elapsed = time.perf_counter() - start
    second = ingest_digits(store)
    assert second == first  # same bytes → same shards, manifest and version
    assert first.n_samples + first.n_duplicates_collapsed == 1797 and first.n_quarantined == 0
    assert first.n_samples == 1797  # scikit-learn's copy holds no identical images
    assert first.classes == tuple(str(d) for d in range(10))
    assert sum(first.split_counts.values()) == 1797 and min(first.split_counts.values()) > 150
    assert first.quarantine is None and first.vectors is None
    assert elapsed < 20

    table = read_samples(store, first.dataset)
    digits = load_digits()
    row = {r["source_uri"]: r for r in table.to_pylist()}["sklearn://datasets/load_digits#index=0"]
    assert row["data"] == render_digit_png(digits.images[0], 32)
    assert row["label"] == str(digits.target[0])
    assert Image.open(io.BytesIO(row["data"])).size == (32, 32)
    assert ingest_digits(store, seed=1).dataset.version != first.dataset.version


def test_ingest_digits_other_size(tmp_path):
    result = ingest_digits(ArtifactStore(tmp_path / "store"), image_size=16, val_fraction=0.1, test_fraction=0.2)
    assert result.n_samples == 1797
    with pytest.raises(ValueError, match="image_size"):
        ingest_digits(ArtifactStore(tmp_path / "store"), image_size=4)


def test_copying_a_folder_keeps_the_dataset(tmp_path):
    """A copied tree (shutil, new root) ingests to the same version: ids come from bytes, not paths."""
    store = ArtifactStore(tmp_path / "store")
    make_pool(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    assert ingest_image_folder(store, tmp_path / "orig").dataset.version == \
        ingest_image_folder(store, tmp_path / "copy").dataset.version
