"""Decoding off the critical path, precision and block size per device (issue 12): the decode workers change no
bit, run in other processes with one torch thread, report bad images as the serial path does; precision and
block size are part of the spec, and the default spec is what it was."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import spy_on

from skmm.models import TINY_MODEL, ClipSpec, check_precision, default_block_rows, embed_images, embed_shards
from skmm.models import clip as clip_module

TINY = ClipSpec(TINY_MODEL)


def jpeg(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool() -> list[bytes]:
    # Over two 64-row blocks, mixed sizes: full, partial and padded blocks.
    return [jpeg(i, (30 + i % 7, 32 + i % 5)) for i in range(150)]


@pytest.fixture(scope="module")
def serial(pool) -> np.ndarray:
    return embed_images(pool, TINY, device="cpu", decode_workers=0)


# --------------------------------------------------------------------------------------------------- workers


@pytest.mark.parametrize("workers", [1, 2, None])
def test_decode_workers_change_no_bit(pool, serial, workers):
    assert np.array_equal(embed_images(pool, TINY, device="cpu", decode_workers=workers), serial)


def test_decode_workers_stream_an_iterator_and_small_blocks_bitwise(pool):
    spec = ClipSpec(TINY_MODEL, block_rows=8)  # 19 blocks: many jobs in flight and in order
    reference = embed_images(pool, spec, device="cpu", decode_workers=0, batch_size=5)
    assert np.array_equal(embed_images(iter(pool), spec, device="cpu", decode_workers=2), reference)
    parts = embed_shards([pool[:37], pool[37:]], spec, device="cpu", decode_workers=1)
    assert np.array_equal(np.concatenate(parts), reference)


def test_decoding_runs_in_worker_processes(pool, monkeypatch, tmp_path):
    log = spy_on(monkeypatch, clip_module, "_decode", tmp_path / "pids", arg=1)  # which processes decoded
    threads = torch.get_num_threads()
    embed_images(pool, TINY, device="cpu", decode_workers=2)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for _, i in rows) == list(range(len(pool)))
    assert str(os.getpid()) not in {pid for pid, _ in rows}
    assert torch.get_num_threads() == threads  # the parent's encode threads are untouched


@pytest.mark.parametrize("initializer, initargs", [
    (clip_module._init_decode_worker, (None, 1)),  # a decode worker
    (clip_module._init_block_worker, (None, None, 1, 64, True, "fp32")),  # a block worker
])
def test_a_worker_runs_torch_with_one_thread(initializer, initargs):
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=initializer,
                             initargs=initargs) as workers:
        assert workers.submit(torch.get_num_threads).result() == 1


@pytest.mark.parametrize("workers", [{"decode_workers": 1}, {"encode_workers": 2}])
def test_bad_images_in_a_worker_are_named_as_in_the_serial_path(pool, workers):
    bad = [*pool[:70], b"\x89PNG\r\n\x1a\n truncated", *pool[70:80]]
    with pytest.raises(ValueError, match=r"^image 70 could not be decoded \(18 bytes\)"):
        embed_images(bad, TINY, device="cpu", **workers)
    with pytest.raises(TypeError, match="image 66: expected encoded image bytes, got str"):
        embed_images([*pool[:66], "cat.png"], TINY, device="cpu", **workers)
    (name, _), = workers.items()
    for wrong in (-1, True, 1.5):
        with pytest.raises(ValueError, match=name):
            embed_images(pool, TINY, device="cpu", **{name: wrong})
    view = [memoryview(b) for b in pool[:70]]  # memoryviews are sent to workers as bytes
    assert embed_images(view, TINY, device="cpu", **workers).shape == (70, 32)
    assert embed_images([], TINY, device="cpu", **workers).shape == (0, 32)


def test_default_worker_count_and_where_forking_is_not_allowed(monkeypatch, caplog):
    monkeypatch.delenv("SKMM_DECODE_WORKERS", raising=False)
    assert clip_module.default_decode_workers() == max(len(os.sched_getaffinity(0)) - 1, 1)
    assert clip_module._decode_workers(None, 64, 64) == 0  # one block: nothing to overlap
    assert clip_module._decode_workers(None, 65, 64) == clip_module.default_decode_workers()
    assert clip_module._decode_workers(None, None, 64) == clip_module.default_decode_workers()  # an iterator
    assert clip_module._decode_workers(0, 1000, 64) == 0
    assert clip_module._decode_workers(3, 10, 64) == 3  # asked for: used
    monkeypatch.setenv("SKMM_DECODE_WORKERS", "0")
    assert clip_module._decode_workers(None, 1000, 64) == 0
    monkeypatch.setenv("SKMM_DECODE_WORKERS", "3")
    assert clip_module._decode_workers(None, 1000, 64) == 3
    monkeypatch.setenv("SKMM_DECODE_WORKERS", "-1")
    with pytest.raises(ValueError, match="SKMM_DECODE_WORKERS must be a non-negative integer"):
        clip_module.default_decode_workers()
    monkeypatch.delenv("SKMM_DECODE_WORKERS")
    monkeypatch.setattr(clip_module, "_can_fork", lambda: False)  # e.g. a daemonic Dask worker
    assert clip_module._decode_workers(None, 1000, 64) == 0
    with caplog.at_level(logging.WARNING, logger=clip_module.__name__):
        assert clip_module._decode_workers(2, 1000, 64) == 0
    assert "decode_workers=2 ignored" in caplog.text


def test_regrouped_keeps_order_and_passes_whole_chunks_through():
    x = torch.arange(150 * 2, dtype=torch.float32).reshape(150, 2)
    chunks = [x[:64], x[64:128], x[128:]]
    out = list(clip_module._regrouped(iter(chunks), 100))
    assert [len(t) for t in out] == [100, 50] and torch.equal(torch.cat(out), x)
    same = list(clip_module._regrouped(iter(chunks), 64))
    assert [len(t) for t in same] == [64, 64, 22] and same[0] is chunks[0]  # a chunk of the right size: no copy
    small = list(clip_module._regrouped(iter(chunks), 7))
    assert {len(t) for t in small[:-1]} == {7} and torch.equal(torch.cat(small), x)
    assert list(clip_module._regrouped(iter([]), 8)) == []


def test_decode_jobs_stay_small_whatever_the_block(pool, monkeypatch):
    # CUDA blocks are 512 images: decoded as one job each, cores × 512 preprocessed images (0.3 GB a job at
    # 224 px) would sit in shared memory. Jobs are at most DECODE_JOB_ROWS images, regrouped into the block.
    spec = ClipSpec(TINY_MODEL, block_rows=100)
    reference = embed_images(pool, spec, device="cpu", decode_workers=0)
    real = clip_module._jobs
    jobs: list[tuple[int, int]] = []

    def spying(images, rows):
        for batch, start in real(images, rows):
            jobs.append((start, len(batch)))
            yield batch, start

    monkeypatch.setattr(clip_module, "_jobs", spying)
    shapes: list[int] = []
    encode = clip_module._encode_block

    def encoding(model, block, rows, *args):
        shapes.append(len(block))
        return encode(model, block, rows, *args)

    monkeypatch.setattr(clip_module, "_encode_block", encoding)
    assert np.array_equal(embed_images(pool, spec, device="cpu", decode_workers=2), reference)
    assert jobs == [(0, 64), (64, 64), (128, 22)]  # 150 images in jobs of 64
    assert shapes == [100, 50]  # encoded in the spec's blocks


def test_decode_threads_where_processes_cannot_fork_and_a_device_encodes(monkeypatch):
    monkeypatch.delenv("SKMM_DECODE_WORKERS", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rule = clip_module._decode_threads
    assert rule(None, 1000, 64, cuda) == 0  # this process may fork: decode processes
    monkeypatch.setattr(clip_module, "_can_fork", lambda: False)  # e.g. a daemonic Dask worker
    assert rule(None, 1000, 64, cuda) == clip_module.default_decode_workers()
    assert rule(None, None, 64, cuda) == clip_module.default_decode_workers()  # an iterator
    assert rule(None, 64, 64, cuda) == 0  # one block
    assert rule(3, 10, 64, cuda) == 3 and rule(0, 1000, 64, cuda) == 0
    assert rule(None, 1000, 64, cpu) == 0 and rule(3, 1000, 64, cpu) == 0  # the CPU's cores encode
    monkeypatch.setenv("SKMM_DECODE_WORKERS", "0")
    assert rule(None, 1000, 64, cuda) == 0


def test_decode_threads_change_no_bit_and_name_bad_images(pool, serial, monkeypatch):
    import threading

    names: set[str] = set()
    real = clip_module._decode

    def spying(*args, **kwargs):
        names.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(clip_module, "_decode", spying)
    monkeypatch.setattr(clip_module, "_decode_threads", lambda *args: 2)  # as on CUDA in a daemonic worker
    monkeypatch.setattr(clip_module, "_can_fork", lambda: False)
    for spec in (TINY, ClipSpec(TINY_MODEL, block_rows=100)):
        reference = serial if spec is TINY else embed_images(pool, spec, device="cpu", decode_workers=0)
        names.clear()
        assert np.array_equal(embed_images(pool, spec, device="cpu", decode_workers=2), reference)
        assert names and all(n.startswith("skmm-decode") for n in names)  # decoded in the threads
    bad = [*pool[:70], b"\x89PNG\r\n\x1a\n truncated", *pool[70:80]]
    with pytest.raises(ValueError, match=r"^image 70 could not be decoded \(18 bytes\)"):
        embed_images(bad, TINY, device="cpu", decode_workers=2)


# ------------------------------------------------------------------- block workers: decode and encode per core


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_block_workers_change_no_bit(pool, serial, workers):
    assert np.array_equal(embed_images(pool, TINY, device="cpu", encode_workers=workers), serial)


def test_block_workers_stream_an_iterator_and_small_blocks_bitwise(pool):
    spec = ClipSpec(TINY_MODEL, block_rows=8)  # 19 blocks: many jobs in flight, results kept in order
    reference = embed_images(pool, spec, device="cpu", decode_workers=0, batch_size=5)
    assert np.array_equal(embed_images(iter(pool), spec, device="cpu", encode_workers=2), reference)
    parts = embed_shards([pool[:37], pool[37:]], spec, device="cpu", encode_workers=2)
    assert np.array_equal(np.concatenate(parts), reference)
    bf16 = ClipSpec(TINY_MODEL, precision="bf16")
    assert np.array_equal(embed_images(pool, bf16, device="cpu", encode_workers=2),
                          embed_images(pool, bf16, device="cpu", decode_workers=0))
    raw = embed_images(pool, TINY, device="cpu", normalize=False, decode_workers=0)
    assert np.array_equal(embed_images(pool, TINY, device="cpu", normalize=False, encode_workers=2), raw)


def test_block_workers_decode_and_encode_outside_the_caller(pool, monkeypatch, tmp_path):
    decoded = spy_on(monkeypatch, clip_module, "_decode", tmp_path / "_decode.pids")
    encoded = spy_on(monkeypatch, clip_module, "_encode_block", tmp_path / "_encode_block.pids")
    threads = torch.get_num_threads()
    embed_images(pool, TINY, device="cpu", encode_workers=2)
    decoders = decoded.read_text().split()
    encoders = encoded.read_text().split()
    assert len(decoders) == len(pool) and len(encoders) == 3  # 150 images, three 64-row blocks
    assert str(os.getpid()) not in set(decoders) | set(encoders)
    assert set(encoders) <= set(decoders)  # a block is decoded and encoded by the same worker
    assert torch.get_num_threads() == threads  # the caller's threads are untouched


def test_block_workers_are_for_the_cpu():
    with pytest.raises(ValueError, match="encode_workers is for the CPU"):
        clip_module._encode_workers(2, None, 1000, 64, torch.device("cuda"), 4)
    assert clip_module._encode_workers(None, None, 1000, 64, torch.device("cuda"), 4) == 0  # the device encodes


def test_default_block_workers(monkeypatch, caplog):
    cpu = torch.device("cpu")
    for name in ("SKMM_DECODE_WORKERS", "SKMM_ENCODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    rule = clip_module._encode_workers
    assert rule(None, None, 1000, 64, cpu, 2) == 2  # one process per torch thread the call would use
    assert rule(None, None, None, 64, cpu, 4) == 4  # an iterator
    assert rule(None, None, 1000, 64, cpu, 1) == 0  # one thread: the caller encodes, a decode worker overlaps
    assert rule(None, None, 64, 64, cpu, 4) == 0  # one block: nothing to share out
    assert rule(None, 2, 1000, 64, cpu, 4) == 0  # decode workers asked for: that arrangement
    assert rule(None, 0, 1000, 64, cpu, 4) == 0  # decoding in the calling thread asked for: no processes
    assert rule(3, None, 10, 64, cpu, 1) == 3  # asked for: used
    assert rule(0, None, 1000, 64, cpu, 4) == 0
    monkeypatch.setenv("SKMM_DECODE_WORKERS", "0")  # no worker processes by default
    assert rule(None, None, 1000, 64, cpu, 4) == 0
    monkeypatch.delenv("SKMM_DECODE_WORKERS")
    monkeypatch.setenv("SKMM_ENCODE_WORKERS", "3")
    assert rule(None, None, 1000, 64, cpu, 2) == 3
    monkeypatch.setenv("SKMM_ENCODE_WORKERS", "0")  # off: the decode workers' arrangement
    assert rule(None, None, 1000, 64, cpu, 4) == 0
    monkeypatch.setenv("SKMM_ENCODE_WORKERS", "x")
    with pytest.raises(ValueError, match="SKMM_ENCODE_WORKERS must be a non-negative integer"):
        rule(None, None, 1000, 64, cpu, 4)
    monkeypatch.delenv("SKMM_ENCODE_WORKERS")
    monkeypatch.setattr(clip_module, "_can_fork", lambda: False)  # e.g. a daemonic Dask worker
    assert rule(None, None, 1000, 64, cpu, 4) == 0
    with caplog.at_level(logging.WARNING, logger=clip_module.__name__):
        assert rule(2, None, 1000, 64, cpu, 4) == 0
    assert "encode_workers=2 ignored" in caplog.text


def test_default_calls_share_one_pool_of_block_workers_that_lingers(pool, serial, monkeypatch, tmp_path):
    # By default the CPU path runs one process per torch thread, in one pool per process: the next call (the next
    # shard) forks nothing, and the pool is shut down a while after its last call.
    import time

    for name in ("SKMM_DECODE_WORKERS", "SKMM_ENCODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    encoded = spy_on(monkeypatch, clip_module, "_encode_block", tmp_path / "_encode_block.pids")
    started = spy_on(monkeypatch, clip_module, "_process_pool", tmp_path / "_process_pool.pids")
    assert np.array_equal(embed_images(pool, TINY, device="cpu", num_threads=2), serial)
    first = set(encoded.read_text().split())
    assert str(os.getpid()) not in first and len(first) == 2
    assert np.array_equal(embed_images(pool, TINY, device="cpu", num_threads=2), serial)
    assert started.read_text().split() == [str(os.getpid())]  # one pool for both calls
    assert set(encoded.read_text().split()) == first  # the same two processes
    shared = clip_module._SHARED_POOLS.get("block")
    assert shared is not None and shared.users == 0 and shared.timer is not None

    monkeypatch.setattr(clip_module, "SHARED_POOL_LINGER_S", 0.2)
    assert np.array_equal(embed_images(pool, TINY, device="cpu", num_threads=2), serial)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (clip_module._SHARED_POOLS.get("block") is not None or any(
            _alive(int(pid)) for pid in first)):
        time.sleep(0.05)
    assert clip_module._SHARED_POOLS.get("block") is None  # shut down after its linger
    assert not any(_alive(int(pid)) for pid in first)  # and its processes have exited
    assert np.array_equal(embed_images(pool, TINY, device="cpu", num_threads=2), serial)  # a new pool
    assert started.read_text().split() == [str(os.getpid())] * 2


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_concurrent_default_calls_in_threads_share_the_pool_and_equal_serial(pool, serial, monkeypatch, tmp_path):
    # The flow's shard tasks embed in threads of one process: their blocks interleave in one pool of block workers
    # (no call forks its own, none runs beside them on busy cores); every result is the serial path's bits. A
    # call with another model waits until the pool has no user, then gets a pool of its own.
    import threading

    for name in ("SKMM_DECODE_WORKERS", "SKMM_ENCODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    other = ClipSpec(TINY_MODEL, init_seed=1)
    other_serial = embed_images(pool, other, device="cpu", decode_workers=0)
    started = spy_on(monkeypatch, clip_module, "_process_pool", tmp_path / "_process_pool.pids")
    barrier = threading.Barrier(3)
    results: dict[int, np.ndarray] = {}

    def run(i: int, spec: ClipSpec) -> None:
        barrier.wait()
        results[i] = embed_images(pool, spec, device="cpu", num_threads=2)

    threads = [threading.Thread(target=run, args=(i, TINY)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(np.array_equal(r, serial) for r in results.values())
    assert len(started.read_text().split()) == 1  # one pool for the three calls
    assert clip_module._SHARED_POOLS["block"].users == 0

    barrier = threading.Barrier(2)
    results.clear()
    threads = [threading.Thread(target=run, args=(0, TINY)), threading.Thread(target=run, args=(1, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(results[0], serial) and np.array_equal(results[1], other_serial)


def test_default_decode_workers_are_shared_and_chosen_ones_are_the_calls_own(pool, serial, monkeypatch, tmp_path):
    # The decode workers' default path (on CUDA, or encode_workers=0) keeps one pool per process for the next
    # call too; decode_workers=k forks k for the call alone, as before. Another model's concurrent call, while the
    # pool serves the first, gets a pool of its own instead of waiting.
    for name in ("SKMM_DECODE_WORKERS", "SKMM_ENCODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    started = spy_on(monkeypatch, clip_module, "_process_pool", tmp_path / "_process_pool.pids")
    for _ in range(2):
        assert np.array_equal(embed_images(pool, TINY, device="cpu", encode_workers=0), serial)
    assert len(started.read_text().split()) == 1 and clip_module._SHARED_POOLS["decode"].users == 0
    for _ in range(2):
        assert np.array_equal(embed_images(pool, TINY, device="cpu", decode_workers=1), serial)
    assert len(started.read_text().split()) == 3

    other = ClipSpec(TINY_MODEL, init_seed=1)
    other_serial = embed_images(pool, other, device="cpu", decode_workers=0)
    preprocess = clip_module._cached_model(TINY, torch.device("cpu"))[1]
    blocks = clip_module._parallel_blocks(pool, 64, preprocess, clip_module.MAX_PIXELS, 1, shared=True)
    next(blocks)  # a call in the middle of its images holds the shared pool (it reuses the lingering one)
    assert len(started.read_text().split()) == 3
    assert np.array_equal(embed_images(pool, other, device="cpu", encode_workers=0), other_serial)
    assert len(started.read_text().split()) == 4  # its own pool: the shared one serves the other preprocessing
    blocks.close()
    assert clip_module._SHARED_POOLS["decode"].users == 0


def test_block_worker_memory_estimate_and_cap(monkeypatch):
    model, _ = clip_module._cached_model(TINY, torch.device("cpu"))
    need = clip_module._block_worker_bytes(model, 64)
    assert need > 0 and clip_module._block_worker_bytes(model, 128) > need  # grows with the block
    assert clip_module._block_worker_bytes(object(), 64) is None  # no image tower: no estimate, no cap
    available = clip_module._available_memory_bytes()
    assert available is None or available > 0
    monkeypatch.setattr(clip_module, "_available_memory_bytes", lambda: 20 * need)
    assert clip_module._memory_capped(4, model, 64) == 4
    assert clip_module._memory_capped(16, model, 64) == 10  # half of the memory, one estimate each
    monkeypatch.setattr(clip_module, "_available_memory_bytes", lambda: 3 * need)
    assert clip_module._memory_capped(4, model, 64) == 0  # one would fit: the decode workers' path
    monkeypatch.setattr(clip_module, "_available_memory_bytes", lambda: None)
    assert clip_module._memory_capped(4, model, 64) == 4  # unknown: as asked


def _tiny_resnet(image_size: int = 64):
    """A model whose image tower is open_clip's ModifiedResNet (the RN50 family's), small enough for a test."""
    from open_clip.modified_resnet import ModifiedResNet

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=2, image_size=image_size,
                                         width=16).eval()

    return Model()


def test_resnet_towers_get_a_memory_estimate_too():
    """ResNet towers had no estimate, so nothing capped their block workers; RN50's measure ~850 MiB each
    (bench/block_worker_memory.py). The estimate comes from one image's forward pass and scales with the block."""
    model = _tiny_resnet()
    need = clip_module._block_worker_bytes(model, 64)
    assert need is not None and need > 0
    base = clip_module.WORKER_BASE_BYTES
    assert clip_module._block_worker_bytes(model, 128) - base == 2 * (need - base)  # the block's scale with it
    assert clip_module._block_worker_bytes(_tiny_resnet(128), 64) - base > 3 * (need - base)  # and the pixels
    passes = []
    model.visual.register_forward_pre_hook(lambda module, args: passes.append(1))
    assert clip_module._block_worker_bytes(model, 64) == need and passes == []  # measured once per tower
    assert not any(m._forward_hooks for m in model.visual.modules())  # the measuring hooks are gone


def test_a_tower_whose_one_image_pass_fails_gets_no_estimate_once():
    model = _tiny_resnet()
    passes = []

    def fail(module, args):
        passes.append(1)
        raise RuntimeError("this tower cannot run a 1-image pass")

    model.visual.layer1.register_forward_pre_hook(fail)
    assert clip_module._block_worker_bytes(model, 64) is None
    assert clip_module._block_worker_bytes(model, 64) is None and len(passes) == 1  # the failure is kept too
    assert not any(m._forward_hooks for m in model.visual.modules())


def test_a_resnet_estimate_is_not_changed_by_a_concurrent_forward_pass():
    """The one-image pass hooks the tower's modules; another thread's forward through the same (cached) model at
    that moment must neither count in the estimate nor be changed."""
    model = _tiny_resnet()
    alone = clip_module._block_worker_bytes(_tiny_resnet(), 64)
    block = torch.zeros(64, 3, 64, 64)
    with torch.inference_mode():
        expected = model.visual(block)
    stop, outputs = threading.Event(), []

    def forward() -> None:
        with torch.inference_mode():
            while not stop.is_set():
                outputs.append(model.visual(block))

    thread = threading.Thread(target=forward)
    thread.start()
    try:
        estimates = []
        for _ in range(5):
            clip_module._ONE_IMAGE_PEAKS.clear()  # measure again each time
            estimates.append(clip_module._block_worker_bytes(model, 64))
    finally:
        stop.set()
        thread.join()
    assert estimates == [alone] * 5
    assert outputs and all(torch.equal(o, expected) for o in outputs)


def test_without_memory_for_two_block_workers_the_default_takes_the_decode_path(pool, serial, monkeypatch,
                                                                                 tmp_path):
    for name in ("SKMM_DECODE_WORKERS", "SKMM_ENCODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(clip_module, "_available_memory_bytes", lambda: 1)
    encoded = spy_on(monkeypatch, clip_module, "_encode_block", tmp_path / "_encode_block.pids")
    assert np.array_equal(embed_images(pool, TINY, device="cpu", num_threads=2), serial)
    assert set(encoded.read_text().split()) == {str(os.getpid())}  # encoded in the caller
    encoded.unlink()
    assert np.array_equal(embed_images(pool, TINY, device="cpu", encode_workers=2), serial)  # asked for: used
    assert str(os.getpid()) not in encoded.read_text().split()


@pytest.mark.parametrize("workers", [{"encode_workers": 2}, {"decode_workers": 2}])
def test_a_worker_that_dies_is_a_clear_error(pool, monkeypatch, workers):
    # A worker killed mid-call (e.g. by the kernel's out-of-memory killer) breaks the pool: the error says which
    # workers and how to run with fewer, instead of concurrent.futures' bare BrokenProcessPool.
    real = clip_module._decode

    def dying(data, index, *args, **kwargs):
        if index == 70:
            os._exit(9)
        return real(data, index, *args, **kwargs)

    monkeypatch.setattr(clip_module, "_decode", dying)  # inherited by the forked workers
    kind, env = ("block", "SKMM_ENCODE_WORKERS") if "encode_workers" in workers else ("decode", "SKMM_DECODE_WORKERS")
    with pytest.raises(RuntimeError, match=rf"^a {kind} worker process died, killed from .*\${env} \(0: none\)"):
        embed_images(pool, TINY, device="cpu", **workers)


_WORKERS_DIE = """
import os, time
from helpers import random_png
from skmm.models import TINY_MODEL, ClipSpec, embed_images
from skmm.models import clip as clip_module

real = clip_module._decode

def dying(data, index, *args, **kwargs):
    if index == 70:
        time.sleep(1.0)  # the other worker sends its block (images 0-63) back first
        os._exit(9)
    return real(data, index, *args, **kwargs)

clip_module._decode = dying  # inherited by the forked workers
for workers in ({"encode_workers": 2}, {"decode_workers": 2}):
    try:
        embed_images([random_png(i) for i in range(150)], ClipSpec(TINY_MODEL), device="cpu", **workers)
    except RuntimeError as exc:
        assert "worker process died" in str(exc), exc
    else:
        raise SystemExit("no worker died")
"""


def test_workers_that_die_leave_nothing_in_the_temp_folder(tmp_path):
    """A worker that sent a block back through shared memory had made a temp folder of its own (``pymp-*``, for
    the socket that passes the memory's file descriptor), and a worker that is killed, or terminated with its
    broken pool, never removes it: each such death (the out-of-memory killer's, say) left one in the system's temp
    folder, for every run of the test suite too. The workers now share their parent's, removed when it exits."""
    import subprocess
    import sys

    temp = tmp_path / "tmp"
    temp.mkdir()
    tests = str(pathlib.Path(__file__).resolve().parents[1])  # for tests/helpers.py
    env = {**os.environ, "TMPDIR": str(temp),
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _WORKERS_DIE], env=env, capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(tests).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in temp.glob("pymp-*")) == []


_FORK_MID_IMPORT = """
import importlib.machinery, io, pathlib, sys, threading, time
from PIL import Image
from skmm.models import TINY_MODEL, ClipSpec, embed_images

assert "PIL.JpegImagePlugin" not in sys.modules, "the test needs Pillow's plugins not yet imported"
importing = threading.Event()

class SlowJpegPlugin:  # the import of Pillow's JPEG plugin takes 3 s, so the fork falls inside it
    def find_spec(self, name, path, target=None):
        if name != "PIL.JpegImagePlugin":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            importing.set()
            time.sleep(3)
            run(module)
        spec.loader.exec_module = exec_module
        return spec

import torch
from skmm.models import clip
clip._cached_model(ClipSpec(TINY_MODEL), torch.device("cpu"))  # the tower built first: the fork comes at once
sys.meta_path.insert(0, SlowJpegPlugin())
images = [p.read_bytes() for p in sorted(pathlib.Path(sys.argv[1]).glob("*.jpg"))]
opener = threading.Thread(target=lambda: Image.open(io.BytesIO(images[0])).load())  # this process's first open
opener.start()
assert importing.wait(60)
features = embed_images(images, ClipSpec(TINY_MODEL), device="cpu", **{sys.argv[2]: 2})
opener.join()
print(features.shape)
"""


@pytest.mark.parametrize("workers", ["decode_workers", "encode_workers"])
def test_workers_forked_while_another_thread_imports_pillows_plugins_do_not_hang(tmp_path, pool, workers):
    """A worker forked while another thread of the parent was inside the process's first ``Image.open`` (Pillow
    importing its format plugins) inherited that import's module lock, held by a thread it does not have: its own
    first ``Image.open`` then waited forever, and so did the call (two shard tasks at once, one small enough to
    decode in its own thread, the other starting the pool). The plugins are now imported before the pool forks."""
    import signal
    import subprocess
    import sys

    for i, data in enumerate(pool[:80]):
        (tmp_path / f"{i:03d}.jpg").write_bytes(data)
    run = subprocess.Popen([sys.executable, "-c", _FORK_MID_IMPORT, str(tmp_path), workers], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the hung workers too
        run.communicate()
        pytest.fail(f"embed_images with {workers}=2 hung: a worker forked mid-import waits on its lock")
    assert run.returncode == 0 and out.strip() == "(80, 32)", err[-3000:]


# --------------------------------------------------------------------------------------- precision and blocks


def test_the_default_spec_is_unchanged_and_block_and_precision_are_part_of_it():
    # The digest of the default ViT-S-32 spec before issue 12 (bench/results/embed_throughput_cpu2.json).
    assert ClipSpec("ViT-S-32").digest == "6c1b9b6474a541a320492e7c112e37527dc6ff0d9200f3a33652cb139192aac9"
    assert "block_rows" not in ClipSpec("ViT-S-32").to_dict()
    big = ClipSpec("ViT-S-32", block_rows=512)
    assert big.to_dict()["block_rows"] == 512 and ClipSpec.from_dict(big.to_dict()) == big
    digests = {ClipSpec("ViT-S-32", precision=p, block_rows=r).digest for p in ("fp32", "tf32", "bf16")
               for r in (64, 512)}
    assert len(digests) == 6
    for bad in (0, -1, True, 1.5, 1 << 17):
        with pytest.raises(ValueError, match="block_rows"):
            ClipSpec(TINY_MODEL, block_rows=bad)


def test_default_block_rows_per_device():
    assert default_block_rows("cpu") == 64
    if torch.cuda.is_available():
        assert default_block_rows("cuda") in (256, 512)


def test_tf32_is_refused_off_cuda_and_bf16_runs_on_the_cpu(pool, serial):
    with pytest.raises(ValueError, match="'tf32' needs a CUDA device"):
        embed_images(pool, ClipSpec(TINY_MODEL, precision="tf32"), device="cpu")
    with pytest.raises(ValueError, match="'tf32' needs a CUDA device"):
        check_precision("tf32", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp16", "cpu")
    check_precision("bf16", "cpu")
    bf16 = ClipSpec(TINY_MODEL, precision="bf16")
    X = embed_images(pool, bf16, device="cpu", decode_workers=0)
    assert X.dtype == np.float32 and np.isfinite(X).all()
    assert 0 < np.abs(X - serial).max() < 0.05  # bf16 arithmetic: close to fp32, not equal
    assert np.array_equal(embed_images(pool, bf16, device="cpu", decode_workers=2, batch_size=7), X)


def test_block_rows_set_the_forward_shape(pool, serial, monkeypatch):
    shapes = []
    real = clip_module._encode_block

    def spying(model, block, rows, *args):
        shapes.append(rows)
        return real(model, block, rows, *args)

    monkeypatch.setattr(clip_module, "_encode_block", spying)
    X = embed_images(pool, ClipSpec(TINY_MODEL, block_rows=100), device="cpu", decode_workers=0)
    assert shapes == [100, 100]
    np.testing.assert_allclose(X, serial, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_features_are_bitwise_batch_and_shard_invariant(pool, precision):
    spec = ClipSpec(TINY_MODEL, precision=precision, block_rows=default_block_rows("cuda"))
    reference = embed_images(pool, spec, device="cuda", decode_workers=0)
    for batch_size in (1, 7, 64, 100):
        assert np.array_equal(embed_images(pool, spec, device="cuda", batch_size=batch_size), reference)
    for shards in (3, 7):
        parts = [list(p) for p in np.array_split(np.array(pool, dtype=object), shards)]
        assert np.array_equal(np.concatenate(embed_shards(parts, spec, device="cuda", decode_workers=2)), reference)
    order = np.random.default_rng(0).permutation(len(pool))
    assert np.array_equal(embed_images([pool[i] for i in order], spec, device="cuda"), reference[order])
    cpu = embed_images(pool, ClipSpec(TINY_MODEL), device="cpu", decode_workers=0)
    np.testing.assert_allclose(reference, cpu, atol={"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}[precision])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blocks_read_back_while_the_next_one_encodes_arrive_whole_and_in_order(pool):
    """On CUDA block k's features are copied to the host without blocking and read once its event is done, after
    block k+1 is queued (clip._fetch_async): ten 16-row blocks here, every row in its place."""
    from skmm.models.clip import _fetch_async, _fetched

    spec = ClipSpec(TINY_MODEL, block_rows=16)
    got = embed_images(pool, spec, device="cuda", decode_workers=0)
    np.testing.assert_allclose(got, embed_images(pool, spec, device="cpu", decode_workers=0), atol=1e-4)
    features = torch.randn(16, 8, device="cuda")
    host = _fetched(_fetch_async(features))
    assert np.array_equal(host, features.cpu().numpy()) and host.flags.owndata  # a copy, not the pinned buffer
