"""One process-wide setting held by concurrent calls (torch's thread count, CUDA's math flags, a warning filter).

The pipeline's stages run two shard calls at once in threads of one process. A call that saved such a setting on
entry and restored it on exit restored it under the other call, which then ran on with the process's value.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ProcessSetting"]


class ProcessSetting:
    """A process-wide setting, read and written by ``read()`` / ``write(value)``, held by the calls that need it.

    The first call in saves what it finds and applies its value; calls wanting the same value join it; a call
    wanting another waits until every holder has left; the last one out restores what the first found. A thread
    that holds one value and asks for another gets a RuntimeError, not a deadlock. A write that fails on the way
    in is undone; one that fails on the way out still lets the waiting calls in. A call wanting another value
    waits until no call holds the current one: there is no queue, so calls with the held value may keep joining
    (the stages never mix values). A forked child keeps only the forking thread's holds (:meth:`_forked`). (Seen
    before this: TF32 convolutions in an fp32 call, a process left with one call's thread count, a warning filter
    left behind.)
    """

    def __init__(self, name: str, read: Callable[[], Any], write: Callable[[Any], None]) -> None:
        self.name, self._read, self._write = name, read, write
        self._changed = threading.Condition()
        self._value: Any = None
        self._saved: Any = None
        self._holders = 0
        self._mine = threading.local()
        if hasattr(os, "register_at_fork"):
            me = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (setting := me()) is not None and setting._forked())

    def _forked(self) -> None:
        """In a forked child only the forking thread goes on: the other threads' holds are gone with them (they
        would have made a call wanting another value wait for ever), and their lock too. When the forking thread
        held nothing, what they held is put back."""
        self._changed = threading.Condition()
        own = getattr(self._mine, "depth", 0)
        if self._holders == own:
            return
        self._holders = own
        if own == 0:
            with contextlib.suppress(Exception):  # the value they held stays: better than no child
                self._write(self._saved)
            self._value = self._saved = None

    @contextlib.contextmanager
    def hold(self, value: Any) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        if depth and value != self._value:
            raise RuntimeError(f"this thread already holds {self.name} at {self._value!r}; a nested call cannot "
                               f"change it to {value!r}")
        with self._changed:
            self._changed.wait_for(lambda: self._holders == 0 or self._value == value)
            if self._holders == 0:
                saved = self._read()
                try:
                    self._write(value)
                except BaseException:
                    with contextlib.suppress(Exception):  # a write that failed halfway: put back what was there
                        self._write(saved)
                    raise
                self._saved, self._value = saved, value
            self._holders += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._changed:
                self._holders -= 1
                if self._holders == 0:
                    saved = self._saved
                    self._value = self._saved = None
                    self._changed.notify_all()  # before the write: a failing restore must not strand the waiters
                    self._write(saved)
