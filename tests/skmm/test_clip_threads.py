"""Towers built in concurrent threads are the same tower: the seeded random init must not race.

The flow embeds shards in parallel threads; each thread that misses the model cache builds the tower under
``torch.manual_seed(init_seed)``. torch's default generator is process-wide, so two builds at once used to
interleave their draws and give different weights (and features) from one run to the next.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from skmm.models.clip import ClipSpec, clear_model_cache, embed_images, load_clip
from storage.ingest import render_digit_png


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def _at_once(fn: Callable[[], Any], n: int) -> list[Any]:
    """``fn()`` in ``n`` threads released together; their results."""
    barrier = threading.Barrier(n)
    out: list[Any] = []

    def run() -> None:
        barrier.wait()
        out.append(fn())

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == n
    return out


def test_concurrent_builds_give_the_serial_tower():
    spec = ClipSpec("skmm-tiny-vit", init_seed=3)
    reference = _weights(load_clip(spec, "cpu")[0])
    for _ in range(3):  # the race is timing-dependent: several rounds of 6 simultaneous builds
        for weights in _at_once(lambda: _weights(load_clip(spec, "cpu")[0]), 6):
            assert all(torch.equal(a, b) for a, b in zip(reference, weights, strict=True))


def test_concurrent_embeds_equal_serial():
    from sklearn.datasets import load_digits

    images = [render_digit_png(p) for p in load_digits().images[:16]]
    spec = ClipSpec("skmm-tiny-vit", init_seed=1)
    clear_model_cache()
    serial = embed_images(images, spec)
    for _ in range(2):
        clear_model_cache()
        assert all(np.array_equal(serial, o) for o in _at_once(lambda: embed_images(images, spec), 4))
