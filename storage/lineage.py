"""Run lineage as immutable, OpenLineage-shaped event objects in the artifact store.

Every pipeline run writes its own small JSON events — START, COMPLETE or FAIL per stage — at
``lineage/events/<run_id>/<seq>-<stage>-<eventType>-<uuid>.json`` with :meth:`ArtifactStore.put_immutable`.
Nothing is ever updated in place, so any number of processes on any number of machines can record runs into the
same store (local folder or S3) without locks; the DuckDB index (:mod:`storage.index`) is derived from these
objects and can be rebuilt at any time.

An event looks like an OpenLineage RunEvent::

    {"eventType": "COMPLETE", "eventTime": "2026-01-01T00:00:00.000000Z",
     "producer": "skmm", "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent",
     "run": {"runId": "<uuid>", "facets": {"flow_run_id": ..., "git_commit": ..., "skmm_version": ...,
                                           "config_hash": ...}},
     "job": {"namespace": "skmm", "name": "<stage>"},
     "inputs": [{"namespace": "file", "name": "<uri>", "facets": {"sha256": ..., "size": ..., "kind": ...}}],
     "outputs": [...],
     "skmm": {"version": 1, "seq": 3, "stage": "<stage>", "selection": <ref|null>, "model": <ref|null>,
              "metrics": {...} | null, "error": "<one line>" | null}}

Guarantees: a COMPLETE event is written only after every artifact it names exists (a ref pointing at a missing
artifact is refused with ArtifactNotFoundError), so a writer killed at any point leaves, at worst, a START
without its COMPLETE — never a record pointing at nothing. Error strings are redacted; the config is recorded
only by its hash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import ArtifactNotFoundError, MalformedRecordError, redact

__all__ = [
    "EVENTS_PREFIX",
    "EVENT_TYPES",
    "CodeProvenance",
    "LineageRecorder",
    "canonical_json",
    "code_provenance",
    "config_hash",
    "event_record",
    "event_refs",
    "git_commit",
    "parse_event",
    "source_commit",
]

EVENTS_PREFIX = "lineage/events"
EVENT_TYPES = ("START", "COMPLETE", "FAIL")
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent"
PRODUCER = "https://github.com/skmm/skmm/storage/lineage"
NAMESPACE = "skmm"
FORMAT_VERSION = 1
_STAGE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_ERROR = 2000
_MAX_ID = 200


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept, NaN/Infinity refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 hex of the config's canonical JSON."""
    try:
        text = canonical_json(dict(config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable with finite numbers: {exc}") from None
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CodeProvenance:
    """The code that is running: the installed ``skmm`` distribution's version, and the git commit of the
    source tree its packages were imported from (None for a wheel install, or outside a git checkout)."""

    version: str | None
    git_commit: str | None


@functools.cache
def code_provenance(package: str = "skmm") -> CodeProvenance:
    """The running code's provenance (computed once per process: the code in memory does not change).

    Never the caller's working folder: the commit is that of the folder ``package`` was imported from."""
    try:
        version = importlib.metadata.version("skmm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return CodeProvenance(version, source_commit(locations[0]) if locations else None)


def git_commit() -> str | None:
    """The git commit of the running code's source tree (see :func:`code_provenance`), or None."""
    return code_provenance().git_commit


def source_commit(package_dir: str | os.PathLike) -> str | None:
    """``HEAD`` of the git work tree holding ``package_dir``, if the package is tracked there (a checkout, an
    editable install), else None (a wheel in site-packages, even in a venv inside a checkout; no git).

    Git's repository-redirecting environment (``GIT_DIR``, ``GIT_WORK_TREE``, ...) is ignored: the answer
    depends on where the package lies, never on the caller's folder or shell."""
    folder = pathlib.Path(package_dir).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                                 check=False, env=env, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if not folder.is_dir():
        return None
    top = git("rev-parse", "--show-toplevel")
    if not top or not folder.is_relative_to(pathlib.Path(top).resolve()):
        return None
    if not git("ls-files", "--", "."):  # nothing of the package is tracked: installed files inside a checkout
        return None
    commit = git("rev-parse", "--verify", "--quiet", "HEAD")
    return commit if commit and _COMMIT.match(commit) else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return redact(line[:_MAX_ERROR])


def _namespace(uri: str) -> str:
    """OpenLineage dataset namespace: scheme://authority (``s3://bucket``), or the bare scheme for local files."""
    scheme, _, rest = uri.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}" if authority else scheme


def _dataset(ref: ArtifactRef) -> dict[str, Any]:
    return {"namespace": _namespace(ref.uri), "name": ref.uri,
            "facets": {"sha256": ref.sha256, "size": ref.size, "kind": ref.kind}}


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    out: dict[str, Any] = {}
    for name, value in dict(metrics).items():
        if not isinstance(name, str) or not name or len(name) > _MAX_ID:
            raise ValueError(f"metric names must be non-empty strings; got {name!r:.80}")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[name] = value
        elif isinstance(value, int | float):
            if not math.isfinite(value):
                raise ValueError(f"metric {name!r} is not finite: {value!r}")
            out[name] = value.item() if hasattr(value, "item") else value
        elif hasattr(value, "item"):  # numpy / torch scalars
            out.update(_check_metrics({name: value.item()}) or {})
        else:
            raise ValueError(f"metric {name!r} must be a number, string, bool or None; got {type(value).__name__}")
    return out


class LineageRecorder:
    """Record one run's stages as immutable events in ``store``.

    ``run_id`` (a UUID string; a fresh uuid4 by default — pass an existing one to resume a run),
    ``flow_run_id`` (Prefect's), ``git_commit`` and ``skmm_version`` (the running code: see
    :func:`code_provenance`; None records none) and ``config`` (hashed, never stored) describe the run.
    """

    def __init__(self, store: ArtifactStore, run_id: str | None = None, flow_run_id: str | None = None,
                 git_commit: str | None = None, config: Mapping[str, Any] | None = None,
                 skmm_version: str | None = None) -> None:
        self.store = store
        if run_id is None:
            self.run_id = str(uuid.uuid4())
            self._seq = 0
        else:
            try:
                self.run_id = str(uuid.UUID(str(run_id)))
            except ValueError:
                raise ValueError(f"run_id must be a UUID; got {run_id!r:.80}") from None
            # resuming: continue the sequence after the events already recorded for this run
            seqs = [int(m.group(1)) for p in store.list_paths(f"{EVENTS_PREFIX}/{self.run_id}")
                    if (m := re.match(r"^(\d{6})-", p.rsplit("/", 1)[-1]))]
            self._seq = max(seqs, default=-1) + 1
        if flow_run_id is not None and (not isinstance(flow_run_id, str) or len(flow_run_id) > _MAX_ID):
            raise ValueError(f"flow_run_id must be a short string; got {flow_run_id!r:.80}")
        if git_commit is not None and (not isinstance(git_commit, str) or not _COMMIT.match(git_commit)):
            raise ValueError(f"git_commit must be 7-64 lowercase hex characters; got {git_commit!r:.80}")
        if skmm_version is not None and (not isinstance(skmm_version, str) or not skmm_version
                                         or len(skmm_version) > _MAX_ID):
            raise ValueError(f"skmm_version must be a short string; got {skmm_version!r:.80}")
        self.flow_run_id = str(flow_run_id) if flow_run_id is not None else None
        self.git_commit = git_commit
        self.skmm_version = skmm_version
        self.config_hash = config_hash(config or {})
        self._lock = threading.Lock()  # stages of one run may record from several threads

    def __repr__(self) -> str:
        return f"LineageRecorder(run_id={self.run_id!r}, store={self.store!r})"

    # ------------------------------------------------------------------ events
    def start(self, stage: str, inputs: Sequence[ArtifactRef] = ()) -> str:
        """Record that ``stage`` started reading ``inputs`` (which must exist); returns the event's URI."""
        refs = self._checked(stage, inputs, "input")
        return self._emit(stage, "START", inputs=refs)

    def complete(self, stage: str, outputs: Sequence[ArtifactRef] = (), selection: ArtifactRef | None = None,
                 model: ArtifactRef | None = None, metrics: Mapping[str, Any] | None = None) -> str:
        """Record that ``stage`` produced ``outputs`` (and possibly a selection, a model, metrics).

        Every ref (outputs, selection, model) must already exist in the store, else ArtifactNotFoundError names
        it and nothing is written. The selection and model are listed among the outputs too.
        """
        for name, ref in (("selection", selection), ("model", model)):
            if ref is not None and not isinstance(ref, ArtifactRef):
                raise TypeError(f"{name} must be an ArtifactRef; got {type(ref).__name__}")
        if selection is not None and selection.kind != "selection":
            raise ValueError(f"selection ref {selection.uri} has kind {selection.kind!r}, expected 'selection'")
        all_outputs = list(outputs) + [r for r in (selection, model) if r is not None]
        refs = self._checked(stage, all_outputs, "output")
        return self._emit(stage, "COMPLETE", outputs=refs, selection=selection, model=model,
                          metrics=_check_metrics(metrics))

    def fail(self, stage: str, error: str) -> str:
        """Record that ``stage`` failed with ``error`` (reduced to one redacted line)."""
        self._check_stage(stage)
        return self._emit(stage, "FAIL", error=_one_line(error) or "unknown error")

    @contextlib.contextmanager
    def stage(self, name: str, inputs: Sequence[ArtifactRef] = ()) -> Iterator[LineageRecorder]:
        """``with recorder.stage("sketch", [emb]):`` writes START, and FAIL (then re-raises) if the block raises.

        COMPLETE is the block's job (call :meth:`complete` once its outputs are stored).
        """
        self.start(name, inputs)
        try:
            yield self
        except BaseException as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            with contextlib.suppress(Exception):  # never mask the original error
                self.fail(name, f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
            raise

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_stage(stage: str) -> None:
        if not isinstance(stage, str) or not _STAGE.match(stage):
            raise ValueError(f"stage name must match {_STAGE.pattern}; got {stage!r:.80}")

    def _checked(self, stage: str, refs: Sequence[ArtifactRef], role: str) -> list[ArtifactRef]:
        self._check_stage(stage)
        unique: dict[str, ArtifactRef] = {}
        for ref in refs:
            if not isinstance(ref, ArtifactRef):
                raise TypeError(f"{role}s must be ArtifactRefs; got {type(ref).__name__}")
            if redact(ref.uri) != ref.uri:
                raise ValueError(f"{role} uri carries credentials; refusing to record {redact(ref.uri)}")
            unique.setdefault(ref.uri, ref)
        for ref in unique.values():
            if not self.store.exists(ref):
                raise ArtifactNotFoundError(f"{role} artifact {ref.uri} does not exist in {redact(self.store.url)}; "
                                            f"refusing to record stage {stage!r} of run {self.run_id}")
        return list(unique.values())

    def _emit(self, stage: str, event_type: str, inputs: Sequence[ArtifactRef] = (),
              outputs: Sequence[ArtifactRef] = (), selection: ArtifactRef | None = None,
              model: ArtifactRef | None = None, metrics: dict[str, Any] | None = None,
              error: str | None = None) -> str:
        with self._lock:
            seq = self._seq
            self._seq += 1
        event: dict[str, Any] = {
            "eventType": event_type,
            "eventTime": _now(),
            "producer": PRODUCER,
            "schemaURL": SCHEMA_URL,
            "run": {"runId": self.run_id, "facets": {"flow_run_id": self.flow_run_id, "git_commit": self.git_commit,
                                                     "skmm_version": self.skmm_version,
                                                     "config_hash": self.config_hash}},
            "job": {"namespace": NAMESPACE, "name": stage},
            "inputs": [_dataset(r) for r in inputs],
            "outputs": [_dataset(r) for r in outputs],
            "skmm": {"version": FORMAT_VERSION, "seq": seq, "stage": stage,
                     "selection": selection.to_dict() if selection else None,
                     "model": model.to_dict() if model else None, "metrics": metrics, "error": error},
        }
        if error is not None:  # OpenLineage's standard run facet for failures
            event["run"]["facets"]["errorMessage"] = {"message": error, "programmingLanguage": "python"}
        data = canonical_json(event).encode()
        rel = f"{EVENTS_PREFIX}/{self.run_id}/{seq:06d}-{stage}-{event_type}-{uuid.uuid4().hex}.json"
        return self.store.put_immutable(rel, data)


# ---------------------------------------------------------------------- reading events
def _fail(name: str, why: str) -> MalformedRecordError:
    return MalformedRecordError(f"malformed lineage record {name}: {why}")


def _ref_from_dataset(item: Any, name: str, where: str) -> ArtifactRef:
    if not isinstance(item, dict) or not isinstance(item.get("facets"), dict):
        raise _fail(name, f"{where} entry must be an object with facets")
    facets = item["facets"]
    try:
        return ArtifactRef.from_dict({"uri": item.get("name"), "sha256": facets.get("sha256"),
                                      "size": facets.get("size"), "kind": facets.get("kind")})
    except MalformedRecordError as exc:
        raise _fail(name, f"{where}: {exc}") from None


def parse_event(data: bytes, name: str = "<event>") -> dict[str, Any]:
    """Decode and validate one event object; raises MalformedRecordError naming ``name`` (the object's URI).

    Returns the event dict; refs are validated (use :func:`event_refs` for ArtifactRef objects).
    """
    try:
        event = json.loads(data.decode("utf-8") if isinstance(data, bytes | bytearray) else data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(name, f"not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(event, dict):
        raise _fail(name, "top level must be an object")
    etype = event.get("eventType")
    if etype not in EVENT_TYPES:
        raise _fail(name, f"eventType must be one of {', '.join(EVENT_TYPES)}; got {etype!r:.40}")
    etime = event.get("eventTime")
    try:
        parsed_time = dt.datetime.fromisoformat(etime) if isinstance(etime, str) else None
    except ValueError:
        parsed_time = None
    if parsed_time is None or parsed_time.tzinfo is None:
        raise _fail(name, f"eventTime must be an ISO time with a zone; got {etime!r:.60}")
    run = event.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("facets", {}), dict):
        raise _fail(name, "run must be an object with runId and facets")
    try:
        uuid.UUID(str(run.get("runId")))
    except ValueError:
        raise _fail(name, f"run.runId must be a UUID; got {run.get('runId')!r:.60}") from None
    facets = run.get("facets", {})
    for key in ("flow_run_id", "git_commit", "skmm_version"):
        if facets.get(key) is not None and not isinstance(facets.get(key), str):
            raise _fail(name, f"run.facets.{key} must be a string or null")
    if not isinstance(facets.get("config_hash"), str) or not _SHA.match(facets["config_hash"]):
        raise _fail(name, "run.facets.config_hash must be a sha256 hex digest")
    job = event.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not _STAGE.match(job["name"]):
        raise _fail(name, "job.name must be a stage name")
    for where in ("inputs", "outputs"):
        items = event.get(where, [])
        if not isinstance(items, list):
            raise _fail(name, f"{where} must be a list")
        for item in items:
            _ref_from_dataset(item, name, where)
    sk = event.get("skmm")
    if not isinstance(sk, dict):
        raise _fail(name, "missing the skmm facet")
    seq = sk.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise _fail(name, f"skmm.seq must be a non-negative integer; got {seq!r:.40}")
    for key in ("selection", "model"):
        if sk.get(key) is not None:
            try:
                ArtifactRef.from_dict(sk[key])
            except MalformedRecordError as exc:
                raise _fail(name, f"skmm.{key}: {exc}") from None
    metrics = sk.get("metrics")
    if metrics is not None and (not isinstance(metrics, dict) or any(
            not isinstance(v, int | float | str | bool) and v is not None for v in metrics.values())):
        raise _fail(name, "skmm.metrics must map names to numbers, strings, booleans or null")
    if sk.get("error") is not None and not isinstance(sk["error"], str):
        raise _fail(name, "skmm.error must be a string or null")
    if etype == "FAIL" and not sk.get("error"):
        raise _fail(name, "a FAIL event needs skmm.error")
    return event


def event_refs(event: dict[str, Any]) -> dict[str, Any]:
    """The refs of a parsed event: {'inputs': [...], 'outputs': [...], 'selection': ref|None, 'model': ref|None}."""
    def refs(items: list) -> list[ArtifactRef]:
        return [ArtifactRef.from_dict({"uri": i["name"], **{k: i["facets"][k] for k in ("sha256", "size", "kind")}})
                for i in items]

    sk = event["skmm"]
    return {"inputs": refs(event.get("inputs", [])), "outputs": refs(event.get("outputs", [])),
            "selection": ArtifactRef.from_dict(sk["selection"]) if sk.get("selection") else None,
            "model": ArtifactRef.from_dict(sk["model"]) if sk.get("model") else None}


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """A parsed event as one flat record, whatever the event format version: the contract the index builds on.

    Keys: run_id, event_type, event_time (ISO str), stage, seq, flow_run_id, attempt (int|None), git_commit,
    skmm_version, config_hash, error, metrics (dict|None), and the refs of :func:`event_refs` (inputs, outputs,
    selection, model).
    """
    facets = event["run"].get("facets", {})
    sk = event["skmm"]
    attempt = facets.get("attempt")
    return {"run_id": event["run"]["runId"], "event_type": event["eventType"], "event_time": event["eventTime"],
            "stage": event["job"]["name"], "seq": sk["seq"], "flow_run_id": facets.get("flow_run_id"),
            "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
            "git_commit": facets.get("git_commit"), "skmm_version": facets.get("skmm_version"),
            "config_hash": facets.get("config_hash"), "error": sk.get("error"), "metrics": sk.get("metrics"),
            **event_refs(event)}
