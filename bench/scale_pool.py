"""Synthetic JPEG pools for the scale benchmark: ``N`` distinct ~56 KB photos-like JPEGs in 3 class folders.

Each image is a smooth random colour field (a few low-frequency waves) plus fine noise, 256×256, JPEG quality 90:
distinct bytes (so distinct sample ids), realistic decode cost, about the size of a web photo thumbnail. A pool of
size N is hard links to the first N images of one master folder, so nested sizes cost no extra disk and the same
files (inodes) are reused.

    python bench/scale_pool.py --master /tmp/skmm-scale/master --count 200000
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import shutil
from concurrent.futures import ProcessPoolExecutor

import numpy as np

CLASSES = ("a", "b", "c")
SIZE = 256


_Y, _X = (np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE)


def image_bytes(index: int) -> bytes:
    """The JPEG bytes of image ``index`` (a pure function of the index)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    for c in range(3):
        (fx, fy), phase = rng.uniform(0.5, 4, 2), rng.uniform(0, 6.3)
        img[..., c] = 100 + 80 * np.sin(np.float32(2 * np.pi) * (fx * _X + fy * _Y) + np.float32(phase))
    img += rng.integers(-48, 49, img.shape, dtype=np.int8)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _path(root: pathlib.Path, index: int) -> pathlib.Path:
    return root / CLASSES[index % len(CLASSES)] / f"{index:08d}.jpg"


def _write_range(root: str, start: int, stop: int) -> int:
    base = pathlib.Path(root)
    for i in range(start, stop):
        path = _path(base, i)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(image_bytes(i))
            os.replace(tmp, path)
    return stop - start


def make_master(master: pathlib.Path, count: int, workers: int = 2) -> None:
    """Write images 0..count-1 under ``master`` (existing ones are kept: resumable)."""
    for c in CLASSES:
        (master / c).mkdir(parents=True, exist_ok=True)
    step = 2000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_range, [str(master)] * len(range(0, count, step)), range(0, count, step),
                      [min(s + step, count) for s in range(0, count, step)]))


def make_pool(master: pathlib.Path, pool: pathlib.Path, start: int, count: int) -> pathlib.Path:
    """``pool`` = hard links to master images start..start+count-1 (same inodes, no bytes copied)."""
    for c in CLASSES:
        (pool / c).mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        target = _path(pool, i)
        if not target.exists():
            os.link(_path(master, i), target)
    return pool


def growth_setup(work: pathlib.Path, n: int, store: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, int]:
    """A growth benchmark's start: a master of ``n`` + 1 % images under ``work``, a fresh pool of the first ``n``
    and an empty store folder ``work/store``; (master, pool, store path, the growth's size)."""
    grown = n // 100
    master, pool, base = work / "master", work / "pool", work / store
    make_master(master, n + grown)
    for path in (pool, base):
        shutil.rmtree(path, ignore_errors=True)
    make_pool(master, pool, 0, n)
    return master, pool, base, grown


def files_under(root: pathlib.Path) -> set[pathlib.Path]:
    """Every file under ``root`` (a store's state, to put it back after a measured run)."""
    return {p for p in root.rglob("*") if p.is_file()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", type=pathlib.Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    make_master(args.master, args.count, args.workers)
