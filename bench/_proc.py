"""Process memory readings for the benchmarks, without torch (bench/_common imports it, and some benchmarks'
children must stay small)."""

from __future__ import annotations

import pathlib


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak resident memory in MiB: the kernel's ``VmHWM`` of ``/proc/<pid>/status``.

    Not ``ru_maxrss``: that survives exec, so a spawned child would report its parent's peak. It counts the pages
    a forked child still shares with its parent, and the shared libraries'."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024.0
