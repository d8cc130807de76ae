"""Run lineage as immutable OpenLineage RunEvents in the artifact store, also sent to an OpenLineage backend.

Every pipeline run writes its own small JSON events — START, COMPLETE or FAIL per stage — at
``lineage/events/<run_id>/<seq>-<stage>-<eventType>-<uuid>.json`` with :meth:`ArtifactStore.put_immutable`.
Nothing is ever updated in place, so any number of processes on any number of machines can record runs into the
same store (local folder or S3) without locks; the DuckDB index (:mod:`storage.index`) is derived from these
objects and can be rebuilt at any time. Each event is also emitted through the ``openlineage-python`` client's
standard configuration (:mod:`storage.openlineage`; nothing is sent when none is configured).

Events are built with the client's classes (format version 2). Each stage execution is an OpenLineage run of
the job ``skmm/<stage>`` with its own runId, whose standard ``parent`` facet names the skmm run
(job ``skmm/run``, runId = the skmm run id); datasets are named by the OpenLineage naming convention
(:func:`dataset_naming`: a local file is namespace ``file``, name = its absolute path; ``s3://bucket/key`` is
namespace ``s3://bucket``, name ``key``). skmm's own data ride in custom facets with ``_producer`` and
``_schemaURL`` (schemas in ``storage/schemas/``)::

    run.facets.skmm_run = {run_id, seq, stage, flow_run_id, attempt, git_commit, skmm_version, config_hash,
                           selection, model, metrics, error, version: 2}
    run.facets.errorMessage                     (FAIL: the standard ErrorMessageRunFacet)
    inputs/outputs[].facets.skmm_artifact = {uri, sha256, size, kind}   (+ the standard ``version`` = sha256)

Stores written before hold format-1 events (skmm data in a top-level ``skmm`` object): :func:`parse_event`,
:func:`event_refs` and :func:`event_record` read both.

Guarantees: a COMPLETE event is written only after every artifact it names exists (a ref pointing at a missing
artifact is refused with ArtifactNotFoundError), so a writer killed at any point leaves, at worst, a START
without its COMPLETE — never a record pointing at nothing. Error strings are redacted; the config is recorded
only by its hash. Null values are dropped from the events (the client's serialisation).
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

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated.base import DatasetFacet, JobFacet, RunFacet
from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
from openlineage.client.generated.error_message_run import ErrorMessageRunFacet
from openlineage.client.generated.job_type_job import JobTypeJobFacet
from openlineage.client.generated.parent_run import Job as ParentJob
from openlineage.client.generated.parent_run import ParentRunFacet
from openlineage.client.generated.parent_run import Run as ParentRun
from openlineage.client.naming.dataset import GCS, S3, LocalFileSystem, RemoteFileSystem
from openlineage.client.serde import Serde
from openlineage.client.uuid import generate_new_uuid

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import ArtifactNotFoundError, MalformedRecordError, redact

__all__ = [
    "EVENTS_PREFIX",
    "EVENT_TYPES",
    "CodeProvenance",
    "LineageRecorder",
    "SkmmArtifactDatasetFacet",
    "SkmmRunFacet",
    "Stage",
    "code_provenance",
    "config_hash",
    "dataset_naming",
    "event_record",
    "event_refs",
    "git_commit",
    "openlineage_event",
    "parse_event",
    "schema_url",
    "source_commit",
]

EVENTS_PREFIX = "lineage/events"
EVENT_TYPES = ("START", "COMPLETE", "FAIL")
NAMESPACE = "skmm"  # the OpenLineage job namespace of every stage, and of the parent job "run"
PARENT_JOB = "run"
FORMAT_VERSION = 2
PROJECT_URL = "https://github.com/skmm/skmm"  # the project's source repository: producer and facet schema URLs
RUN_FACET = "skmm_run"
ARTIFACT_FACET = "skmm_artifact"
_STAGE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_ERROR = 2000
_MAX_ID = 200


def _distribution_version() -> str | None:
    try:
        return importlib.metadata.version("skmm")
    except importlib.metadata.PackageNotFoundError:
        return None


_VERSION = _distribution_version()
_REF = f"v{_VERSION}" if _VERSION else "main"
PRODUCER = f"{PROJECT_URL}/tree/{_REF}"  # OpenLineage: "a git url with a given tag or sha"


def schema_url(facet: str) -> str:
    """The ``_schemaURL`` of one of skmm's custom facets (a JSON schema in storage/schemas/)."""
    return f"{PROJECT_URL}/blob/{_REF}/storage/schemas/{facet}.json#/$defs/{facet}"


def _canonical(obj: Any) -> str:
    """Lineage's canonical JSON: sorted keys, no whitespace, UTF-8 kept, NaN/Infinity refused."""
    return canonical_json(obj, ensure_ascii=False, allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 hex of the config's canonical JSON."""
    try:
        text = _canonical(dict(config))
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
    version = _distribution_version()
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


_OBJECT_STORES = {"s3": "s3", "s3a": "s3", "s3n": "s3", "gs": "gs", "gcs": "gs"}


def dataset_naming(uri: str) -> tuple[str, str]:
    """(namespace, name) of an artifact URI by the OpenLineage dataset naming convention.

    A local file (``file:///abs/path`` or a bare path): ``("file", "/abs/path")``; ``s3://bucket/key`` (also
    s3a/s3n): ``("s3://bucket", "key")``; ``gs://`` / ``gcs://``: ``("gs://bucket", "key")``; any other fsspec URL
    with an authority (``scheme://authority/path``): ``("scheme://authority", "path")``, and without one
    (``memory:///path``): ``("scheme", "/path")``."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"an artifact uri must be a non-empty string; got {uri!r:.80}")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        naming: Any = LocalFileSystem(path=os.path.abspath(uri))
        return naming.get_namespace(), naming.get_name()
    scheme = scheme.lower()
    authority, _, path = rest.partition("/")
    if scheme in ("file", "local"):
        naming = (RemoteFileSystem(host=authority, path=f"/{path}") if authority
                  else LocalFileSystem(path=f"/{path}"))
    elif _OBJECT_STORES.get(scheme) == "s3":
        naming = S3(bucket_name=authority, object_key=path)
    elif _OBJECT_STORES.get(scheme) == "gs":
        naming = GCS(bucket_name=authority, object_key=path)
    elif authority:
        return f"{scheme}://{authority}", path
    else:
        return scheme, f"/{path}"
    return naming.get_namespace(), naming.get_name()


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


# ---------------------------------------------------------------------- skmm's custom OpenLineage facets
@attr.define
class SkmmRunFacet(RunFacet):
    """skmm's record of one stage event (schema: storage/schemas/SkmmRunFacet.json)."""

    run_id: str
    seq: int
    stage: str
    config_hash: str
    version: int = FORMAT_VERSION
    flow_run_id: str | None = None
    attempt: int | None = None
    git_commit: str | None = None
    skmm_version: str | None = None
    selection: dict | None = None
    model: dict | None = None
    metrics: dict | None = None
    error: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return schema_url("SkmmRunFacet")


@attr.define
class SkmmArtifactDatasetFacet(DatasetFacet):
    """The artifact behind a dataset: its URI, sha256, size and kind (storage/schemas/SkmmArtifactDatasetFacet.json)."""

    uri: str
    sha256: str
    size: int
    kind: str

    @staticmethod
    def _get_schema() -> str:
        return schema_url("SkmmArtifactDatasetFacet")


def _ol_dataset(cls: type[InputDataset | OutputDataset], ref: ArtifactRef) -> InputDataset | OutputDataset:
    namespace, name = dataset_naming(ref.uri)
    return cls(namespace=namespace, name=name, facets={
        ARTIFACT_FACET: SkmmArtifactDatasetFacet(uri=ref.uri, sha256=ref.sha256, size=ref.size, kind=ref.kind,
                                                 producer=PRODUCER),
        "version": DatasetVersionDatasetFacet(datasetVersion=ref.sha256, producer=PRODUCER)})


class Stage:
    """One open stage of a :class:`LineageRecorder` (what ``with recorder.stage(...) as s`` gives).

    Set what the stage produced — ``s.outputs`` (refs), ``s.selection``, ``s.model``, ``s.metrics`` — and the
    recorder writes COMPLETE from them when the block exits cleanly (FAIL if it raises)."""

    def __init__(self, recorder: LineageRecorder, name: str) -> None:
        self.recorder = recorder
        self.name = name
        self.outputs: Sequence[ArtifactRef] = ()
        self.selection: ArtifactRef | None = None
        self.model: ArtifactRef | None = None
        self.metrics: Mapping[str, Any] | None = None
        self.completed = False  # set once COMPLETE is written (an explicit recorder.complete() inside the block)

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, completed={self.completed})"


class LineageRecorder:
    """Record one run's stages as immutable events in ``store``, and emit them to OpenLineage.

    ``run_id`` (a UUID string; a fresh uuid4 by default — pass an existing one to resume a run),
    ``flow_run_id`` (Prefect's), ``attempt`` (which try of that flow run this is: Prefect's run count, 1 first),
    ``git_commit`` and ``skmm_version`` (the running code: see :func:`code_provenance`; None records none) and
    ``config`` (hashed, never stored) describe the run. ``emitter``: where events also go
    (default: :meth:`storage.openlineage.OpenLineageEmitter.from_environment`).
    """

    def __init__(self, store: ArtifactStore, run_id: str | None = None, flow_run_id: str | None = None,
                 git_commit: str | None = None, config: Mapping[str, Any] | None = None,
                 skmm_version: str | None = None, attempt: int | None = None, emitter: Any | None = None) -> None:
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
        if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
            raise ValueError(f"attempt must be a positive integer; got {attempt!r:.40}")
        self.flow_run_id = str(flow_run_id) if flow_run_id is not None else None
        self.git_commit = git_commit
        self.skmm_version = skmm_version
        self.attempt = attempt
        self.config_hash = config_hash(config or {})
        if emitter is None:
            from storage.openlineage import OpenLineageEmitter

            emitter = OpenLineageEmitter.from_environment()
        self.emitter = emitter
        self._lock = threading.Lock()  # stages of one run may record from several threads
        self._stage_runs: dict[str, str] = {}  # stage → the OpenLineage runId of its current execution
        self._open: dict[str, list[Stage]] = {}  # stage → its open `with stage()` blocks

    def __repr__(self) -> str:
        return f"LineageRecorder(run_id={self.run_id!r}, store={self.store!r})"

    # ------------------------------------------------------------------ events
    def start(self, stage: str, inputs: Sequence[ArtifactRef] = ()) -> str:
        """Record that ``stage`` started reading ``inputs`` (which must exist); returns the event's URI."""
        refs = self._checked(stage, inputs, "input")
        with self._lock:
            self._stage_runs[stage] = str(generate_new_uuid())
        return self._emit(stage, "START", inputs=refs)

    def complete(self, stage: str, outputs: Sequence[ArtifactRef] = (), selection: ArtifactRef | None = None,
                 model: ArtifactRef | None = None, metrics: Mapping[str, Any] | None = None) -> str:
        """Record that ``stage`` produced ``outputs`` (and possibly a selection, a model, metrics).

        Every ref (outputs, selection, model) must already exist in the store, else ArtifactNotFoundError names
        it and nothing is written. The selection and model are listed among the outputs too. Inside a
        ``with stage(...)`` block of the same name, this replaces the COMPLETE the block would write on exit.
        """
        for name, ref in (("selection", selection), ("model", model)):
            if ref is not None and not isinstance(ref, ArtifactRef):
                raise TypeError(f"{name} must be an ArtifactRef; got {type(ref).__name__}")
        if selection is not None and selection.kind != "selection":
            raise ValueError(f"selection ref {selection.uri} has kind {selection.kind!r}, expected 'selection'")
        all_outputs = list(outputs) + [r for r in (selection, model) if r is not None]
        refs = self._checked(stage, all_outputs, "output")
        uri = self._emit(stage, "COMPLETE", outputs=refs, selection=selection, model=model,
                         metrics=_check_metrics(metrics))
        with self._lock:
            open_blocks = [s for s in self._open.get(stage, []) if not s.completed]
            if open_blocks:
                open_blocks[-1].completed = True
            self._stage_runs.pop(stage, None)
        return uri

    def fail(self, stage: str, error: str) -> str:
        """Record that ``stage`` failed with ``error`` (reduced to one redacted line)."""
        self._check_stage(stage)
        uri = self._emit(stage, "FAIL", error=_one_line(error) or "unknown error")
        with self._lock:
            self._stage_runs.pop(stage, None)
        return uri

    @contextlib.contextmanager
    def stage(self, name: str, inputs: Sequence[ArtifactRef] = ()) -> Iterator[Stage]:
        """``with recorder.stage("sketch", [emb]) as s: ...; s.outputs = [sketch]`` writes START, then COMPLETE
        from what the block set on ``s`` when it exits cleanly, or FAIL (and re-raises) if it raises — also if
        the COMPLETE itself is refused (a ref to a missing artifact)."""
        self.start(name, inputs)
        block = Stage(self, name)
        with self._lock:
            self._open.setdefault(name, []).append(block)
        try:
            yield block
            if not block.completed:
                self.complete(name, block.outputs, selection=block.selection, model=block.model,
                              metrics=block.metrics)
        except BaseException as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            with contextlib.suppress(Exception):  # never mask the original error
                self.fail(name, f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
            raise
        finally:
            with self._lock:
                self._open[name].remove(block)
                if not self._open[name]:
                    del self._open[name]

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

    def _event(self, seq: int, stage: str, event_type: str, inputs: Sequence[ArtifactRef],
               outputs: Sequence[ArtifactRef], selection: ArtifactRef | None, model: ArtifactRef | None,
               metrics: dict[str, Any] | None, error: str | None) -> Any:
        """The event as the client's RunEvent."""
        with self._lock:
            stage_run = self._stage_runs.get(stage)
        if stage_run is None:  # COMPLETE/FAIL without a START in this process (e.g. a resumed run)
            stage_run = str(generate_new_uuid())
        facets: dict[str, Any] = {
            "parent": ParentRunFacet(run=ParentRun(runId=self.run_id),
                                     job=ParentJob(namespace=NAMESPACE, name=PARENT_JOB), producer=PRODUCER),
            RUN_FACET: SkmmRunFacet(
                run_id=self.run_id, seq=seq, stage=stage, config_hash=self.config_hash,
                flow_run_id=self.flow_run_id, attempt=self.attempt, git_commit=self.git_commit,
                skmm_version=self.skmm_version, selection=selection.to_dict() if selection else None,
                model=model.to_dict() if model else None, metrics=metrics, error=error, producer=PRODUCER)}
        if error is not None:
            facets["errorMessage"] = ErrorMessageRunFacet(
                message=error, programmingLanguage="python", producer=PRODUCER)
        job = Job(namespace=NAMESPACE, name=stage, facets={"jobType": JobTypeJobFacet(
            processingType="BATCH", integration="SKMM", jobType="TASK", producer=PRODUCER)})
        return RunEvent(eventType=RunState(event_type), eventTime=_now(), run=Run(runId=stage_run, facets=facets),
                        job=job, inputs=[_ol_dataset(InputDataset, r) for r in inputs],
                        outputs=[_ol_dataset(OutputDataset, r) for r in outputs], producer=PRODUCER)

    def _emit(self, stage: str, event_type: str, inputs: Sequence[ArtifactRef] = (),
              outputs: Sequence[ArtifactRef] = (), selection: ArtifactRef | None = None,
              model: ArtifactRef | None = None, metrics: dict[str, Any] | None = None,
              error: str | None = None) -> str:
        with self._lock:
            seq = self._seq
            self._seq += 1
        event = self._event(seq, stage, event_type, inputs, outputs, selection, model, metrics, error)
        data = _canonical(Serde.to_dict(event)).encode()
        rel = f"{EVENTS_PREFIX}/{self.run_id}/{seq:06d}-{stage}-{event_type}-{uuid.uuid4().hex}.json"
        uri = self.store.put_immutable(rel, data)
        self.emitter.emit(event)  # best effort, after the store holds the record
        return uri


# ---------------------------------------------------------------------- reading events
def _fail(name: str, why: str) -> MalformedRecordError:
    return MalformedRecordError(f"malformed lineage record {name}: {why}")


def _ref(data: Any, name: str, where: str) -> ArtifactRef:
    try:
        return ArtifactRef.from_dict(data)
    except MalformedRecordError as exc:
        raise _fail(name, f"{where}: {exc}") from None


def _v1_ref_from_dataset(item: Any, name: str, where: str) -> ArtifactRef:
    if not isinstance(item, dict) or not isinstance(item.get("facets"), dict):
        raise _fail(name, f"{where} entry must be an object with facets")
    facets = item["facets"]
    return _ref({"uri": item.get("name"), "sha256": facets.get("sha256"), "size": facets.get("size"),
                 "kind": facets.get("kind")}, name, where)


def _artifact_of(item: Any, name: str, where: str) -> ArtifactRef:
    """The ArtifactRef a format-2 dataset carries in its skmm_artifact facet."""
    facets = item.get("facets") if isinstance(item, dict) else None
    facet = facets.get(ARTIFACT_FACET) if isinstance(facets, dict) else None
    if not isinstance(facet, dict):
        raise _fail(name, f"{where} entry must be a dataset with an {ARTIFACT_FACET} facet")
    return _ref({k: facet.get(k) for k in ("uri", "sha256", "size", "kind")}, name, where)


def _check_common(event: Any, name: str) -> dict[str, Any]:
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
    job = event.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not _STAGE.match(job["name"]):
        raise _fail(name, "job.name must be a stage name")
    for where in ("inputs", "outputs"):
        if not isinstance(event.get(where, []), list):
            raise _fail(name, f"{where} must be a list")
    return event


def _check_skmm(sk: Any, name: str, where: str, etype: str) -> None:
    """The fields both formats share (format 1: the top-level ``skmm`` object + run facets; 2: skmm_run)."""
    seq = sk.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise _fail(name, f"{where}.seq must be a non-negative integer; got {seq!r:.40}")
    for key in ("selection", "model"):
        if sk.get(key) is not None:
            _ref(sk[key], name, f"{where}.{key}")
    metrics = sk.get("metrics")
    if metrics is not None and (not isinstance(metrics, dict) or any(
            not isinstance(v, int | float | str | bool) and v is not None for v in metrics.values())):
        raise _fail(name, f"{where}.metrics must map names to numbers, strings, booleans or null")
    if sk.get("error") is not None and not isinstance(sk["error"], str):
        raise _fail(name, f"{where}.error must be a string or null")
    if etype == "FAIL" and not sk.get("error"):
        raise _fail(name, f"a FAIL event needs {where}.error")


def _check_run_facts(facts: dict[str, Any], name: str, where: str) -> None:
    for key in ("flow_run_id", "git_commit", "skmm_version"):
        if facts.get(key) is not None and not isinstance(facts.get(key), str):
            raise _fail(name, f"{where}.{key} must be a string or null")
    attempt = facts.get("attempt")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
        raise _fail(name, f"{where}.attempt must be a positive integer; got {attempt!r:.40}")
    if not isinstance(facts.get("config_hash"), str) or not _SHA.match(facts["config_hash"]):
        raise _fail(name, f"{where}.config_hash must be a sha256 hex digest")


def _parse_v1(event: dict[str, Any], name: str) -> None:
    facets = event["run"].get("facets", {})
    _check_run_facts(facets, name, "run.facets")
    for where in ("inputs", "outputs"):
        for item in event.get(where, []):
            _v1_ref_from_dataset(item, name, where)
    sk = event.get("skmm")
    if not isinstance(sk, dict):
        raise _fail(name, "missing the skmm facet")
    _check_skmm(sk, name, "skmm", event["eventType"])


def _parse_v2(event: dict[str, Any], name: str) -> None:
    sk = event["run"].get("facets", {}).get(RUN_FACET)
    if not isinstance(sk, dict):
        raise _fail(name, f"missing the run facet {RUN_FACET}")
    where = f"run.facets.{RUN_FACET}"
    try:
        uuid.UUID(str(sk.get("run_id")))
    except ValueError:
        raise _fail(name, f"{where}.run_id must be a UUID; got {sk.get('run_id')!r:.60}") from None
    if sk.get("stage") != event["job"]["name"]:
        raise _fail(name, f"{where}.stage must be the job name {event['job']['name']!r}; got {sk.get('stage')!r:.80}")
    _check_run_facts(sk, name, where)
    _check_skmm(sk, name, where, event["eventType"])
    for side in ("inputs", "outputs"):
        for item in event.get(side, []):
            _artifact_of(item, name, side)
    # (not rebuilt through the client's classes here: that costs ~0.4 ms an event, and the index reads many)


def parse_event(data: bytes, name: str = "<event>") -> dict[str, Any]:
    """Decode and validate one event object, of either format; raises MalformedRecordError naming ``name`` (the
    object's URI). Returns the event dict as stored (use :func:`event_record` for its facts in one flat form,
    :func:`openlineage_event` for the client's RunEvent)."""
    try:
        event = json.loads(data.decode("utf-8") if isinstance(data, bytes | bytearray) else data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(name, f"not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    _check_common(event, name)
    if "skmm" in event:  # format 1: skmm's data in a top-level object
        _parse_v1(event, name)
    else:
        _parse_v2(event, name)
    return event


def _facet(cls: type, data: dict[str, Any], **fields: Any) -> Any:
    return cls(**fields, producer=data.get("_producer", ""))


def _generic_facet(cls: type, data: dict[str, Any]) -> Any:
    """A facet skmm does not know (e.g. one the client added): the base class, its fields kept."""
    extra = {k: v for k, v in data.items() if not k.startswith("_")}
    return cls(producer=data.get("_producer", "")).with_additional_properties(**extra)


def _run_facets(facets: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in attr.fields(SkmmRunFacet) if not f.name.startswith("_")}
    out: dict[str, Any] = {}
    for key, data in facets.items():
        if key == "parent":
            out[key] = _facet(ParentRunFacet, data, run=ParentRun(**data["run"]), job=ParentJob(**data["job"]))
        elif key == RUN_FACET:
            out[key] = _facet(SkmmRunFacet, data, **{k: v for k, v in data.items()
                                                    if not k.startswith("_") and k in known})
        elif key == "errorMessage":
            out[key] = _facet(ErrorMessageRunFacet, data, message=data["message"],
                              programmingLanguage=data["programmingLanguage"], stackTrace=data.get("stackTrace"))
        else:
            out[key] = _generic_facet(RunFacet, data)
    return out


def _datasets(cls: type, items: list[dict[str, Any]]) -> list[Any]:
    out = []
    for item in items:
        facets = {}
        for key, data in (item.get("facets") or {}).items():
            if key == ARTIFACT_FACET:
                facets[key] = _facet(SkmmArtifactDatasetFacet, data, **{k: data[k] for k in ("uri", "sha256", "size",
                                                                                             "kind")})
            elif key == "version":
                facets[key] = _facet(DatasetVersionDatasetFacet, data, datasetVersion=data["datasetVersion"])
            else:
                facets[key] = _generic_facet(DatasetFacet, data)
        out.append(cls(namespace=item["namespace"], name=item["name"], facets=facets))
    return out


def openlineage_event(event: Mapping[str, Any]) -> RunEvent:
    """A format-2 event dict (as stored, or as an OpenLineage backend receives it) as the client's RunEvent.

    Facets skmm knows come back as their classes (parent, errorMessage, skmm_run, skmm_artifact, version,
    jobType); others as the client's base facet classes with their fields. Raises TypeError/ValueError/KeyError
    on a dict that is no such event."""
    run, job = event["run"], event["job"]
    job_facets = {}
    for key, data in (job.get("facets") or {}).items():
        if key == "jobType":
            job_facets[key] = _facet(JobTypeJobFacet, data, processingType=data["processingType"],
                                     integration=data["integration"], jobType=data.get("jobType"))
        else:
            job_facets[key] = _generic_facet(JobFacet, data)
    return RunEvent(eventType=RunState(event["eventType"]), eventTime=event["eventTime"],
                    run=Run(runId=run["runId"], facets=_run_facets(run.get("facets") or {})),
                    job=Job(namespace=job["namespace"], name=job["name"], facets=job_facets),
                    inputs=_datasets(InputDataset, event.get("inputs") or []),
                    outputs=_datasets(OutputDataset, event.get("outputs") or []), producer=event.get("producer", ""))


def _facts(event: dict[str, Any]) -> dict[str, Any]:
    """skmm's facts of a parsed event: format 2's skmm_run facet, or format 1's skmm object + run facets."""
    facets = event["run"].get("facets", {})
    if "skmm" in event:
        return {**{k: facets.get(k) for k in ("flow_run_id", "attempt", "git_commit", "skmm_version",
                                              "config_hash")},
                **event["skmm"], "run_id": event["run"]["runId"]}
    return facets[RUN_FACET]


def event_refs(event: dict[str, Any]) -> dict[str, Any]:
    """The refs of a parsed event: {'inputs': [...], 'outputs': [...], 'selection': ref|None, 'model': ref|None}."""
    if "skmm" in event:
        def refs(items: list) -> list[ArtifactRef]:
            return [_v1_ref_from_dataset(i, "<event>", "dataset") for i in items]
    else:
        def refs(items: list) -> list[ArtifactRef]:
            return [_artifact_of(i, "<event>", "dataset") for i in items]

    facts = _facts(event)
    return {"inputs": refs(event.get("inputs", [])), "outputs": refs(event.get("outputs", [])),
            "selection": ArtifactRef.from_dict(facts["selection"]) if facts.get("selection") else None,
            "model": ArtifactRef.from_dict(facts["model"]) if facts.get("model") else None}


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """A parsed event as one flat record, whatever the event format version: the contract the index builds on.

    Keys: run_id, event_type, event_time (ISO str), stage, seq, flow_run_id, attempt (int|None), git_commit,
    skmm_version, config_hash, error, metrics (dict|None), and the refs of :func:`event_refs` (inputs, outputs,
    selection, model).
    """
    facts = _facts(event)
    attempt = facts.get("attempt")
    return {"run_id": facts["run_id"], "event_type": event["eventType"], "event_time": event["eventTime"],
            "stage": event["job"]["name"], "seq": facts["seq"], "flow_run_id": facts.get("flow_run_id"),
            "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
            "git_commit": facts.get("git_commit"), "skmm_version": facts.get("skmm_version"),
            "config_hash": facts.get("config_hash"), "error": facts.get("error"), "metrics": facts.get("metrics"),
            **event_refs(event)}
