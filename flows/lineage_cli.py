"""``skmm lineage …``: build the lineage index from a store and answer audit questions.

    skmm lineage rebuild                      [--store URL] [--db PATH] [--skip-malformed] [--fast]
    skmm lineage samples-of-model MODEL       the samples that trained a model: id, rank, weight, and from the
                                              dataset its source URI, label, split and the dataset version
    skmm lineage models-of-sample SAMPLE_ID   the models a sample helped train (with its source URI, label, split)
    skmm lineage show MODEL                   one page: the model, its selection (method, params, sketch spec),
                                              dataset version, run (commit, config hash, attempt) and metrics
    skmm lineage provenance RUN_ID            dataset → embeddings → sketch → selection → model → metrics
    skmm lineage diff RUN_A RUN_B             samples added / removed / kept between two selections
    skmm lineage failed [--incomplete]        runs that failed, and at which stage
    skmm lineage runs                         every run with its status and attempt (Prefect retries linked)

Every command takes ``--store`` (default ./skmm-store; s3://bucket/prefix with ``--endpoint-url`` and the standard
AWS_* environment variables for credentials), ``--db`` (default <store>/lineage.duckdb for a local store, else
./skmm-lineage.duckdb), and prints a table, or JSON with ``--json``, or writes Parquet with ``--parquet PATH``.
Errors are one line on stderr with exit code 2; credentials are never printed. The store is opened like the
flows open it (:func:`tasks.store.open_store`: the same timeouts on object stores).

``rebuild`` re-hashes every artifact the events name (``--fast``: existence and size only, except selections,
which are always hashed because the index loads their sample ids); events naming a missing or corrupt artifact
are left out of the audit tables, and each such artifact is reported on stderr. The audit commands read only the
source_uri, label and split columns of the dataset's shards (never the image bytes), streamed shard by shard.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

__all__ = ["lineage_app"]

lineage_app = typer.Typer(help="Audit run lineage: which samples trained which model, and how each run was made.",
                          no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

StoreOpt = Annotated[str, typer.Option("--store", envvar="SKMM_STORE",
                                       help="Artifact store: a folder, file://, or s3://bucket/prefix.")]
DbOpt = Annotated[pathlib.Path | None, typer.Option(
    "--db", help="Index file [default: <store>/lineage.duckdb for a local store, else ./skmm-lineage.duckdb].")]
EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url", envvar="AWS_ENDPOINT_URL",
                                                 help="S3 endpoint (MinIO, moto, …); credentials from AWS_* env.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ParquetOpt = Annotated[pathlib.Path | None, typer.Option("--parquet", help="Write the result to this Parquet file.")]
DEFAULT_STORE = "./skmm-store"


def _open_store(url: str, endpoint_url: str | None):
    from tasks.store import open_store, store_spec

    return open_store(store_spec(url, endpoint_url))


def _index(store_url: str, db: pathlib.Path | None, endpoint_url: str | None, store=None):
    from storage.index import LineageIndex

    if db is None:
        store = store or _open_store(store_url, endpoint_url)
        db = pathlib.Path(store.root) / "lineage.duckdb" if store.is_local else pathlib.Path("skmm-lineage.duckdb")
    return LineageIndex(db)


def _store_and_index(store_url: str, db: pathlib.Path | None, endpoint_url: str | None):
    """The store (the audit commands read dataset rows from it) and the index."""
    store = _open_store(store_url, endpoint_url)
    return store, _index(store_url, db, endpoint_url, store)


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Known failures become one redacted line on stderr and exit code 2."""
    import duckdb

    from storage.errors import StorageError, redact
    from storage.index import UnknownIdError

    try:
        yield
    except (StorageError, UnknownIdError, ValueError, OSError, duckdb.Error) as exc:
        message = exc.args[0] if isinstance(exc, UnknownIdError) and exc.args else str(exc)
        line = " ".join(str(message).split()) or type(exc).__name__
        typer.echo(f"error: {redact(line)}", err=True)
        raise typer.Exit(2) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _output(table, title: str, as_json: bool, parquet: pathlib.Path | None) -> None:
    """Print ``table`` (a pyarrow.Table) as a rich table or JSON, and/or write it to Parquet."""
    if parquet is not None:
        import pyarrow.parquet as pq

        parquet = parquet.expanduser()
        tmp = parquet.with_name(f".{parquet.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, parquet)
        typer.echo(f"wrote {table.num_rows} rows to {parquet}", err=True)
    if as_json:
        typer.echo(json.dumps(table.to_pylist(), default=_jsonable, indent=2))
    elif parquet is None:
        from rich.console import Console
        from rich.table import Table

        view = Table(title=title, caption=f"{table.num_rows} rows", show_lines=False)
        for name in table.column_names:
            view.add_column(name, overflow="fold")
        for row in table.to_pylist():
            view.add_row(*(_cell(row[c]) for c in table.column_names))
        Console(width=None if sys.stdout.isatty() else 400).print(view)


@lineage_app.command("rebuild")
def rebuild(
    store: StoreOpt = DEFAULT_STORE,
    db: DbOpt = None,
    endpoint_url: EndpointOpt = None,
    skip_malformed: Annotated[bool, typer.Option(help="Record malformed events in the index instead of failing.")]
    = False,
    verify_sha256: Annotated[bool, typer.Option(
        "--verify-sha256/--fast", help="Re-hash every referenced artifact (the default), or only check that each "
                                       "exists with its size (--fast; selections are always hashed).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the index from the store's lineage events (atomically replaces the old index)."""
    import pyarrow as pa

    with _errors():
        art = _open_store(store, endpoint_url)
        if art.is_local and not os.path.isdir(art.root):
            raise ValueError(f"store {art.url} does not exist")
        index = _index(store, db, endpoint_url)
        stats = index.rebuild(art, skip_malformed=skip_malformed, verify_sha256=verify_sha256)
        for row in index.unusable_artifacts().to_pylist():
            typer.echo(f"warning: {row['kind']} {row['uri']} cannot be used ({row['reason']}); the {row['events']} "
                       "lineage event(s) naming it are left out of the index", err=True)
        if as_json:
            typer.echo(json.dumps(stats, indent=2))
        else:
            _output(pa.table({"item": list(stats), "value": [str(v) for v in stats.values()]}),
                    "lineage index rebuilt", False, None)


@lineage_app.command("samples-of-model")
def samples_of_model(
    model: Annotated[str, typer.Argument(help="The model's sha256 (or a unique prefix of 8+ hex) or its uri.")],
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False, parquet: ParquetOpt = None,
) -> None:
    """The samples that trained MODEL in rank order: sample_id, rank, weight, and each sample's source_uri, label
    and split in the dataset (dataset_version) its selection was made from."""
    from storage.audit import samples_of_model as audit

    with _errors():
        art, index = _store_and_index(store, db, endpoint_url)
        table = audit(index, art, model, warn=_warn)
        _output(table, f"samples that trained model {model}", as_json, parquet)


@lineage_app.command("models-of-sample")
def models_of_sample(
    sample_id: Annotated[str, typer.Argument(help="A sample id as it appears in selections.")],
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False, parquet: ParquetOpt = None,
) -> None:
    """The models whose training selection contained SAMPLE_ID, with the sample's source_uri, label, split and
    dataset_version."""
    from storage.audit import models_of_sample as audit

    with _errors():
        art, index = _store_and_index(store, db, endpoint_url)
        table = audit(index, art, sample_id, warn=_warn)
        _output(table, f"models trained with sample {sample_id}", as_json, parquet)


def _page_lines(page: dict[str, Any]) -> list[str]:
    """The model page as aligned 'key  value' lines, one section per heading."""
    def fmt(value: Any) -> str:
        if isinstance(value, dict | list):
            return json.dumps(value, sort_keys=True, default=_jsonable)
        return _cell(value) or "-"

    m, sel, run = page["model"], page["selection"], page["run"] or {}
    sections: list[tuple[str, list[tuple[str, Any]]]] = [
        ("model", [("sha256", m["sha256"]), ("uri", m["uri"]), ("size", m["size"]), ("trained at", m["trained_at"]),
                   ("stage", m["stage"])]),
        ("selection", [("sha256", sel["sha256"]), ("uri", sel["uri"]), ("method", sel["method"]),
                       ("params", sel["params"]), ("samples", sel["n_samples"])] if sel else [("-", "none recorded")]),
    ]
    for sketch in (sel or {}).get("sketches", []):
        sections[-1][1].extend([("sketch", sketch["uri"]), ("sketch spec", sketch.get("spec"))])
    sections.append(("dataset", [kv for d in page["datasets"] for kv in (
        ("version", d["version"]), ("rows", d["num_rows"]), ("manifest", d["uri"]))] or [("-", "none recorded")]))
    sections.append(("run", [("run id", run.get("run_id")), ("status", run.get("status")),
                             ("flow run id", run.get("flow_run_id")), ("attempt", run.get("attempt")),
                             ("previous attempt", run.get("previous_attempt")), ("git commit", run.get("git_commit")),
                             ("skmm version", run.get("skmm_version")), ("config hash", run.get("config_hash")),
                             ("started at", run.get("started_at"))]
                     + [("also recorded by run", r) for r in page["other_runs"]]))
    sections.append(("metrics", [(f"{x['stage']}: {x['name']}", x["value"]) for x in page["metrics"]]
                     or [("-", "none recorded")]))
    lines = []
    for title, items in sections:
        lines.append(f"{title}")
        width = max(len(k) for k, _ in items)
        lines.extend(f"  {k:<{width}}  {fmt(v)}" for k, v in items)
    return lines


@lineage_app.command("show")
def show(
    model: Annotated[str, typer.Argument(help="The model's sha256 (or a unique prefix of 8+ hex) or its uri.")],
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One page about MODEL: its selection (method, params, sketch spec), dataset version, run (commit, config
    hash, attempt) and metrics."""
    from storage.audit import model_page

    with _errors():
        art, index = _store_and_index(store, db, endpoint_url)
        page = model_page(index, art, model, warn=_warn)
        if as_json:
            typer.echo(json.dumps(page, default=_jsonable, indent=2))
        else:
            typer.echo("\n".join(_page_lines(page)))


@lineage_app.command("provenance")
def provenance(
    run_id: Annotated[str, typer.Argument(help="The run's id (uuid).")],
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False, parquet: ParquetOpt = None,
) -> None:
    """A run's full chain, with the upstream stages that produced its inputs."""
    with _errors():
        table = _index(store, db, endpoint_url).provenance(run_id)
        _output(table, f"provenance of run {run_id}", as_json, parquet)


@lineage_app.command("diff")
def diff(
    run_a: Annotated[str, typer.Argument(help="First run id (or selection sha256).")],
    run_b: Annotated[str, typer.Argument(help="Second run id (or selection sha256).")],
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False, parquet: ParquetOpt = None,
    summary: Annotated[bool, typer.Option(help="Only the counts of added / removed / kept samples.")] = False,
) -> None:
    """Samples added (only in B), removed (only in A) and kept between two selections."""
    import pyarrow as pa

    with _errors():
        table = _index(store, db, endpoint_url).selection_diff(run_a, run_b)
        if summary:
            counts = table.group_by("change").aggregate([("sample_id", "count")])
            got = dict(zip(counts.column("change").to_pylist(), counts.column(1).to_pylist(), strict=True))
            table = pa.table({"change": ["added", "removed", "kept"],
                              "samples": [got.get(k, 0) for k in ("added", "removed", "kept")]})
        _output(table, f"selection diff {run_a} → {run_b}", as_json, parquet)


@lineage_app.command("failed")
def failed(
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False, parquet: ParquetOpt = None,
    incomplete: Annotated[bool, typer.Option(help="Also list stages that started and never ended (crashed).")]
    = False,
) -> None:
    """Runs that failed, the stage where they failed, and the error."""
    with _errors():
        table = _index(store, db, endpoint_url).failed_runs(include_incomplete=incomplete)
        _output(table, "failed runs", as_json, parquet)


@lineage_app.command("runs")
def runs(
    store: StoreOpt = DEFAULT_STORE, db: DbOpt = None, endpoint_url: EndpointOpt = None,
    as_json: JsonOpt = False, parquet: ParquetOpt = None,
) -> None:
    """Every recorded run with its status, attempt (the attempts of one flow run are linked by
    previous_attempt), commit and config hash."""
    with _errors():
        table = _index(store, db, endpoint_url).table("runs")
        _output(table, "runs", as_json, parquet)
