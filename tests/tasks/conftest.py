"""Fixtures for the task tests: a Prefect API to save result blocks in and run small flows against."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def prefect_api():
    """The flow tests' session test server when it is up (test servers must not nest), else one for this module."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    running = SubprocessASGIServer._instances.get(None)
    if running is not None and get_current_settings().api.url == running.api_url:
        yield
        return
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def embedded_rows(monkeypatch) -> list[int]:
    """How many images each call of the real embed_images received (it still runs: a spy, not a mock)."""
    import tasks.embed as embed_module

    calls: list[int] = []
    real = embed_module.embed_images

    def counting(images, spec, **kwargs):
        images = list(images)
        calls.append(len(images))
        return real(images, spec, **kwargs)

    monkeypatch.setattr(embed_module, "embed_images", counting)
    return calls
