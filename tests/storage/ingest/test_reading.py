"""The bounded reader pool: results in input order, never more than ``window`` items in flight."""

from __future__ import annotations

import threading
import time

import pytest

from storage.ingest.reading import ordered_map


def test_ordered_map_keeps_order_and_bounds_the_items_in_flight():
    lock = threading.Lock()
    state = {"taken": 0, "done": 0, "most": 0}

    def items():
        for i in range(200):
            with lock:
                state["taken"] += 1
                state["most"] = max(state["most"], state["taken"] - state["done"])
            yield i

    def slow_square(i: int) -> int:
        time.sleep(0.001 * (i % 3))  # finish out of order
        return i * i

    out = []
    for value in ordered_map(slow_square, items(), workers=4, window=6):
        out.append(value)
        with lock:
            state["done"] += 1
    assert out == [i * i for i in range(200)]
    assert state["most"] <= 7  # the window, plus the one being handed over


def test_ordered_map_stops_reading_when_the_consumer_fails():
    taken = []

    def items():
        for i in range(10_000):
            taken.append(i)
            yield i

    with pytest.raises(RuntimeError):
        for value in ordered_map(lambda i: i, items(), workers=2, window=4):
            if value == 10:
                raise RuntimeError("stop")
    assert len(taken) < 20


def test_ordered_map_runs_inline_items_in_the_callers_thread_and_keeps_the_order():
    import threading

    caller = threading.get_ident()
    seen: dict[int, int] = {}

    def work(i: int) -> int:
        seen[i] = threading.get_ident()
        return i * 10

    out = list(ordered_map(work, range(40), workers=3, window=5, inline=lambda i: i % 3 == 0))
    assert out == [i * 10 for i in range(40)]
    assert all((seen[i] == caller) == (i % 3 == 0) for i in range(40))
