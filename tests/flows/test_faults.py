"""The test-only fault switch (flows.faults): inert unless set, fires only at the stage its file names, and stops
firing once the file is gone (the operator's fix before a retry). The retry itself: tests/deployments/test_retry.py.
"""

from __future__ import annotations

import pytest

from flows.faults import FAULT_ENV, InjectedFault, check_fault


def test_inert_unless_set_and_the_file_exists(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    check_fault("finetune")
    check_fault("evaluate.uniform.n20.s0")
    check_fault("evaluate", {FAULT_ENV: ""})
    check_fault("evaluate", {FAULT_ENV: str(tmp_path / "no-such-file")})


def test_fires_at_the_named_stage_only_while_the_file_exists(tmp_path, monkeypatch):
    fault = tmp_path / "fault"
    fault.write_text("evaluate\n")
    monkeypatch.setenv(FAULT_ENV, str(fault))
    check_fault("finetune")
    check_fault("validate.skmm_best.n20.s0.skmm")  # validation is a stage of its own
    with pytest.raises(InjectedFault, match=f"^fault injected at evaluate by {FAULT_ENV}={fault}$"):
        check_fault("evaluate.uniform.n20.s0")
    fault.write_text("finetune")
    with pytest.raises(InjectedFault, match="fault injected at finetune"):
        check_fault("finetune")
    fault.unlink()
    check_fault("finetune")


def test_bad_contents_and_unknown_fault_points_are_clear_errors(tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("finetuen")
    with pytest.raises(ValueError, match=r"holds 'finetuen'; expected one of finetune, validate, evaluate"):
        check_fault("evaluate", {FAULT_ENV: str(fault)})
    with pytest.raises(ValueError, match="no fault point at stage 'ingest'"):
        check_fault("ingest", {})
