"""Calls in concurrent threads: the same tower, the same features, and process-wide settings that hold.

The flow embeds shards in parallel threads; each thread that misses the model cache builds the tower under
``torch.manual_seed(init_seed)``. torch's default generator is process-wide, so two builds at once used to
interleave their draws and give different weights (and features) from one run to the next.

torch's thread count and CUDA's math flags (TF32, cuDNN's determinism) are process-wide too. A call that set
them and restored what it found on leaving restored them under a concurrent call, which then ran on with the
process's values (TF32 convolutions in an fp32 call) or left the process with the first call's thread count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from skmm._cuda_math import cuda_math, held_flags, read_cuda_math, write_cuda_math
from skmm.models.clip import (
    ClipSpec,
    _torch_threads,
    clear_model_cache,
    embed_images,
    load_clip,
)
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


CUDA = torch.device("cuda")  # the flags are set on any build; no device is used


def _math_flags() -> tuple:
    """The TF32 flags of both of PyTorch's APIs and cuDNN's others (:class:`skmm._cuda_math.CudaMath`)."""
    return read_cuda_math()


IEEE = held_flags(tf32=False)


def _overlapping(first, second, look: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Thread 1 enters ``first()``; thread 2 then enters ``second()`` (at once, or when 1 lets it); 1 leaves, then 2.
    What each saw (``look()``, by default :func:`_state`) inside (``"1"``, ``"2"``, ``"2 after 1 left"``) and after
    (``"1 out"``, ``"2 out"``), and whether 2 got in while 1 was inside."""
    look = look or _state
    seen: dict[str, Any] = {}
    one_in, two_in, one_out = threading.Event(), threading.Event(), threading.Event()
    warm = threading.Barrier(2)

    def one() -> None:
        torch.get_num_threads()  # a thread that has used torch (as a task runner's threads have)
        warm.wait()
        with first():
            seen["1"] = look()
            one_in.set()
            two_in.wait(0.5)  # 2 may be held back until 1 leaves: then it never gets in while 1 is inside
            seen["1 leaving"] = True
        seen["1 out"] = look()
        one_out.set()

    def two() -> None:
        torch.get_num_threads()
        warm.wait()
        one_in.wait()
        with second():
            seen["2 entered before 1 left"] = "1 leaving" not in seen
            seen["2"] = look()
            two_in.set()
            one_out.wait(10)
            seen["2 after 1 left"] = look()
        seen["2 out"] = look()

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return seen


def _held(flags) -> tuple:
    """The part of the flags a call sets (the rest, fields no call holds, are only put back afterwards)."""
    return flags._replace(bystanders=None)


def _state() -> tuple:
    """(the flags a call sets, this thread's torch thread count)."""
    return _held(_math_flags()), torch.get_num_threads()


@pytest.fixture
def settings():
    """The process's math flags and thread count, put back after the test whatever happens."""
    flags, threads = _math_flags(), torch.get_num_threads()
    yield flags, threads
    write_cuda_math(flags)
    torch.set_num_threads(threads)


def test_an_fp32_call_keeps_ieee_math_after_a_concurrent_one_leaves(settings):
    flags, _threads = settings
    seen = _overlapping(lambda: cuda_math(CUDA, tf32=False), lambda: cuda_math(CUDA, tf32=False))
    assert seen["2 entered before 1 left"]  # the same setting: held together
    assert seen["1"][0] == seen["2"][0] == IEEE
    assert seen["2 after 1 left"][0] == IEEE  # was the process's flags (TF32 convolutions, not deterministic)
    assert _math_flags() == flags  # the last one out restores what was there


def test_a_call_wanting_other_math_waits_for_the_holders_to_leave(settings):
    flags, _threads = settings
    seen = _overlapping(lambda: cuda_math(CUDA, tf32=False), lambda: cuda_math(CUDA, tf32=True))
    assert seen["1"][0] == IEEE
    assert not seen["2 entered before 1 left"]
    assert seen["2"][0] == held_flags(tf32=True)
    assert _math_flags() == flags


def _new_thread_count() -> int:
    """The thread count a thread started now takes."""
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return out[0]


def test_concurrent_thread_counts_are_each_threads_own_and_the_default_is_restored(settings):
    """torch (OpenMP here) keeps a thread count per thread, and set_num_threads also sets the count that threads
    started later take. Each call sets, and then restores, its own thread's count; the default for new threads is
    held like the other settings. The second of two overlapping calls used to restore the first's count as that
    default, so every thread started afterwards ran on one thread."""
    _flags, threads = settings
    seen = _overlapping(lambda: _torch_threads(1), lambda: _torch_threads(1))
    assert seen["2 entered before 1 left"] and seen["1"][1] == seen["2"][1] == seen["2 after 1 left"][1] == 1
    assert seen["1 out"][1] == seen["2 out"][1] == threads  # each thread's own count back
    assert _new_thread_count() == threads and torch.get_num_threads() == threads
    seen = _overlapping(lambda: _torch_threads(1), lambda: _torch_threads(threads + 1))
    assert not seen["2 entered before 1 left"] and seen["2"][1] == threads + 1
    assert seen["1 out"][1] == seen["2 out"][1] == threads
    assert _new_thread_count() == threads and torch.get_num_threads() == threads


def test_a_nested_call_may_keep_the_setting_but_not_change_it(settings):
    flags, _threads = settings
    with cuda_math(CUDA, tf32=False), cuda_math(CUDA, tf32=False):
        assert _held(_math_flags()) == IEEE
    assert _math_flags() == flags
    with cuda_math(CUDA, tf32=False), pytest.raises(RuntimeError, match="already holds"):
        with cuda_math(CUDA, tf32=True):
            pass
    assert _math_flags() == flags


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_concurrent_cuda_calls_of_two_precisions_equal_each_alone():
    """Two fp32 calls and a tf32 call at once on the device: each call's features are bitwise its own alone (the
    fp32 ones ran on with TF32 convolutions once the first fp32 call left and restored the process's flags)."""
    from sklearn.datasets import load_digits

    from skmm.models.clip import default_block_rows

    images = [render_digit_png(p) for p in load_digits().images[:300]]
    rows = default_block_rows("cuda")
    specs = [ClipSpec("skmm-tiny-vit", precision=p, block_rows=rows) for p in ("fp32", "fp32", "tf32")]
    alone = [embed_images(images, spec, device="cuda") for spec in specs]
    flags = _math_flags()

    def call(spec: ClipSpec, barrier: threading.Barrier) -> np.ndarray:
        barrier.wait()
        return embed_images(images, spec, device="cuda")

    for _ in range(2):
        with ThreadPoolExecutor(len(specs)) as pool:
            together = list(pool.map(call, specs, [threading.Barrier(len(specs))] * len(specs)))
        assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
    assert _math_flags() == flags


def test_threads_missing_the_model_cache_together_load_the_tower_once(monkeypatch):
    """The loading thread used to release the load lock before putting the tower in the cache: a thread waiting on
    that lock then missed the cache and loaded a second tower (its calls then could not share the first one's
    block workers, which are kept per model). The loading thread is held up right there to widen that window."""
    import skmm.models.clip as clip_module

    loads, mine = [], threading.local()
    real_load, real_lock = clip_module.load_clip, clip_module._CACHE_LOCK

    def load(spec, device):
        loads.append(threading.get_ident())
        mine.loaded = True
        return real_load(spec, device)

    class SlowAfterLoading:
        def __enter__(self):
            if getattr(mine, "loaded", False):
                mine.loaded = False
                time.sleep(0.3)
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    monkeypatch.setattr(clip_module, "load_clip", load)
    monkeypatch.setattr(clip_module, "_CACHE_LOCK", SlowAfterLoading())
    clear_model_cache()
    spec = ClipSpec("skmm-tiny-vit", init_seed=5)
    models = _at_once(lambda: clip_module._cached_model(spec, torch.device("cpu"))[0], 3)
    assert len(loads) == 1
    assert all(m is models[0] for m in models)


def test_overlapping_ft_calls_keep_the_vmap_warning_quiet_and_leave_the_filters_as_they_were():
    """The FT path hides one warning of torch's vmap. A per-call ``warnings.catch_warnings()`` is not thread-safe:
    with two calls overlapping, the first out dropped the second's filter (the warning showed) and the second out
    put the first's back for good."""
    import warnings

    from skmm.gradients.clip_ft import _is_vmap_fallback_filter, _quiet_vmap_fallback

    def quiet() -> bool:
        return any(map(_is_vmap_fallback_filter, warnings.filters))

    before = list(warnings.filters)
    seen = _overlapping(_quiet_vmap_fallback, _quiet_vmap_fallback, look=quiet)
    assert seen["2 entered before 1 left"] and seen["2 after 1 left"]  # was dropped when the first call left
    assert not seen["2 out"]
    assert warnings.filters == before  # the first call's filter was left behind for good
