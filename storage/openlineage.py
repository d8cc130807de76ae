"""Send lineage events to an OpenLineage backend (Marquez, DataHub, OpenMetadata, ...) through the
``openlineage-python`` client's standard configuration.

The client is configured as its documentation says: ``OPENLINEAGE_URL`` (with ``OPENLINEAGE_ENDPOINT`` and
``OPENLINEAGE_API_KEY``), an ``openlineage.yml`` (``$OPENLINEAGE_CONFIG``, the working folder, or
``~/.openlineage/``), or ``OPENLINEAGE__TRANSPORT__*`` variables; ``OPENLINEAGE_DISABLED=true`` turns it off.
When nothing is configured, nothing is emitted (the client's own fallback would print every event to the
console). The store's event log (:mod:`storage.lineage`) stays the record of truth: emission is best effort —
a failure, or a backend that does not answer within ``timeout_s``, costs one warning line and stops emission
for the rest of that recorder's run; it never fails the run.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from storage.errors import redact

__all__ = ["DEFAULT_TIMEOUT_S", "OpenLineageEmitter", "configured_client"]

DEFAULT_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


def configured_client() -> Any | None:
    """An ``OpenLineageClient`` built from the standard configuration, or None when none is configured (or
    ``OPENLINEAGE_DISABLED=true``)."""
    if os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return None
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.noop import NoopConfig, NoopTransport

    if not os.environ.get("OPENLINEAGE_URL"):
        # the configuration the client would read (explicit, file, env vars), without its console fallback
        probe = OpenLineageClient(transport=NoopTransport(NoopConfig()))
        if not (probe.config.transport or {}).get("type"):
            return None
    client = OpenLineageClient()
    # The client's sourceCodeLocation facet (when a configuration turns it on) describes the git repository of
    # the caller's working folder, not the code that ran; the skmm_run facet records that (version, commit).
    client.config.facets.source_code_location.disabled = True
    return client


class OpenLineageEmitter:
    """Emit events through ``client`` (None: emit nothing), each within ``timeout_s`` seconds.

    :meth:`emit` never raises: the first failure or timeout logs one warning and disables the emitter."""

    def __init__(self, client: Any | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive; got {timeout_s!r}")
        self.client = client
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()  # one event at a time, in the order they were recorded

    @classmethod
    def from_environment(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> OpenLineageEmitter:
        """The emitter the standard configuration asks for; a broken configuration warns and emits nothing."""
        try:
            return cls(configured_client(), timeout_s)
        except Exception as exc:  # a bad openlineage.yml must not stop a run
            log.warning("OpenLineage emission off: bad configuration (%s: %s)", type(exc).__name__,
                        " ".join(str(exc).split())[:200])
            return cls(None, timeout_s)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def __repr__(self) -> str:
        kind = getattr(getattr(self.client, "transport", None), "kind", None)
        return f"OpenLineageEmitter(transport={kind!r}, timeout_s={self.timeout_s})"

    def emit(self, event: Any) -> bool:
        """Send one ``openlineage.client`` RunEvent; True if it was delivered."""
        with self._lock:
            client = self.client
            if client is None:
                return False
            errors: list[BaseException] = []

            def send() -> None:
                try:
                    client.emit(event)
                except BaseException as exc:  # reported by the caller's thread
                    errors.append(exc)

            worker = threading.Thread(target=send, name="openlineage-emit", daemon=True)
            worker.start()
            worker.join(self.timeout_s)
            if worker.is_alive():
                why = f"no answer within {self.timeout_s:g} s"
            elif errors:
                why = f"{type(errors[0]).__name__}: {' '.join(str(errors[0]).split())[:200]}"
            else:
                return True
            self.client = None
            log.warning("OpenLineage emission failed (%s); no more events sent for this run", redact(why))
            return False
