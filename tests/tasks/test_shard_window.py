"""The stages keep a bounded window of shard tasks in flight on Prefect's thread pool (tasks/shard_window.py), whose
own default runs every submitted task at once: real flows, real tasks, the real tiny tower."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import random_png
from sklearn.datasets import load_digits

from storage.datasets import VectorTableRef, read_vectors, write_samples
from tasks.shard_window import DEFAULT_SHARD_TASKS, SHARD_TASKS_ENV, shard_task_window, submit_windowed
from tasks.store import open_store, result_storage, store_spec

MODEL = {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0}
PAUSE_S = 0.5  # each spied call waits this long first, so that calls in flight together overlap


class Overlap:
    """Counts how many calls of a function run at the same time (the real function still runs)."""

    def __init__(self) -> None:
        self.lock, self.now, self.peak, self.calls = threading.Lock(), 0, 0, 0

    def wrap(self, fn):
        def counted(*args, **kwargs):
            with self.lock:
                self.now += 1
                self.calls += 1
                self.peak = max(self.peak, self.now)
            try:
                time.sleep(PAUSE_S)
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1
        return counted


def pool(n: int) -> list[dict]:
    return [{"data": random_png(i), "label": str(i % 2), "source_uri": f"mem://pool/{i}.png"} for i in range(n)]


@pytest.mark.parametrize("window", [None, 3])
def test_the_embed_stage_keeps_at_most_the_window_of_shard_tasks_in_flight(prefect_api, tmp_path, monkeypatch,
                                                                             window):
    from prefect import flow

    import tasks.embed as embed_module
    from tasks.embed import embed_with_counts, run_embed

    if window is None:
        monkeypatch.delenv(SHARD_TASKS_ENV, raising=False)
    else:
        monkeypatch.setenv(SHARD_TASKS_ENV, str(window))
    overlap = Overlap()
    monkeypatch.setattr(embed_module, "embed_images", overlap.wrap(embed_module.embed_images))

    @flow(name="shard-window-embed-test")
    def embed_flow(dataset: dict, store: dict) -> tuple[dict, dict]:
        return embed_with_counts(dataset, MODEL, store, {"result_storage": result_storage(store)})

    store = store_spec(tmp_path / "store")
    dataset = write_samples(open_store(store), pool(48), shard_rows=8)
    combined, counts = embed_flow(dataset.to_dict(), store)
    assert counts["shards"] == 6 and overlap.calls == 6
    assert overlap.peak == (window or DEFAULT_SHARD_TASKS)  # was 6: every shard at once

    fresh = store_spec(tmp_path / "fresh")  # the features are those of the plain, unwindowed loop
    scratch = run_embed(write_samples(open_store(fresh), pool(48), shard_rows=8).to_dict(), MODEL, fresh)
    ids, rows = read_vectors(open_store(store), VectorTableRef.from_dict(combined))
    ids_s, rows_s = read_vectors(open_store(fresh), VectorTableRef.from_dict(scratch))
    assert ids == ids_s and np.array_equal(rows, rows_s)


def test_the_ft_sketch_stage_keeps_at_most_the_window_of_shard_tasks_in_flight(prefect_api, tmp_path, monkeypatch):
    from prefect import flow

    import tasks.sketch as sketch_module
    from storage.ingest import render_digit_png
    from tasks.sketch import gradients_sketch

    monkeypatch.delenv(SHARD_TASKS_ENV, raising=False)
    overlap = Overlap()
    monkeypatch.setattr(sketch_module, "ft_gradient_sketch", overlap.wrap(sketch_module.ft_gradient_sketch))
    digits = load_digits()
    records = [{"source_uri": f"mem://{i}", "label": str(int(digits.target[i])), "split": "train",
                "data": render_digit_png(digits.images[i])} for i in range(40)]
    store = store_spec(tmp_path / "store")
    dataset = write_samples(open_store(store), records, shard_rows=8)

    @flow(name="shard-window-ft-test")
    def ft_flow(dataset: dict, store: dict) -> dict:
        return gradients_sketch(None, dataset, store, {"result_storage": result_storage(store)}, sketch_dim=8,
                                seed=0, mode="ft", model=MODEL, num_classes=10)

    table = VectorTableRef.from_dict(ft_flow(dataset.to_dict(), store))
    assert overlap.calls == 5 and overlap.peak == DEFAULT_SHARD_TASKS  # was 5
    ids, rows = read_vectors(open_store(store), table)
    assert len(ids) == 40
    # The rows of shards one at a time, outside Prefect: concurrent shard tasks change no bit (a head drawn from
    # torch's global generator inside another shard's seeded tower build once did).
    alone = store_spec(tmp_path / "alone")
    alone_dataset = write_samples(open_store(alone), records, shard_rows=8).to_dict()
    serial = VectorTableRef.from_dict(sketch_module.run_ft_sketch(alone_dataset, alone, MODEL, sketch_dim=8, seed=0,
                                                                  num_classes=10))
    assert read_vectors(open_store(alone), serial)[0] == ids
    assert np.array_equal(read_vectors(open_store(alone), serial)[1], rows)


def test_submit_windowed_keeps_the_order_and_the_bound(prefect_api):
    from prefect import flow, task

    overlap = Overlap()
    square = task(name="square")(overlap.wrap(lambda x: x * x))

    @flow(name="submit-windowed-test")
    def run(window: int | None) -> list[int]:
        futures = submit_windowed(square.submit, range(5), window)
        return [f.result() for f in futures]

    assert run(1) == [i * i for i in range(5)] and overlap.peak == 1
    overlap.peak = 0
    assert run(3) == [i * i for i in range(5)] and overlap.peak == 3
    overlap.peak = 0
    assert run(None) == [i * i for i in range(5)] and overlap.peak == 5


def test_a_failed_task_stops_the_submissions_and_raises(prefect_api):
    from prefect import flow, task

    started: list[int] = []

    @task(name="fails-at-one")
    def work(i: int) -> int:
        started.append(i)
        if i == 1:
            raise ValueError("shard 1 is bad")
        time.sleep(1.0)
        return i

    @flow(name="submit-windowed-failure-test")
    def run() -> list[int]:
        return [f.result() for f in submit_windowed(work.submit, range(10), 2)]

    with pytest.raises(ValueError, match="shard 1 is bad"):
        run()
    assert len(started) < 10 and 1 in started


def test_the_window_follows_the_runner_and_the_environment():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert shard_task_window(ThreadPoolTaskRunner(), {}) == DEFAULT_SHARD_TASKS == 2
    assert shard_task_window(ThreadPoolTaskRunner(max_workers=8), {}) == 2
    assert shard_task_window(DaskTaskRunner(address="tcp://127.0.0.1:1"), {}) is None  # the cluster bounds it
    assert shard_task_window(None, {}) == 2  # outside a flow run
    for runner in (ThreadPoolTaskRunner(), DaskTaskRunner(address="tcp://127.0.0.1:1")):
        assert shard_task_window(runner, {SHARD_TASKS_ENV: " 5 "}) == 5
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match=SHARD_TASKS_ENV):
            shard_task_window(ThreadPoolTaskRunner(), {SHARD_TASKS_ENV: bad})


@pytest.mark.parametrize("window", [0, -1, 1.5, True, "2"])
def test_submit_windowed_refuses_a_bad_window(window):
    with pytest.raises(ValueError, match="positive integer"):
        submit_windowed(lambda item: item, [1], window)
