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
from openlineage.client.event_v2 import RunEvent

from storage.artifacts import ArtifactStore
from storage.errors import ArtifactNotFoundError, MalformedRecordError
from storage.index import LineageIndex
from storage.lineage import (
    EVENTS_PREFIX,
    PRODUCER,
    LineageRecorder,
    code_provenance,
    config_hash,
    dataset_naming,
    event_record,
    event_refs,
    git_commit,
    openlineage_event,
    parse_event,
    schema_url,
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
    records = [event_record(e) for e in events]
    first, last = events[0], events[-1]
    assert uuid.UUID(rec.run_id).version == 4 and {r["run_id"] for r in records} == {rec.run_id}
    # each stage execution is an OpenLineage run of job skmm/<stage>, a child of the skmm run
    assert first["run"]["runId"] == events[1]["run"]["runId"] != last["run"]["runId"] == events[2]["run"]["runId"]
    assert first["run"]["facets"]["parent"]["run"] == {"runId": rec.run_id, "facets": {}}
    assert first["run"]["facets"]["parent"]["job"] == {"namespace": "skmm", "name": "run", "facets": {}}
    assert {k: records[0][k] for k in ("flow_run_id", "attempt", "git_commit", "skmm_version", "config_hash")} == {
        "flow_run_id": "flow-123", "attempt": None, "git_commit": "a" * 40, "skmm_version": "1.2.3",
        "config_hash": config_hash(config)}
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    assert [r["stage"] for r in records] == ["select", "select", "train", "train"]
    assert first["job"]["namespace"] == "skmm" and first["job"]["name"] == "select"
    assert first["eventTime"].endswith("Z") and first["producer"] == PRODUCER
    (item,) = first["inputs"]
    assert (item["namespace"], item["name"]) == dataset_naming(dataset.uri)
    assert item["facets"]["skmm_artifact"] == {"_producer": PRODUCER, "_schemaURL": schema_url(
        "SkmmArtifactDatasetFacet"), "uri": dataset.uri, "sha256": dataset.sha256, "size": dataset.size,
        "kind": "dataset"}
    assert item["facets"]["version"]["datasetVersion"] == dataset.sha256
    for event in events:  # every facet says who wrote it and which schema it follows
        facets = [*event["run"]["facets"].values(), *event["job"]["facets"].values(),
                  *(f for d in event["inputs"] + event["outputs"] for f in d["facets"].values())]
        assert facets and all(f["_producer"] == PRODUCER and f["_schemaURL"].startswith("https://") for f in facets)
    assert records[0]["inputs"] == [dataset] and records[0]["outputs"] == []
    assert records[-1]["model"] == model and records[-1]["outputs"] == [model]
    assert records[1]["selection"] == sel and records[1]["outputs"] == [sel]
    assert event_refs(last) == {k: records[-1][k] for k in ("inputs", "outputs", "selection", "model")}
    assert records[-1]["metrics"] == {"accuracy": 0.91, "epochs": 3, "note": "ok"}
    assert all("budget" not in json.dumps(e) for e in events)  # the config is recorded only by its hash
    assert all(isinstance(openlineage_event(e), RunEvent) for e in events)


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
    error = event_record(events[1])["error"]
    assert error.startswith("RuntimeError: sketch blew up") and "second line" not in error
    assert events[1]["run"]["facets"]["errorMessage"]["message"] == error
    assert events[1]["run"]["facets"]["errorMessage"]["programmingLanguage"] == "python"
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
        (lambda e: e.update(inputs=[{"namespace": "file", "name": "/x", "facets": {"skmm_artifact": {
            "uri": "file:///x", "sha256": "zz", "size": 1, "kind": "a"}}}]), "sha256"),
        (lambda e: e.update(inputs=[{"namespace": "file", "name": "/x", "facets": {}}]), "skmm_artifact"),
        (lambda e: e["run"]["facets"]["skmm_run"].update(seq=-1), "seq"),
        (lambda e: e["run"]["facets"]["skmm_run"].update(attempt=0), "attempt"),
        (lambda e: e["run"]["facets"]["skmm_run"].update(stage="other"), "stage"),
        (lambda e: e["run"]["facets"]["skmm_run"].update(run_id="nope"), "run_id"),
        (lambda e: e["run"]["facets"].pop("skmm_run"), "skmm_run"),
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
    assert [event_record(e)["seq"] for e in _events(store, first.run_id)] == [0, 1]
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
    # The killed writer's staging file (an S3 store stages in <temp>/skmm-staging-<uid>, swept by clean_staging
    # after a day) goes to the test's own temp folder, not the system's.
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, store.url, json.dumps(store.storage_options),
                             run_id], stdout=subprocess.PIPE, text=True, env={**_child_env(), "TMPDIR": str(tmp_path)})
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


@pytest.mark.parametrize(("uri", "expected"), [
    ("file:///srv/store/objects/model/ab.pt", ("file", "/srv/store/objects/model/ab.pt")),
    ("/srv/store/objects/model/ab.pt", ("file", "/srv/store/objects/model/ab.pt")),
    ("file://host7/srv/x.pt", ("file://host7", "/srv/x.pt")),
    ("s3://bucket/pool/objects/model/ab.pt", ("s3://bucket", "pool/objects/model/ab.pt")),
    ("s3a://bucket/k", ("s3://bucket", "k")),
    ("gs://bucket/a/b", ("gs://bucket", "a/b")),
    ("gcs://bucket/a/b", ("gs://bucket", "a/b")),
    ("abfs://container/a/b", ("abfs://container", "a/b")),
    ("memory:///root/objects/x", ("memory", "/root/objects/x")),
])
def test_dataset_naming_follows_the_openlineage_convention(uri, expected):
    assert dataset_naming(uri) == expected


def test_dataset_naming_of_a_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dataset_naming("objects/x.pt") == ("file", str(tmp_path / "objects" / "x.pt"))
    with pytest.raises(ValueError, match="non-empty"):
        dataset_naming("")


# Format-1 events exactly as stores written before OpenLineage hold them (made by the previous recorder).
_SHA_D = "b277fd623676a525c29b9eb155afc8c9010681814ceafb2d7627f47b9a232576"
_SHA_M = "9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"
_RUN = "0b5c6a3e-8d1f-4e57-9a43-2c8f1d6e7b90"
_FACETS = ('"config_hash":"5041bf1f713df204784353e82f6a4a535931cb64f1f4b4a5aeaffcb720918b22","flow_run_id":"flow-1",'
           '"git_commit":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","skmm_version":"0.1.0"')
_MODEL = f'{{"kind":"model","sha256":"{_SHA_M}","size":5,"uri":"file:///tmp/v1/objects/model/{_SHA_M}.pt"}}'
V1_COMPLETE = (
    '{"eventTime":"2026-11-29T12:36:18.538513Z","eventType":"COMPLETE","inputs":[],"job":{"name":"train",'
    f'"namespace":"skmm"}},"outputs":[{{"facets":{{"kind":"model","sha256":"{_SHA_M}","size":5}},'
    f'"name":"file:///tmp/v1/objects/model/{_SHA_M}.pt","namespace":"file"}}],'
    '"producer":"https://github.com/skmm/skmm/storage/lineage",'
    f'"run":{{"facets":{{{_FACETS}}},"runId":"{_RUN}"}},'
    '"schemaURL":"https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent",'
    f'"skmm":{{"error":null,"metrics":{{"accuracy":0.5,"note":null}},"model":{_MODEL},"selection":null,"seq":1,'
    '"stage":"train","version":1}}').encode()
V1_FAIL = (
    '{"eventTime":"2026-11-29T12:36:18.550438Z","eventType":"FAIL","inputs":[{"facets":{"kind":"dataset",'
    f'"sha256":"{_SHA_D}","size":7}},"name":"file:///tmp/v1/objects/dataset/{_SHA_D}.parquet","namespace":"file"}}],'
    '"job":{"name":"evaluate","namespace":"skmm"},"outputs":[],'
    '"producer":"https://github.com/skmm/skmm/storage/lineage",'
    f'"run":{{"facets":{{{_FACETS},"errorMessage":{{"message":"RuntimeError: boom","programmingLanguage":"python"}}}},'
    f'"runId":"{_RUN}"}},"schemaURL":"https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent",'
    '"skmm":{"error":"RuntimeError: boom","metrics":null,"model":null,"selection":null,"seq":3,"stage":"evaluate",'
    '"version":1}}').encode()


def test_format_1_events_still_parse_into_the_same_record():
    from storage.artifacts import ArtifactRef

    model = ArtifactRef(f"file:///tmp/v1/objects/model/{_SHA_M}.pt", _SHA_M, 5, "model")
    done = event_record(parse_event(V1_COMPLETE, "old.json"))
    assert done == {"run_id": _RUN, "event_type": "COMPLETE", "event_time": "2026-11-29T12:36:18.538513Z",
                    "stage": "train", "seq": 1, "flow_run_id": "flow-1", "attempt": None, "git_commit": "a" * 40,
                    "skmm_version": "0.1.0", "config_hash": _FACETS[15:79],
                    "error": None, "metrics": {"accuracy": 0.5, "note": None}, "inputs": [], "outputs": [model],
                    "selection": None, "model": model}
    failed = event_record(parse_event(V1_FAIL, "old.json"))
    assert (failed["event_type"], failed["stage"], failed["seq"], failed["error"]) == (
        "FAIL", "evaluate", 3, "RuntimeError: boom")
    assert failed["inputs"][0].kind == "dataset" and failed["inputs"][0].size == 7
    bad = json.loads(V1_FAIL)
    bad["skmm"]["error"] = None
    with pytest.raises(MalformedRecordError, match=r"old\.json.*skmm\.error"):
        parse_event(json.dumps(bad).encode(), "old.json")


def test_stage_writes_complete_from_what_the_block_set(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    rec = LineageRecorder(store, config={}, attempt=2)
    dataset = store.put_bytes(b"d", "dataset")
    with rec.stage("select", [dataset]) as s:
        s.selection = write_selection(store, _ids(3), method="uniform")
        s.metrics = {"n": 3}
    with rec.stage("train", [s.selection]) as t:
        model = store.put_bytes(b"weights", "model", ".pt")
        t.outputs, t.model = [model], model
    with rec.stage("check"):  # nothing set: a bare COMPLETE
        pass
    with rec.stage("explicit", [dataset]):  # the old call style: COMPLETE once, not twice
        rec.complete("explicit", [model], metrics={"x": 1})
    records = [event_record(e) for e in _events(store, rec.run_id)]
    assert [(r["stage"], r["event_type"]) for r in records] == [
        (st, et) for st in ("select", "train", "check", "explicit") for et in ("START", "COMPLETE")]
    assert records[1]["selection"] == s.selection and records[1]["metrics"] == {"n": 3}
    assert records[3]["model"] == model and records[3]["outputs"] == [model]
    assert records[5]["outputs"] == [] and records[7]["metrics"] == {"x": 1}
    assert {r["attempt"] for r in records} == {2}


def test_stage_records_fail_when_its_complete_is_refused(tmp_path):
    """An output that does not exist when the block ends: no COMPLETE, a FAIL naming it, and the error raised."""
    store = ArtifactStore(tmp_path / "store")
    foreign = ArtifactStore(tmp_path / "elsewhere").put_bytes(b"x", "model")
    rec = LineageRecorder(store, config={})
    with pytest.raises(ArtifactNotFoundError), rec.stage("train") as s:
        s.outputs = [foreign]
    records = [event_record(e) for e in _events(store, rec.run_id)]
    assert [r["event_type"] for r in records] == ["START", "FAIL"]
    assert records[1]["error"].startswith("ArtifactNotFoundError") and foreign.uri in records[1]["error"]


@pytest.mark.parametrize("attempt", [0, -1, True, 1.0, "1"])
def test_attempt_must_be_a_positive_integer(tmp_path, attempt):
    with pytest.raises(ValueError, match="attempt"):
        LineageRecorder(ArtifactStore(tmp_path / "store"), config={}, attempt=attempt)
