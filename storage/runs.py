"""Each run's result (the small JSON dict a flow returns) kept in the store, addressed by run id.

A run started by a schedule leaves no ``--json`` file behind, so the flows also write their result to
``runs/<run_id>.json``: canonical JSON (sorted keys), written once with :meth:`ArtifactStore.put_immutable`
(never overwritten; writing the same bytes again is a no-op) and recorded as the output of a final lineage
stage ``result``, so the lineage index knows where it is. The re-run flows and the CLI read it back by run id
or by a unique prefix of one.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore, sha256_bytes
from storage.errors import ArtifactNotFoundError, MalformedRecordError, StorageError, redact
from storage.lineage import LineageRecorder

__all__ = ["RESULT_KIND", "RESULT_STAGE", "RUNS_PREFIX", "looks_like_run_id", "read_run_result",
           "record_run_result", "resolve_run_id", "write_run_result"]

RUNS_PREFIX = "runs"
RESULT_KIND = "run-result"
RESULT_STAGE = "result"
_ID_PREFIX = re.compile(r"^[0-9a-f][0-9a-f-]{0,35}$")


def _encode(result: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 kept, NaN/Infinity refused; numpy scalars as numbers."""
    def scalar(obj: Any) -> Any:
        if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
            return obj.item()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        text = canonical_json(dict(result), ensure_ascii=False, allow_nan=False, default=scalar)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a run result must be JSON with finite numbers: {exc}") from None
    return text.encode()


def _uuid(run_id: str) -> str:
    try:
        return str(uuid.UUID(str(run_id)))
    except ValueError:
        raise ValueError(f"run_id must be a UUID; got {run_id!r:.80}") from None


def _rel(run_id: str) -> str:
    return f"{RUNS_PREFIX}/{run_id}.json"


def looks_like_run_id(text: str) -> bool:
    """Whether ``text`` could be a run id or a prefix of one (hex digits and dashes, at most 36 characters)."""
    return bool(_ID_PREFIX.match(text.strip().lower()))


def write_run_result(store: ArtifactStore, run_id: str, result: Mapping[str, Any]) -> ArtifactRef:
    """Write ``result`` (without its own ``result`` ref, if any) at ``runs/<run_id>.json``; return its ref.

    The object is never overwritten: writing the same bytes again returns the same ref, different bytes raise
    StorageError. ``result["run_id"]``, when present, must be ``run_id``."""
    rid = _uuid(run_id)
    body = {k: v for k, v in result.items() if k != "result"}  # a ref cannot hash the bytes that hold it
    if "run_id" in body and str(body["run_id"]) != rid:
        raise ValueError(f"result belongs to run {body['run_id']!r:.80}, not {rid}")
    data = _encode(body)
    rel = _rel(rid)
    try:
        uri = store.put_immutable(rel, data)
    except StorageError as exc:  # e.g. "refusing to overwrite": fine if it holds these very bytes
        try:
            same = store.read_rel(rel) == data
        except StorageError:
            same = False
        if not same:
            raise exc from None
        uri = store.uri(rel)
    return ArtifactRef(uri, sha256_bytes(data), len(data), RESULT_KIND)


def record_run_result(rec: LineageRecorder, result: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``result`` as run ``rec.run_id``'s, recorded as the output of lineage stage ``result``.

    Returns ``result`` with the stored object's ref under ``"result"`` (what the flows return)."""
    with rec.stage(RESULT_STAGE) as record:
        ref = write_run_result(rec.store, rec.run_id, result)
        record.outputs = [ref]
    return {**result, "result": ref.to_dict()}


def resolve_run_id(store: ArtifactStore, run_id: str) -> str:
    """The full run id that ``run_id`` (a run id, or a unique prefix of one) names among the stored results.

    A full UUID is returned without listing the store (reading it then tells whether it exists); a prefix lists
    ``runs/`` once. Raises ValueError for text that is no run id or an ambiguous prefix, ArtifactNotFoundError
    when nothing matches."""
    text = str(run_id).strip().lower()
    if not looks_like_run_id(text):
        raise ValueError(f"{run_id!r:.80} is not a run id (a UUID, or a unique prefix of one)")
    if len(text) == 36:
        return _uuid(text)
    names = [p.rsplit("/", 1)[-1] for p in store.list_paths(RUNS_PREFIX, "*.json")]
    matches = sorted(n[:-len(".json")] for n in names if n.startswith(text))
    if not matches:
        raise ArtifactNotFoundError(_missing(store, text))
    if len(matches) > 1:
        shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
        raise ValueError(f"run id prefix {text!r} matches {len(matches)} runs in store {redact(store.url)} "
                         f"({shown}); give more characters")
    return matches[0]


def read_run_result(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """The result a run wrote (see :func:`write_run_result`), with its ref under ``"result"``: the dict the flow
    returned. ``run_id``: a run id or a unique prefix of one. Missing: ArtifactNotFoundError naming both."""
    rid = resolve_run_id(store, run_id)
    rel = _rel(rid)
    try:
        data = store.read_rel(rel)
    except ArtifactNotFoundError:
        raise ArtifactNotFoundError(_missing(store, rid)) from None
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedRecordError(f"run result {store.uri(rel)} is not JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("run_id") != rid:
        raise MalformedRecordError(f"run result {store.uri(rel)} does not hold run {rid}'s result")
    ref = ArtifactRef(store.uri(rel), sha256_bytes(data), len(data), RESULT_KIND)
    return {**body, "result": ref.to_dict()}


def _missing(store: ArtifactStore, run_id: str) -> str:
    return (f"no result for run id {run_id} in store {redact(store.url)} (runs/{run_id}*.json; runs record one "
            "when they complete)")
