"""A loopback OpenLineage receiver for the tests (importable as ``lineage_receiver``): an HTTP server on a free
127.0.0.1 port, in a thread, that keeps every JSON body POSTed to it — what Marquez's ``/api/v1/lineage`` gets."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pathlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class Receiver:
    """``with Receiver() as rx:`` serves at ``rx.url``; ``rx.events`` are (path, body) pairs; ``status`` is what
    it answers (200, or e.g. 400 to play a backend that refuses events)."""

    def __init__(self, status: int = 200) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.events.append((self.path, json.loads(body)))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def no_openlineage_config(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OpenLineage configuration from this machine: no OPENLINEAGE_* variables, no openlineage.yml in the
    working folder or ~/.openlineage. The whole environment is restored afterwards (the client adds variables)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
