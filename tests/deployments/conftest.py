"""A real standing Prefect server for the deployment tests (server_helpers.standing_server), on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_helpers import Server, standing_server


@pytest.fixture(scope="package")
def server(tmp_path_factory) -> Iterator[Server]:
    """``prefect server start`` with a temporary home and SQLite database, stopped after the deployment tests
    (one start, ~12 s, for both modules: each keeps to its own deployments, work pools and flow runs)."""
    with standing_server(tmp_path_factory.mktemp("prefect-server")) as started:
        yield started
