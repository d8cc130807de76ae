"""Plain helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import io
import socket
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.implementations.local import LocalFileOpener, LocalFileSystem


def random_png(seed: int) -> bytes:
    """A 16 × 16 RGB PNG of seeded random pixels (a distinct image, so a distinct sample id, per seed)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_options(endpoint: str) -> dict:
    """fsspec/s3fs options for the test S3 server: dummy credentials, short timeouts, one attempt."""
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}}}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar archive holding ``members`` (name, bytes) in order: a WebDataset shard for tests."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _CountingOpener(LocalFileOpener):
    def read(self, *args):
        out = super().read(*args)
        self.fs.bytes_read += len(out)
        return out

    def readinto(self, buf):
        n = super().readinto(buf)
        self.fs.bytes_read += n or 0
        return n


class CountingFileSystem(LocalFileSystem):
    """The real local filesystem, counting the bytes read through the files it opens."""

    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_read = 0

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "r" in mode:
            return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)
        return super()._open(path, mode, block_size, **kwargs)


def replant_shard(shard, table) -> None:
    """Write ``table`` as a local sample shard's object file (a tampered shard), padded (a key-value entry of the
    footer) to the manifest's size, so that only reading its rows can tell."""
    import pathlib

    import pyarrow.parquet as pq

    from storage.datasets import _PARQUET_OPTIONS, SAMPLE_SCHEMA

    target, pad = shard.artifact.size, 0
    for _ in range(10):
        sink = io.BytesIO()
        with pq.ParquetWriter(sink, SAMPLE_SCHEMA, store_schema=False, **_PARQUET_OPTIONS) as writer:
            writer.write_table(table.cast(SAMPLE_SCHEMA), row_group_size=shard.num_rows)
            writer.add_key_value_metadata({"pad": "x" * pad})
        raw = sink.getvalue()
        if len(raw) == target:
            pathlib.Path(shard.artifact.uri.removeprefix("file://")).write_bytes(raw)
            return
        pad += target - len(raw)
        assert pad >= 0, "the tampered shard is larger than the original"
    raise AssertionError("could not pad the tampered shard to its size")


def random_sample_ids(rng, n: int):
    """n distinct sorted sample ids (64 hex digits) as an ``ID_DTYPE`` array (numpy ``S64``)."""
    import numpy as np

    hexed = np.array([f"{b:02x}" for b in range(256)], dtype="S2")[np.frombuffer(rng.bytes(32 * n), np.uint8)]
    ids = np.unique(hexed.view("S64"))
    assert len(ids) == n
    return ids


def spy_on(monkeypatch, module, name: str, log, *, arg: int | None = None):
    """Wrap ``module.<name>`` (it still runs): each call appends a line to ``log`` (a path) with the calling
    process's id, and its positional argument ``arg`` when given. Forked workers inherit the spy, so the lines
    say which processes made the calls. Returns ``log``."""
    import os

    real = getattr(module, name)

    def spying(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}" + ("" if arg is None else f" {args[arg]}") + "\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spying)
    return log


def gradients_out_of_memory_above(monkeypatch, limit: int) -> list[int]:
    """Make ``skmm.gradients.clip_ft.per_sample_gradients`` raise a CUDA out-of-memory error on batches of more
    than ``limit`` images (smaller ones run for real); the batch sizes it is called with are appended to the
    returned list."""
    import torch

    from skmm.gradients import clip_ft

    real = clip_ft.per_sample_gradients
    sizes: list[int] = []

    def limited(model, inputs, labels, names):
        sizes.append(len(inputs))
        if len(inputs) > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test): {len(inputs)} images")
        return real(model, inputs, labels, names)

    monkeypatch.setattr(clip_ft, "per_sample_gradients", limited)
    return sizes


@contextlib.contextmanager
def held_by_another_thread(enter: Callable[[], Any], timeout: float = 60.0) -> Iterator[threading.Thread]:
    """Another thread enters the context manager ``enter()`` (a lock, a setting's hold) and stays inside until
    the block ends: what a fork in the block finds held by a thread that the child will not have."""
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with enter():
            inside.set()
            leave.wait(timeout)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert inside.wait(5), "the other thread did not get in"
    try:
        yield thread
    finally:
        leave.set()
        thread.join(10)
