"""The FT gradient stage decodes off its critical path (issue 12): decode workers change no bit of the rows at a
given batch size, decode in other processes, name bad images as the serial path does, and leave the
out-of-memory halving as it was."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import gradients_out_of_memory_above, spy_on

from skmm.gradients import clip_ft
from skmm.gradients.clip_ft import ft_gradient_sketch
from skmm.models import TINY_MODEL, ClipSpec
from skmm.models import clip as clip_module
from storage.datasets import sample_id

TINY = ClipSpec(TINY_MODEL)
ARGS = {"k": 1, "num_classes": 10, "sketch_dim": 16, "seed": 3, "device": "cpu"}


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool() -> tuple[list[bytes], list[str]]:
    # 150 images: over two 64-image decode jobs, batches that straddle them, and a short last batch.
    images = [jpeg(i, (30 + i % 7, 32 + i % 5)) for i in range(150)]
    return images, [sample_id(b) for b in images]


@pytest.fixture(scope="module")
def serial(pool) -> dict[int, np.ndarray]:
    images, ids = pool
    return {b: ft_gradient_sketch(images, ids, TINY, batch_size=b, decode_workers=0, **ARGS)[0] for b in (7, 32, 100)}


@pytest.mark.parametrize("batch_size", [7, 32, 100])
@pytest.mark.parametrize("workers", [1, 2, None])
def test_decode_workers_change_no_bit_at_a_batch_size(pool, serial, batch_size, workers):
    images, ids = pool
    rows, producer = ft_gradient_sketch(images, ids, TINY, batch_size=batch_size, decode_workers=workers, **ARGS)
    assert rows.tobytes() == serial[batch_size].tobytes()
    assert "decode_workers" not in producer  # a run setting: the rows do not depend on it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_decode_workers_change_no_bit_and_every_run_gives_the_same_bits(pool):
    """On CUDA the SJLT sketch summed with index_add_'s atomics, in another order each run, so this equality (which
    bench/ft_sketch_throughput.py asserts on the device) could not hold; the sketch is a matmul there now."""
    images, ids = pool
    args = {**ARGS, "device": "cuda", "batch_size": 32}
    serial_rows = ft_gradient_sketch(images, ids, TINY, decode_workers=0, **args)[0]
    for workers in (0, 2):
        assert ft_gradient_sketch(images, ids, TINY, decode_workers=workers, **args)[0].tobytes() == (
            serial_rows.tobytes())


def test_decoding_runs_in_worker_processes(pool, monkeypatch, tmp_path):
    images, ids = pool
    log = spy_on(monkeypatch, clip_module, "_decode", tmp_path / "pids", arg=1)
    threads = torch.get_num_threads()
    ft_gradient_sketch(images, ids, TINY, batch_size=32, decode_workers=2, **ARGS)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for _, i in rows) == list(range(len(images)))
    assert str(os.getpid()) not in {pid for pid, _ in rows}
    assert torch.get_num_threads() == threads


def test_bad_images_are_named_as_in_the_serial_path(pool):
    images, ids = pool
    bad = [*images[:70], b"\x89PNG\r\n\x1a\n truncated", *images[70:80]]
    bad_ids = [*ids[:70], "f" * 64, *ids[70:80]]
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"^image 70 could not be decoded \(18 bytes\)"):
            ft_gradient_sketch(bad, bad_ids, TINY, batch_size=32, decode_workers=workers, **ARGS)
    for wrong in (-1, True, 1.5):
        with pytest.raises(ValueError, match="decode_workers"):
            ft_gradient_sketch(images, ids, TINY, decode_workers=wrong, **ARGS)


def test_default_workers_on_cuda_follow_the_embed_stage_and_the_cpu_decodes_in_its_thread(monkeypatch):
    monkeypatch.delenv("SKMM_DECODE_WORKERS", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert clip_ft._ft_decode_workers(None, 32, 32, cuda) == 0  # one batch: nothing to overlap
    assert clip_ft._ft_decode_workers(None, 33, 32, cuda) == clip_module.default_decode_workers()
    assert clip_ft._ft_decode_workers(None, 1000, 32, cpu) == 0  # the gradients keep the cores busy
    assert clip_ft._ft_decode_workers(3, 10, 32, cpu) == 3  # asked for: used
    monkeypatch.setenv("SKMM_DECODE_WORKERS", "0")
    assert clip_ft._ft_decode_workers(None, 1000, 32, cuda) == 0


def test_out_of_memory_halving_with_decode_workers(pool, monkeypatch, caplog):
    """A batch of 32 decoded by the workers ends as batches of 4 after simulated CUDA out-of-memory errors: the
    rows of a run at batch 4 (bitwise: the same sub-batches), one warning."""
    images, ids = pool
    ref, _ = ft_gradient_sketch(images, ids, TINY, batch_size=4, decode_workers=0, **ARGS)
    sizes = gradients_out_of_memory_above(monkeypatch, 5)
    with caplog.at_level(logging.WARNING, logger="skmm.gradients.clip_ft"):
        got, _ = ft_gradient_sketch(images, ids, TINY, batch_size=32, decode_workers=2, **ARGS)
    assert sizes[:4] == [32, 16, 8, 4] and max(sizes[4:]) <= 4
    assert got.tobytes() == ref.tobytes()
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1


def test_decode_threads_on_cuda_where_the_process_may_not_fork(pool, monkeypatch):
    monkeypatch.delenv("SKMM_DECODE_WORKERS", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert clip_ft._decode_plan(None, 1000, 32, cuda) == (clip_module.default_decode_workers(), False)
    monkeypatch.setattr(clip_module, "_can_fork", lambda: False)  # a daemonic Dask worker
    assert clip_ft._decode_plan(None, 1000, 32, cuda) == (clip_module.default_decode_workers(), True)
    assert clip_ft._decode_plan(None, 1000, 32, cpu) == (0, False)
    images, ids = pool
    reference, _ = ft_gradient_sketch(images, ids, TINY, batch_size=32, decode_workers=0, **ARGS)
    monkeypatch.setattr(clip_ft, "_decode_plan", lambda *args: (2, True))  # forced on the CPU
    rows, _ = ft_gradient_sketch(images, ids, TINY, batch_size=32, **ARGS)
    assert rows.tobytes() == reference.tobytes()
