"""The report as a user sees it in the Prefect UI, in a real browser: a standing ``prefect server start`` (UI on)
on a free loopback port, ``skmm curate`` (digits, the tiny tower) against it, then Debian's Chromium driven by
Playwright opens the flow run, its Artifacts tab and the ``skmm-report`` artifact. The metric table must be
rendered and the inline plot must have loaded (naturalWidth > 0); a screenshot goes to the test's temp folder.

No browser is downloaded: Playwright's Python package drives /usr/bin/chromium (``.ci/ensure-chromium`` installs
it with apt where it can). Without it, or without Playwright, the test skips and says why; .ci/run sets
SKMM_REQUIRE_BROWSER=1, so in CI it fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from helpers import free_port
from server_helpers import prefect_env, running, wait_healthy

CHROMIUM = os.environ.get("SKMM_TEST_CHROMIUM", "/usr/bin/chromium")
# As root and on a closed network: no sandbox, and none of Chromium's own background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
UI_TIMEOUT_MS = 90_000


def _browser_or_skip() -> None:
    """Skip, naming the reason, without a browser; fail instead where SKMM_REQUIRE_BROWSER is set (.ci/run)."""
    missing = pytest.fail if os.environ.get("SKMM_REQUIRE_BROWSER") else pytest.skip
    if not (pathlib.Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        missing(f"no Chromium at {CHROMIUM}: install Debian's 'chromium' (as root: .ci/ensure-chromium, which "
                "`make test` runs) or set SKMM_TEST_CHROMIUM to a Chromium binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("the playwright Python package is missing: pip install -c constraints.txt -e '.[test]'")


@contextlib.contextmanager
def _prefect_server_with_ui(root: pathlib.Path) -> Iterator[str]:
    """``prefect server start`` with its UI, its own home and SQLite file; the UI is told the real API port (else
    it calls :4200 and shows "Can't connect"). Stopped (its process group) whatever the outcome. Yields the base URL."""
    base = f"http://127.0.0.1:{free_port()}"
    env = prefect_env(root / "server-home", f"{base}/api", PREFECT_UI_API_URL=f"{base}/api",
                      PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                      PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}")
    log = root / "server.log"
    port = base.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port]
    with running(cmd, log, env) as proc:
        wait_healthy(f"{base}/api", proc, log)
        yield base


def _report_artifact(base: str) -> dict:
    """The server's one ``skmm-report`` artifact (read over its REST API)."""
    body = json.dumps({"artifacts": {"key": {"any_": ["skmm-report"]}}}).encode()
    req = urllib.request.Request(f"{base}/api/artifacts/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        (artifact,) = json.load(r)
    return artifact


def test_the_report_renders_in_the_prefect_ui(tmp_path):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with _prefect_server_with_ui(tmp_path) as base:
        skmm = pathlib.Path(sys.executable).with_name("skmm")
        args = ["curate", "digits", "--model", "skmm-tiny-vit", "--budgets", "20,40", "--methods", "skmm_best,uniform",
                "--sketch-dim", "16", "--full-pool-reference", "--store", str(tmp_path / "store")]
        run = subprocess.run([str(skmm), *args], env=prefect_env(tmp_path / "client-home", f"{base}/api"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        artifact = _report_artifact(base)
        assert "data:image/png;base64," in artifact["data"]

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)
                # As a user: the flow run's page, its Artifacts tab, then the report.
                page.goto(f"{base}/runs/flow-run/{artifact['flow_run_id']}")
                page.get_by_role("tablist").get_by_text("Artifacts", exact=True).first.click()
                card = page.get_by_text("skmm-report", exact=True).first
                card.wait_for()
                page.screenshot(path=str(tmp_path / "flow-run-artifacts.png"))
                card.click()
                page.wait_for_url(f"**/artifacts/artifact/{artifact['id']}")
                table = page.locator("table", has_text="skmm_best").first
                table.wait_for()
                image = page.locator("img[src^='data:image/png;base64,']").first
                image.wait_for()
                page.wait_for_function("img => img.complete", arg=image.element_handle())
                natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                page.screenshot(path=str(tmp_path / "skmm-report.png"), full_page=True)
                table_text = table.inner_text()
                body = page.inner_text("body")
            finally:
                browser.close()

    assert natural[0] > 0 and natural[1] > 0, natural  # the plot loaded (715 × 440 at the report's dpi)
    for text in ("method", "n=20", "n=40", "skmm_best", "uniform", "full pool (n=", "±"):
        assert text in table_text, table_text
    assert "accuracy on the test split" in body and "skmm_best kept (chosen on the val split)" in body
    assert (tmp_path / "skmm-report.png").stat().st_size > 10_000
    if os.environ.get("SKMM_UI_SCREENSHOT"):  # keep a copy for a person to look at (README's description)
        shutil.copy(tmp_path / "skmm-report.png", os.environ["SKMM_UI_SCREENSHOT"])
