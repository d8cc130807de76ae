"""ProcessSetting: a process-wide value held by concurrent calls, restored by the last out, also when a call, or
the setting's own write, fails."""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import held_by_another_thread

from skmm._process_setting import ProcessSetting


class Value:
    """A process-wide value whose writes can be made to fail."""

    def __init__(self) -> None:
        self.value, self.fail_on = "process", set()

    def read(self) -> str:
        return self.value

    def write(self, value: str) -> None:
        if value in self.fail_on:
            self.value = "half-written"  # as a setting of several flags, set one by one, would be
            raise OSError(f"cannot write {value}")
        self.value = value


def test_a_failing_call_restores_the_value_and_lets_another_value_in():
    box = Value()
    setting = ProcessSetting("box", box.read, box.write)
    with pytest.raises(ZeroDivisionError), setting.hold("a"):
        assert box.value == "a"
        1 / 0  # noqa: B018
    assert box.value == "process"
    with setting.hold("b"):
        assert box.value == "b"
    assert box.value == "process"


def test_a_write_failing_on_entry_leaves_the_value_as_it_was():
    box = Value()
    box.fail_on = {"a"}
    setting = ProcessSetting("box", box.read, box.write)
    with pytest.raises(OSError, match="cannot write a"), setting.hold("a"):
        pass
    assert box.value == "process"
    with setting.hold("b"):  # not held: nothing waits
        assert box.value == "b"


def test_a_restore_that_fails_still_releases_the_waiting_calls():
    box = Value()
    setting = ProcessSetting("box", box.read, box.write)
    entered, got_in = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait()
        with setting.hold("b"):
            got_in.set()

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    box.fail_on = {"process"}  # the restore on the way out fails
    with pytest.raises(OSError, match="cannot write process"), setting.hold("a"):
        entered.set()
        time.sleep(0.2)  # the other call is waiting for "b" by now
    box.fail_on = set()
    assert got_in.wait(5), "the call waiting for another value was never let in"
    thread.join(5)


def _in_forked_child(check) -> int:
    """``check()`` in a forked child (True: exit 0); the child's exit status, or a failure when it hangs."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            code = 0 if check() else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung")


def _holds_within(setting: ProcessSetting, value: str, seconds: float = 5) -> bool:
    got_in = threading.Event()

    def hold() -> None:
        with setting.hold(value):
            got_in.set()

    threading.Thread(target=hold, daemon=True).start()
    return got_in.wait(seconds)


def test_a_forked_child_drops_the_holds_of_its_parents_other_threads():
    # Another thread holds "a" when the process forks: in the child that thread is gone, so the child must neither
    # wait for it to leave nor keep its value.
    box = Value()
    setting = ProcessSetting("box", box.read, box.write)
    with held_by_another_thread(lambda: setting.hold("a")):
        assert _in_forked_child(lambda: box.value == "process" and _holds_within(setting, "b")
                                and box.value == "process") == 0
        assert box.value == "a"  # the parent's hold is untouched
    assert box.value == "process"


def test_a_forked_child_keeps_the_forking_threads_own_hold():
    box = Value()
    setting = ProcessSetting("box", box.read, box.write)

    def child() -> bool:
        with setting.hold("a"):  # joins the hold it inherited
            pass
        return box.value == "a" and not _holds_within(setting, "b", 0.3)

    with setting.hold("a"):
        assert _in_forked_child(child) == 0
    assert box.value == "process"
