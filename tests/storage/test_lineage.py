"""Lineage events on the local store and on a real S3 protocol server (same bodies): OpenLineage shape, FAIL
via the stage() context manager, refusal of refs to missing artifacts, malformed records, and the acceptance
tests with real processes — a writer killed with SIGKILL mid-write, and 4 writers recording at once."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from storage.artifacts import ArtifactStore
from storage.errors import ArtifactNotFoundError, MalformedRecordError
from storage.index import LineageIndex
from storage.lineage import (
    EVENTS_PREFIX,
    LineageRecorder,
    code_provenance,
    config_hash,
    event_refs,
    git_commit,
    parse_event,
    source_commit,
)
from storage.selections import write_selection

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "hunter2-sup3r-s3cret"


def _ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _events(store: ArtifactStore, run_id: str) -> list[dict]:
    rels = store.list_paths(f"{EVENTS_PREFIX}/{run_id}")
    return [parse_event(store.read_rel(r), store.uri(r)) for r in rels]


def test_events_round_trip_openlineage_shape(store):
    config = {"budget": 64, "method": "skmm", "nested": {"b": 2, "a": 1}}
    rec = LineageRecorder(store, flow_run_id="flow-123", git_commit="a" * 40, config=config, skmm_version="1.2.3")
    dataset = store.put_bytes(b"dataset bytes", "dataset", ".parquet")
    with rec.stage("select", [dataset]):
        sel = write_selection(store, _ids(5), method="skmm", params={"m": 8})
        rec.complete("select", selection=sel)
    with rec.stage("train", [sel]):
        model = store.put_bytes(b"weights", "model", ".pt")
        rec.complete("train", [model], model=model, metrics={"accuracy": 0.91, "epochs": 3, "note": "ok"})

    rels = store.list_paths(f"{EVENTS_PREFIX}/{rec.run_id}")
    names = [r.rsplit("/", 1)[1] for r in rels]
    assert [re.sub(r"-[0-9a-f]{32}\.json$", "", n) for n in names] == [
        "000000-select-START", "000001-select-COMPLETE", "000002-train-START", "000003-train-COMPLETE"]
    events = _events(store, rec.run_id)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE", "START", "COMPLETE"]
    first, last = events[0], events[-1]
    assert first["run"]["runId"] == rec.run_id and uuid.UUID(rec.run_id).version == 4
    assert first["run"]["facets"] == {"flow_run_id": "flow-123", "git_commit": "a" * 40, "skmm_version": "1.2.3",
                                      "config_hash": config_hash(config)}
    assert first["job"] == {"namespace": "skmm", "name": "select"}
    assert first["eventTime"].endswith("Z")
    assert first["inputs"] == [{"namespace": first["inputs"][0]["namespace"], "name": dataset.uri,
                                "facets": {"sha256": dataset.sha256, "size": dataset.size, "kind": "dataset"}}]
    refs = event_refs(last)
    assert refs["model"] == model and refs["outputs"] == [model]
    assert event_refs(events[1])["selection"] == sel and event_refs(events[1])["outputs"] == [sel]
    assert last["skmm"]["metrics"] == {"accuracy": 0.91, "epochs": 3, "note": "ok"}
    assert all("budget" not in json.dumps(e) for e in events)  # the config is recorded only by its hash


def test_config_hash_is_canonical():
    assert config_hash({"b": [1, 2], "a": 1}) == config_hash({"a": 1, "b": [1, 2]})
    assert config_hash({"a": 1, "b": [1, 2]}) == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()
    with pytest.raises(ValueError, match="JSON"):
        config_hash({"x": float("nan")})


def test_stage_context_manager_records_fail_and_reraises(store):
    rec = LineageRecorder(store, config={})
    dataset = store.put_bytes(b"d", "dataset")
    with pytest.raises(RuntimeError, match="sketch blew up"), rec.stage("sketch", [dataset]):
        raise RuntimeError(f"sketch blew up at s3://AKIA:{SECRET}@bucket/x\nsecond line of detail")
    events = _events(store, rec.run_id)
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    error = events[1]["skmm"]["error"]
    assert error.startswith("RuntimeError: sketch blew up") and "second line" not in error
    assert events[1]["run"]["facets"]["errorMessage"]["message"] == error
    rec.fail("train", f"timeout talking to https://host/obj?X-Amz-Signature={SECRET}&x=1")
    for rel in store.list_paths(EVENTS_PREFIX):
        assert SECRET not in store.read_rel(rel).decode()


def test_complete_refuses_refs_to_missing_artifacts(store, tmp_path):
    rec = LineageRecorder(store, config={})
    rec.start("train")
    model = store.put_bytes(b"model", "model", ".pt")
    store.fs.rm(store._path(store._rel_from_uri(model.uri)))
    with pytest.raises(ArtifactNotFoundError, match="does not exist") as info:
        rec.complete("train", [model], model=model)
    assert model.uri in str(info.value)
    foreign = ArtifactStore(tmp_path / "elsewhere").put_bytes(b"x", "model")
    with pytest.raises(ArtifactNotFoundError, match=re.escape(foreign.uri)):
        rec.complete("train", [foreign])
    assert [e["eventType"] for e in _events(store, rec.run_id)] == ["START"]  # nothing half-recorded
    with pytest.raises(ValueError, match="stage name"):
        rec.start("Bad Stage/..")


@pytest.mark.parametrize(("data", "why"), [
    (b"not json at all", "not JSON"),
    (b"[1, 2]", "top level"),
    (b'{"eventType": "RUNNING"}', "eventType"),
])
def test_parse_event_names_the_object(data, why):
    with pytest.raises(MalformedRecordError, match=why) as info:
        parse_event(data, "s3://bucket/lineage/events/x/000000-a-START-b.json")
    assert "s3://bucket/lineage/events/x/000000-a-START-b.json" in str(info.value)


def test_parse_event_rejects_bad_fields(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    rec = LineageRecorder(store, config={})
    rec.start("embed")
    good = json.loads(store.read_rel(store.list_paths(EVENTS_PREFIX)[0]))
    for mutate, why in [
        (lambda e: e["run"].update(runId="not-a-uuid"), "runId"),
        (lambda e: e.update(eventTime="yesterday"), "eventTime"),
        (lambda e: e["job"].update(name="../../etc"), "job.name"),
        (lambda e: e.update(inputs=[{"name": "x", "facets": {"sha256": "zz", "size": 1, "kind": "a"}}]), "sha256"),
        (lambda e: e["skmm"].update(seq=-1), "seq"),
        (lambda e: e.update(eventType="FAIL"), "error"),
    ]:
        event = json.loads(json.dumps(good))
        mutate(event)
        with pytest.raises(MalformedRecordError, match=why):
            parse_event(json.dumps(event).encode(), "obj.json")


def _git(cwd, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def _repo_with_commit(root) -> str:
    """A fresh git repository at ``root`` with one commit (of ``pkg/__init__.py``); returns its HEAD."""
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    _git(root, "init", "-q")
    _git(root, "add", "pkg/__init__.py")
    _git(root, "commit", "-q", "-m", "other code")
    return _git(root, "rev-parse", "HEAD")


def _this_checkout() -> str | None:
    """This checkout's HEAD, if the tests run from a git checkout whose skmm package is tracked."""
    try:
        return _git(REPO, "rev-parse", "HEAD") if _git(REPO, "ls-files", "skmm/__init__.py") else None
    except (OSError, subprocess.CalledProcessError):
        return None


def test_source_commit_is_the_package_folders_not_the_callers(tmp_path):
    other = _repo_with_commit(tmp_path / "other")
    assert source_commit(tmp_path / "other" / "pkg") == other  # tracked: a checkout or an editable install
    (tmp_path / "other" / "site" / "pkg").mkdir(parents=True)  # untracked, like a wheel in a venv inside a checkout
    (tmp_path / "other" / "site" / "pkg" / "__init__.py").write_text("")
    assert source_commit(tmp_path / "other" / "site" / "pkg") is None
    (tmp_path / "plain").mkdir()
    assert source_commit(tmp_path / "plain") is None  # no git work tree at all
    assert source_commit(tmp_path / "missing") is None


def test_code_provenance_ignores_the_working_folder_and_git_environment(tmp_path, monkeypatch):
    """Run from inside another repository (cwd and GIT_DIR pointing at it): the recorded commit is still the one
    of the tree skmm was imported from, and the version is the installed distribution's."""
    import importlib.metadata

    other = _repo_with_commit(tmp_path / "other")
    monkeypatch.chdir(tmp_path / "other")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "other" / ".git"))
    code_provenance.cache_clear()
    try:
        code = code_provenance()
        assert code.git_commit == git_commit() == _this_checkout() != other
        assert code.version == importlib.metadata.version("skmm")
    finally:
        code_provenance.cache_clear()


def test_resumed_run_continues_the_sequence(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first = LineageRecorder(store, config={})
    first.start("embed")
    again = LineageRecorder(store, run_id=first.run_id, config={})
    again.start("sketch")
    assert [e["skmm"]["seq"] for e in _events(store, first.run_id)] == [0, 1]
    with pytest.raises(ValueError, match="UUID"):
        LineageRecorder(store, run_id="../../escape", config={})


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


CRASH_WRITER = textwrap.dedent("""
    import json, sys, time
    from storage.artifacts import ArtifactStore
    from storage.lineage import LineageRecorder
    from storage.selections import write_selection
    store = ArtifactStore(sys.argv[1], storage_options=json.loads(sys.argv[2]))
    rec = LineageRecorder(store, run_id=sys.argv[3], config={"crash": True})
    with rec.stage("select"):
        sel = write_selection(store, [f"id-{i}" for i in range(50)], method="uniform")
        rec.complete("select", selection=sel)
    with rec.stage("train", [sel]):
        with store.writer("model", ".pt") as fh:
            fh.write(b"half a model " * 50_000)
            print("ready", flush=True)
            time.sleep(120)
        rec.complete("train", [fh.ref], model=fh.ref)
""")


def test_writer_killed_mid_write_leaves_no_dangling_lineage(store, tmp_path):
    """Acceptance: SIGKILL in the middle of writing a model → no partial artifact, no lineage row pointing at a
    missing artifact; the next run succeeds and is fully auditable."""
    run_id = str(uuid.uuid4())
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, store.url, json.dumps(store.storage_options),
                             run_id], stdout=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL
    assert store.list_paths("objects/model") == []  # no partial model became visible

    index = LineageIndex(tmp_path / "lineage.duckdb")
    stats = index.rebuild(store)
    assert stats["dangling"] == 0 and stats["malformed"] == 0
    assert index.table("artifacts").column("present").to_pylist() == [True]  # only the selection, present
    runs = index.table("runs").to_pylist()
    assert [(r["run_id"], r["status"]) for r in runs] == [(run_id, "started")]
    crashed = index.failed_runs(include_incomplete=True).to_pylist()
    assert [(r["run_id"], r["stage"], r["error"]) for r in crashed] == [(run_id, "train", None)]
    assert index.failed_runs().num_rows == 0

    rec = LineageRecorder(store, config={"crash": False})  # the next run succeeds
    with rec.stage("select"):
        sel = write_selection(store, [f"id-{i}" for i in range(50)], method="uniform")
        rec.complete("select", selection=sel)
    with rec.stage("train", [sel]):
        model = store.put_bytes(b"a whole model", "model", ".pt")
        rec.complete("train", [model], model=model)
    stats = index.rebuild(store)
    assert stats["dangling"] == 0 and stats["runs"] == 2
    assert {r["run_id"]: r["status"] for r in index.table("runs").to_pylist()}[rec.run_id] == "completed"
    assert sorted(index.samples_for_model(model.sha256).column("sample_id").to_pylist()) == sorted(
        f"id-{i}" for i in range(50))


CONCURRENT_WRITER = textwrap.dedent("""
    import json, sys
    from storage.artifacts import ArtifactStore
    from storage.lineage import LineageRecorder
    from storage.selections import write_selection
    store = ArtifactStore(sys.argv[1], storage_options=json.loads(sys.argv[2]))
    rec = LineageRecorder(store, run_id=sys.argv[3], flow_run_id=sys.argv[4], config={"worker": sys.argv[4]})
    print("ready", flush=True)
    sys.stdin.readline()  # all writers start together
    dataset = store.put_bytes(b"shared dataset", "dataset", ".parquet")
    prev = dataset
    for stage in ("embed", "sketch"):
        with rec.stage(stage, [prev]):
            prev = store.put_bytes(f"{stage} of {sys.argv[4]}".encode() * 100, stage, ".npy")
            rec.complete(stage, [prev])
    with rec.stage("select", [prev]):
        sel = write_selection(store, [f"{sys.argv[4]}-{i}" for i in range(200)] + [f"shared-{i}" for i in range(20)],
                              method="skmm")
        rec.complete("select", selection=sel)
    with rec.stage("train", [sel]):
        model = store.put_bytes(f"model of {sys.argv[4]}".encode(), "model", ".pt")
        rec.complete("train", [model], model=model, metrics={"accuracy": 0.5})
    print(model.sha256, flush=True)
""")


def test_four_concurrent_writers_lose_no_record(store, tmp_path):
    """Acceptance: 4 processes record different runs into the same store at once; the rebuilt index holds all
    4 runs and every event."""
    run_ids = [str(uuid.uuid4()) for _ in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, store.url, json.dumps(store.storage_options),
                               run_id, f"worker{i}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=_child_env())
             for i, run_id in enumerate(run_ids)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        models = [p.stdout.readline().strip() for p in procs]
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert len(store.list_paths(EVENTS_PREFIX)) == 4 * 8
    index = LineageIndex(tmp_path / "lineage.duckdb")
    stats = index.rebuild(store)
    assert stats["runs"] == 4 and stats["events"] == 32 and stats["dangling"] == 0 and stats["models"] == 4
    runs = {r["run_id"]: r for r in index.table("runs").to_pylist()}
    assert set(runs) == set(run_ids) and {r["status"] for r in runs.values()} == {"completed"}
    for i, model in enumerate(models):
        ids = set(index.samples_for_model(model).column("sample_id").to_pylist())
        assert ids == {f"worker{i}-{j}" for j in range(200)} | {f"shared-{j}" for j in range(20)}
    assert index.models_for_sample("shared-3").num_rows == 4
