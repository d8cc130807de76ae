"""Shared fixtures: a real S3 protocol server (moto, on a free loopback port) and stores on local disk and S3.

Tests that take ``store`` run once against each backend with the same body.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

import pytest
from helpers import free_port, s3_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Dummy credentials for moto only; nothing here reaches a real cloud.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Hermetic: no lineage to an OpenLineage backend this machine may configure (the OpenLineage tests set their own).
os.environ["OPENLINEAGE_DISABLED"] = "true"
# Hermetic: the memo of verified artifacts (storage/verify_memo.py) in the system temp folder, never ~/.cache; the
# Prefect workers the tests start inherit it.
os.environ["SKMM_CACHE_DIR"] = tempfile.mkdtemp(prefix="skmm-test-cache-")


def _remove_test_cache(path: str = os.environ["SKMM_CACHE_DIR"], owner: int = os.getpid()) -> None:
    """The session's memo folder goes with the session (each run left one in the temp folder); only the process
    that made it removes it, not a forked child that exits normally."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_remove_test_cache)


@pytest.fixture(autouse=True)
def _no_block_workers_between_tests():
    """Each test starts without the shared block workers a previous one left lingering (forked before that test's
    spies, they would not run them)."""
    import sys

    clip = sys.modules.get("skmm.models.clip")
    if clip is not None:
        clip.shutdown_worker_pools()
    yield


def _open_dask_clusters() -> set:
    """The Dask clusters this process started and has not closed (none before distributed is imported)."""
    import sys

    spec = sys.modules.get("distributed.deploy.spec")
    if spec is None:
        return set()
    return {c for c in list(spec.SpecCluster._instances) if getattr(getattr(c, "status", None), "name", "") != "closed"}


@pytest.fixture(autouse=True)
def _no_dask_cluster_left_running():
    """A test closes the Dask clusters it starts. One left open (a cluster built only to read its spec) kept its
    scheduler and workers running through every later test and logged into closed streams at the session's exit."""
    before = _open_dask_clusters()
    yield
    left = _open_dask_clusters() - before
    for cluster in left:
        cluster.close(timeout=30)
    assert not left, f"the test left Dask clusters running: {sorted(c.name for c in left)}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (or an endpoint given by SKMM_TEST_S3_ENDPOINT, e.g. from .ci/run)."""
    given = os.environ.get("SKMM_TEST_S3_ENDPOINT")
    if given:
        yield given
        return
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the S3 server; returns (bucket name, storage options)."""
    import boto3

    name = f"skmm-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    return name, s3_options(s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An ArtifactStore on a temporary folder, then on a fresh S3 bucket: same test body for both."""
    from storage.artifacts import ArtifactStore

    if request.param == "local":
        return ArtifactStore(tmp_path / "store")
    name, options = request.getfixturevalue("s3_bucket")
    return ArtifactStore(f"s3://{name}/store", storage_options=options)
