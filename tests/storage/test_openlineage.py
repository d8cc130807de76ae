"""Emission of lineage events through the openlineage-python client's standard configuration: nothing when none
is configured, OPENLINEAGE_URL and openlineage.yml to a real loopback receiver, and a refusing or silent backend
that costs one warning, a bounded wait, and never the run."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from lineage_receiver import Receiver, no_openlineage_config
from openlineage.client.event_v2 import RunEvent

from storage.artifacts import ArtifactStore
from storage.lineage import EVENTS_PREFIX, LineageRecorder, event_record, openlineage_event, parse_event
from storage.openlineage import OpenLineageEmitter, configured_client


@pytest.fixture(autouse=True)
def _clean_env(tmp_path, monkeypatch):
    with no_openlineage_config(tmp_path, monkeypatch):
        yield


def _run(store: ArtifactStore, **kwargs) -> LineageRecorder:
    """One small recorded run: a stage that completes with an output, and one that fails."""
    rec = LineageRecorder(store, config={"t": 1}, attempt=1, **kwargs)
    data = store.put_bytes(b"data", "dataset")
    with rec.stage("embed", [data]) as s:
        s.outputs = [store.put_bytes(b"vectors", "embeddings")]
    with pytest.raises(RuntimeError), rec.stage("sketch", s.outputs):
        raise RuntimeError("no memory")
    return rec


def _stored(store: ArtifactStore, rec: LineageRecorder) -> list[dict]:
    return [parse_event(store.read_rel(r), r) for r in store.list_paths(f"{EVENTS_PREFIX}/{rec.run_id}")]


def test_nothing_configured_emits_nothing(tmp_path, capsys):
    assert configured_client() is None
    rec = _run(ArtifactStore(tmp_path / "store"))
    assert not rec.emitter.enabled
    out = capsys.readouterr()
    assert "eventType" not in out.out + out.err  # the client's console fallback stays off


def test_openlineage_url_sends_every_event(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    with Receiver() as rx:
        monkeypatch.setenv("OPENLINEAGE_URL", rx.url)
        rec = _run(store)
    stored = _stored(store, rec)
    assert [path for path, _ in rx.events] == ["/api/v1/lineage"] * 4
    received = [body for _, body in rx.events]
    assert [(e["eventType"], e["job"]["name"]) for e in received] == [
        ("START", "embed"), ("COMPLETE", "embed"), ("START", "sketch"), ("FAIL", "sketch")]
    for sent, kept in zip(received, stored, strict=True):  # the same event the store keeps (+ the client's tags)
        assert sent["run"]["facets"]["skmm_run"] == kept["run"]["facets"]["skmm_run"]
        assert sent["run"]["runId"] == kept["run"]["runId"] and sent["outputs"] == kept["outputs"]
        assert isinstance(openlineage_event(sent), RunEvent) and event_record(sent) == event_record(kept)
    assert received[3]["run"]["facets"]["errorMessage"]["message"] == "RuntimeError: no memory"


def test_the_callers_git_repository_is_not_reported(tmp_path, monkeypatch):
    """With its sourceCodeLocation facet on, the client describes the working folder's git repository; a run
    started from another repository's folder must not claim that repository's code (skmm_run records the code
    that ran)."""
    import subprocess

    other = tmp_path / "other-repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "remote", "add", "origin", "https://example.invalid/other.git"],
                   check=True)
    monkeypatch.chdir(other)
    monkeypatch.setenv("OPENLINEAGE__FACETS__SOURCE_CODE_LOCATION__DISABLED", "false")
    with Receiver() as rx:
        monkeypatch.setenv("OPENLINEAGE_URL", rx.url)
        _run(ArtifactStore(tmp_path / "store"))
    assert rx.events
    for _, body in rx.events:
        assert "sourceCodeLocation" not in (body["job"].get("facets") or {})
        assert "example.invalid" not in str(body)


def test_openlineage_yml_configures_the_transport(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    with Receiver() as rx:
        config = tmp_path / "ol.yml"
        config.write_text(f"transport:\n  type: http\n  url: {rx.url}\n  endpoint: api/v1/custom\n")
        monkeypatch.setenv("OPENLINEAGE_CONFIG", str(config))
        _run(store)
        assert [path for path, _ in rx.events] == ["/api/v1/custom"] * 4
        rx.events.clear()
        monkeypatch.setenv("OPENLINEAGE_DISABLED", "true")
        _run(store)
        assert rx.events == []


def test_a_refusing_backend_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    store = ArtifactStore(tmp_path / "store")
    with Receiver(status=400) as rx:
        monkeypatch.setenv("OPENLINEAGE_URL", rx.url)
        with caplog.at_level(logging.WARNING, logger="storage.openlineage"):
            rec = _run(store)
    assert len(rx.events) == 1  # tried once, then off for this run
    warnings = [r.getMessage() for r in caplog.records if r.name == "storage.openlineage"]
    assert len(warnings) == 1 and "HTTPError" in warnings[0] and "\n" not in warnings[0]
    assert len(_stored(store, rec)) == 4  # the store's log is whole


def test_a_silent_backend_costs_at_most_the_timeout(tmp_path, monkeypatch, caplog):
    store = ArtifactStore(tmp_path / "store")
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("OPENLINEAGE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="storage.openlineage"):
            rec = _run(store, emitter=OpenLineageEmitter.from_environment(timeout_s=0.5))
        elapsed = time.monotonic() - started
    assert elapsed < 3, elapsed
    warnings = [r.getMessage() for r in caplog.records if r.name == "storage.openlineage"]
    assert len(warnings) == 1 and "no answer within 0.5 s" in warnings[0]
    assert len(_stored(store, rec)) == 4


def test_a_broken_configuration_emits_nothing(tmp_path, monkeypatch, caplog):
    config = tmp_path / "ol.yml"
    config.write_text("transport:\n  type: http\n")  # no url
    monkeypatch.setenv("OPENLINEAGE_CONFIG", str(config))
    with caplog.at_level(logging.WARNING, logger="storage.openlineage"):
        emitter = OpenLineageEmitter.from_environment()
    assert not emitter.enabled and "bad configuration" in caplog.text
    with pytest.raises(ValueError, match="timeout_s"):
        OpenLineageEmitter(None, timeout_s=0)
