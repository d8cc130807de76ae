"""Embedding inside a multiprocessing child: the child exits when its work is done, and a forked child never uses
the worker pools it inherited from its parent.

A multiprocessing child ends in ``multiprocessing.util._exit_function``, which joins the child's own children, and
never runs the interpreter's shutdown that stops ``concurrent.futures`` pools. A shared pool of block workers
left lingering there (``SHARED_POOL_LINGER_S``) was joined for ever. A forked child also inherits its parent's
pool objects, but not the threads that feed them.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pathlib

import numpy as np
import pytest
from helpers import held_by_another_thread
from PIL import Image

from skmm.models import TINY_MODEL, ClipSpec, embed_images
from skmm.models import clip as clip_module

TINY = ClipSpec(TINY_MODEL)
JOIN_S = 60  # far above the few seconds a child takes


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (36, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


IMAGES = [jpeg(i) for i in range(150)]  # over two 64-row blocks: the block workers' path


@pytest.fixture(scope="module")
def serial() -> np.ndarray:
    return embed_images(IMAGES, TINY, device="cpu", decode_workers=0)


def _embed_in_child(out: str) -> None:
    """The child's work: the default CPU path (a shared pool of two block workers), its features saved."""
    import torch

    torch.set_num_threads(1)  # this process does not encode: its block workers do
    np.save(out, embed_images(IMAGES, TINY, device="cpu", num_threads=2))
    assert clip_module._SHARED_POOLS.get("block") is not None  # it lingers past the call, as in any process


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (its block workers, to kill with it)."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _run_child(context: str, out: pathlib.Path) -> None:
    child = multiprocessing.get_context(context).Process(target=_embed_in_child, args=(str(out),))
    child.start()
    child.join(JOIN_S)
    if child.is_alive():
        pids = _children(child.pid)
        child.kill()
        child.join(10)
        for pid in pids:
            os.kill(pid, 9)
        pytest.fail(f"the {context} child did not exit within {JOIN_S} s of its work")
    assert child.exitcode == 0


@pytest.fixture
def default_workers(monkeypatch):
    for name in ("SKMM_DECODE_WORKERS", "SKMM_ENCODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_child_that_embedded_exits(serial, tmp_path, context, default_workers):
    _run_child(context, tmp_path / "features.npy")
    assert np.array_equal(np.load(tmp_path / "features.npy"), serial)


def test_a_forked_child_uses_pools_of_its_own_and_leaves_its_parents_working(serial, tmp_path, default_workers):
    assert np.array_equal(embed_images(IMAGES, TINY, device="cpu", num_threads=2), serial)
    parents = clip_module._SHARED_POOLS.get("block")
    assert parents is not None and parents.users == 0  # lingering when the child is forked
    _run_child("fork", tmp_path / "features.npy")
    assert np.array_equal(np.load(tmp_path / "features.npy"), serial)
    assert clip_module._SHARED_POOLS.get("block") is parents  # the parent's pool, still serving it
    assert np.array_equal(embed_images(IMAGES, TINY, device="cpu", num_threads=2), serial)


def _embed_a_new_tower(out: str) -> None:
    import torch

    torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive a fork: no parallel region here
    spec = ClipSpec(TINY_MODEL, init_seed=7)  # not in the model cache: it must be loaded, under the load lock
    np.save(out, embed_images(IMAGES[:10], spec, device="cpu", decode_workers=0))


def test_a_child_forked_while_another_thread_loads_a_tower_can_load_one(tmp_path):
    with held_by_another_thread(lambda: clip_module._LOAD_LOCK):  # a tower loading (seconds for a real one)
        child = multiprocessing.get_context("fork").Process(target=_embed_a_new_tower,
                                                            args=(str(tmp_path / "f.npy"),))
        child.start()
        child.join(JOIN_S)
        if child.is_alive():
            child.kill()
            child.join(10)
            pytest.fail("the forked child waited for its parent's load lock")
        assert child.exitcode == 0
    assert np.load(tmp_path / "f.npy").shape[0] == 10
