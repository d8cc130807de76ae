"""An object store whose endpoint freezes (moto's server stopped with SIGSTOP) fails a request, and a whole stage
with its retries, within a bound computed from the store limits, with one line naming the endpoint; once the
endpoint is back, a rerun completes. The limits come from the environment, so these tests use seconds."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import boto3
import pytest
from botocore.exceptions import ReadTimeoutError
from helpers import free_port
from prefect import flow

from storage.errors import StoreUnavailableError
from storage.lineage import LineageRecorder
from tasks.ingest import ingest
from tasks.retry import stage_bound_s
from tasks.store import StoreTimeouts, open_store, result_storage, store_spec

SLACK_S = 4.0  # scheduling and Python overhead on a loaded 2-core machine


@pytest.fixture
def endpoint(monkeypatch):
    """moto's S3 server as a process of its own (so it can be frozen), with a bucket; yields (url, process)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3r-s3cret-value")  # moto takes any credentials
    port = free_port()
    server = pathlib.Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="frozen")
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=30)


def _one_line_naming(exc: BaseException, endpoint: str) -> str:
    text = str(exc)
    assert len(text.splitlines()) == 1 and f"endpoint {endpoint}" in text and "SKMM_STORE_READ_TIMEOUT" in text
    assert "sup3r-s3cret-value" not in text
    return text


def test_the_default_limits_fail_a_stage_within_two_minutes():
    default = StoreTimeouts()
    assert (default.connect_s, default.read_s, default.attempts) == (3.0, 8.0, 2)
    assert stage_bound_s(default.request_bound_s()) <= 120


def test_limits_come_from_the_environment_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("SKMM_STORE_CONNECT_TIMEOUT", "1.5")
    monkeypatch.setenv("SKMM_STORE_ATTEMPTS", "3")
    assert StoreTimeouts.from_env() == StoreTimeouts(connect_s=1.5, read_s=8.0, attempts=3)
    for var, bad in (("SKMM_STORE_READ_TIMEOUT", "soon"), ("SKMM_STORE_READ_TIMEOUT", "-1"),
                     ("SKMM_STORE_ATTEMPTS", "1.5")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=f"{var} must be"):
            open_store(store_spec("s3://bucket/x", "http://127.0.0.1:9"))
        monkeypatch.delenv(var)


def test_a_frozen_endpoint_fails_each_request_in_bounded_time(endpoint, monkeypatch):
    url, server = endpoint
    monkeypatch.setenv("SKMM_STORE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("SKMM_STORE_READ_TIMEOUT", "1")
    bound = StoreTimeouts.from_env().request_bound_s()
    st = open_store(store_spec("s3://frozen/store", url))
    ref = st.put_bytes(b"0123456789", "blob")
    os.kill(server.pid, signal.SIGSTOP)
    try:
        for request in (lambda: st.get_bytes(ref), lambda: st.put_bytes(b"new bytes", "blob"), st.check):
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError) as info:
                request()
            assert time.monotonic() - start <= bound + SLACK_S
            _one_line_naming(info.value, url)
        for body in (b"x", os.urandom(8 * 2**20)):  # aiohttp sets no timeout while it sends a body
            start = time.monotonic()
            with pytest.raises(ReadTimeoutError):
                st.fs.pipe_file("frozen/store/raw", body)
            assert time.monotonic() - start <= bound + SLACK_S
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert st.get_bytes(ref) == b"0123456789"
    assert st.get_bytes(st.put_bytes(b"new bytes", "blob")) == b"new bytes"


def test_a_stage_fails_within_its_bound_and_a_rerun_completes(prefect_api, endpoint, monkeypatch):
    url, server = endpoint
    monkeypatch.setenv("SKMM_STORE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("SKMM_STORE_READ_TIMEOUT", "2")
    monkeypatch.setenv("SKMM_STORE_ATTEMPTS", "1")
    spec = store_spec("s3://frozen/store", url)
    source = {"kind": "digits", "image_size": 8, "val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}
    frozen_at: list[float] = []

    @flow(name="ingest-stage")
    def ingest_stage(freeze: bool) -> dict:
        st = open_store(spec)
        opts = {"result_storage": result_storage(spec)}
        rec = LineageRecorder(st, config={"test": "frozen endpoint"})
        with rec.stage("ingest"):
            if freeze:  # after the stage's START event: the task, its retry and the FAIL event meet a frozen store
                os.kill(server.pid, signal.SIGSTOP)
                frozen_at.append(time.monotonic())
            result = ingest.with_options(**opts)(source, spec)
            rec.complete("ingest")
        return result

    with pytest.raises(StoreUnavailableError) as info:
        ingest_stage(freeze=True)
    elapsed = time.monotonic() - frozen_at[0]
    os.kill(server.pid, signal.SIGCONT)
    _one_line_naming(info.value, url)
    assert elapsed <= stage_bound_s() + 2 * SLACK_S, elapsed  # two attempts, each computing the digits first

    done = ingest_stage(freeze=False)
    assert done["n_samples"] == 1797
