"""A test-only fault switch: fail a curate run at a chosen late stage, so a retry of the failed run can be tested.

Inert unless ``SKMM_FAULT_FILE`` is set. While the file it names exists and holds a stage kind (``finetune``,
``validate`` or ``evaluate``), that stage raises :class:`InjectedFault` before its task starts; delete the file
(the operator's "fix") and a retry of the run gets past it. The variable reaches a scheduled run like any job
environment, e.g. a deployment's job variables ``{"env": {"SKMM_FAULT_FILE": "/tmp/fault"}}``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

__all__ = ["FAULT_ENV", "FAULT_STAGES", "InjectedFault", "check_fault"]

FAULT_ENV = "SKMM_FAULT_FILE"
FAULT_STAGES = ("finetune", "validate", "evaluate")


class InjectedFault(RuntimeError):
    """Raised at a stage that the fault file names."""


def check_fault(stage: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise InjectedFault if ``SKMM_FAULT_FILE`` names a file that exists and holds ``stage``; else nothing.

    ``stage`` is a stage kind (one of FAULT_STAGES) or a recorded stage name such as ``finetune.uniform.n20.s0``.
    A file holding anything but a stage kind is a ValueError, so a typo cannot leave a test's run unfailed."""
    kind = stage.split(".", 1)[0]
    if kind not in FAULT_STAGES:
        raise ValueError(f"no fault point at stage {stage!r}; fault points: {', '.join(FAULT_STAGES)}")
    path = (os.environ if environ is None else environ).get(FAULT_ENV)
    if not path:
        return
    try:
        named = pathlib.Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return
    if named not in FAULT_STAGES:
        raise ValueError(f"{FAULT_ENV}={path} holds {named[:40]!r}; expected one of {', '.join(FAULT_STAGES)}")
    if named == kind:
        raise InjectedFault(f"fault injected at {kind} by {FAULT_ENV}={path}")
