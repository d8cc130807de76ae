"""``skmm curate`` without ``--sketch-dim``: one wide sketch, SkMM's m chosen from its spectrum, and
the choice recorded in the selection's params and in the run's lineage (issue 10)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from storage.artifacts import ArtifactRef
from storage.lineage import EVENTS_PREFIX, event_record, parse_event
from storage.selections import read_selection, selection_metadata
from tasks.store import open_store, store_spec


def test_curate_without_sketch_dim_uses_and_records_the_automatic_m(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "CRITICAL"}
    proc = subprocess.run([str(pathlib.Path(sys.executable).with_name("skmm")), "curate", "digits", "--model",
                           "skmm-tiny-vit", "--budgets", "20,40", "--methods", "skmm", "--store", str(store), "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = open_store(store_spec(store))
    events = [event_record(parse_event(st.read_rel(r), r)) for r in st.list_paths(EVENTS_PREFIX)]
    chosen = {e["stage"]: e["metrics"]["sketch_dim"] for e in events
              if e["stage"].startswith("select.") and e["event_type"] == "COMPLETE"}
    assert set(chosen) == {"select.skmm.n20.s0", "select.skmm.n40.s0"}
    assert set(chosen.values()) == {32}  # max(64, 2 × signal rank), at most the tiny tower's 32 feature dimensions
    # the sketch's moment and the sketch reduced to the chosen m (issue 8): computed once, in their own stage, and
    # inputs of every select stage beside the sketch
    (moment_stage,) = [e for e in events if e["stage"] == "sketch_moment" and e["event_type"] == "COMPLETE"]
    moment, reduced = moment_stage["outputs"]
    assert reduced.kind == "sketch" and moment_stage["metrics"] == {"sketch_dim": 32}
    starts = [e for e in events if e["stage"].startswith("select.") and e["event_type"] == "START"]
    assert len(starts) == 2
    for e in starts:
        assert {moment.sha256, reduced.sha256} <= {ref.sha256 for ref in e["inputs"]} and len(e["inputs"]) == 3
    (start,) = [e for e in events if e["stage"] == "ingest" and e["event_type"] == "START"]
    sketch_events = [e for e in events if e["stage"] == "sketch" and e["event_type"] == "COMPLETE"]
    assert sketch_events and start["run_id"] == sketch_events[0]["run_id"]
    selections = [e["selection"] for e in events if e["stage"].startswith("select.") and e["event_type"] == "COMPLETE"]
    for ref in selections:
        params = selection_metadata(read_selection(st, ref))["params"]
        assert params["sketch_dim"] == "auto"
        auto = params["auto_sketch"]
        assert auto["m"] in chosen.values() and auto["m_max"] == 32  # the tiny tower's 32-d features: no wider sketch
        assert 0 < auto["energy_share"] <= 1 and "signal rank" in auto["rule"] and auto["signal_rank"] >= 1
    # a reselect from that run chooses m again (its sketch is the wide one), and records it
    run_id = json.loads(proc.stdout)["run_id"]
    again = subprocess.run([str(pathlib.Path(sys.executable).with_name("skmm")), "reselect", run_id, "--budgets", "30",
                            "--methods", "skmm", "--store", str(store), "--json"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    (row,) = json.loads(again.stdout)["results"]
    params = selection_metadata(read_selection(st, ArtifactRef.from_dict(row["selection"])))["params"]
    assert params["sketch_dim"] == "auto" and params["auto_sketch"]["m"] == 32
