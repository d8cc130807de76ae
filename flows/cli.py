"""The ``skmm`` command line.

    skmm curate [SOURCE] [--budgets 50,100,200] [--methods skmm_best,uniform] [--store ./skmm-store] [--json]
    skmm reselect RUN --budgets 20,40      skmm reevaluate RUN      (RUN: a run id or prefix, or a JSON file)
    skmm lineage rebuild | samples-of-model | models-of-sample | provenance | diff | failed
    skmm bench synthetic [--seeds 8] [--budgets 48,64,...] [--out DIR]   the paper's synthetic table
    skmm store gc [--store URL] [--older-than HOURS] [--dry-run]        staging leftovers of killed runs

Errors are one line on stderr (``error: ...``; exit 2 for bad input, 1 for a bug); ``skmm --debug ...`` (or
SKMM_DEBUG=1) prints the full traceback too. The failing flow's traceback is always in Prefect's run logs.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
import traceback
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer

from skmm.models.clip import MAX_PIXELS  # Pillow's default limit, PIL.Image.MAX_IMAGE_PIXELS

app = typer.Typer(help="skmm: fast, provable data selection for finetuning (Sketchy Moment Matching).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks from the paper.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
store_app = typer.Typer(help="Maintenance of an artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
_DEBUG = {"on": False}  # --debug of this invocation (set by the app's callback before any command runs)


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", envvar="SKMM_DEBUG", help="Print full tracebacks "
                                                  "(Prefect's and skmm's) besides the one-line error.")] = False,
             ) -> None:
    """skmm: fast, provable data selection for finetuning (Sketchy Moment Matching)."""
    _DEBUG["on"] = debug


def _debug() -> bool:
    return _DEBUG["on"]


class _NoRunErrors(logging.Filter):
    """Keeps flow- and task-run errors (and their tracebacks) off the console; the CLI prints one line instead.
    Installed on the console handlers only: Prefect's API handler, on the run loggers, still sends them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not record.name.startswith(("prefect.flow_runs",
                                                                              "prefect.task_runs"))


class _NoTaskRunChatter(logging.Filter):
    """Keeps task runs' INFO lines (one "Finished in state Completed()" per task: 100+ in a multi-seed run) off the
    console, so the table is what a user reads; warnings stay, and the server's run logs keep everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("prefect.task_runs")


@contextlib.contextmanager
def _one_line_errors(verbose: bool = True) -> Iterator[None]:
    """Around a flow call: Prefect's console shows no run errors (unless --debug); they stay in the run logs.
    Not ``verbose``: no task-run INFO lines either (the flow run's lines, with the UI link, stay)."""
    if _debug():
        yield
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    filters = [_NoRunErrors()] + ([] if verbose else [_NoTaskRunChatter()])
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in handlers:
        for f in filters:
            handler.addFilter(f)
    try:
        yield
    finally:
        for handler in handlers:
            for f in filters:
                handler.removeFilter(f)


def _register_lineage() -> None:
    from flows.lineage_cli import lineage_app

    app.add_typer(lineage_app, name="lineage")


_register_lineage()


def _int_list(text: str, name: str, allow_zero: bool = False) -> list[int]:
    """A comma-separated option of positive (``allow_zero``: non-negative) integers; ValueError naming the
    option otherwise."""
    items = _items(text, name)
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers; got {text!r}") from None
    if any(v < 0 or (v == 0 and not allow_zero) for v in values):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} integers; got {text!r}")
    return values


def _items(text: str, name: str) -> list[str]:
    """The non-empty items of a comma-separated option; ValueError naming the option if there are none."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{name} lists nothing (got {text!r}); give at least one value, comma-separated")
    return items


@app.command("curate")
def curate_cmd(
    source: Annotated[str, typer.Argument(help="'digits' (bundled), an image folder with class subfolders, or a "
                                               "manifest (.csv/.tsv/.parquet with path,label[,split]).")] = "digits",
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets n.")] = "50,100,200",
    methods: Annotated[str, typer.Option(help="Comma-separated selection methods.")] = "skmm_best,uniform",
    seeds: Annotated[str, typer.Option(help="Comma-separated selection seeds.")] = "0",
    model: Annotated[str, typer.Option(help="open_clip model name ('skmm-tiny-vit': a tiny tower for tests).")] = (
        "ViT-S-32"),
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag, weights file, or local-dir:PATH "
                                                        "(default: random init).")] = None,
    init_seed: Annotated[int, typer.Option(min=0, help="Seed of a random-init tower.")] = 0,
    precision: Annotated[str, typer.Option(help="Embedding precision: 'fp32' (IEEE, bitwise reproducible), 'tf32' "
                                                "(CUDA only) or 'bf16' (autocast); recorded in the features' "
                                                "spec.")] = "fp32",
    image_size: Annotated[int, typer.Option(min=8, help="Render size for the digits source.")] = 32,
    sketch_dim: Annotated[int | None, typer.Option(min=1, help="Sketch dimension m (default: automatic — sketch "
                                                   "to 256 columns once, then SkMM keeps its m = max(64, "
                                                   "2 x signal rank) leading directions; recorded in the "
                                                   "lineage).")] = None,
    gradients: Annotated[str, typer.Option(help="'lp': normalised features; 'ft': per-sample gradients of the "
                                                "last --ft-layers tower blocks (pseudo-labels).")] = "lp",
    finetune: Annotated[str, typer.Option(help="'linear_probe' on frozen features, or 'last_layers' of the "
                                               "tower + a head.")] = "linear_probe",
    ft_layers: Annotated[int, typer.Option(min=1, help="Tower blocks to finetune / differentiate (FT).")] = 1,
    ft_epochs: Annotated[int, typer.Option(min=1, help="Epochs of last-layers finetuning.")] = 5,
    task: Annotated[str, typer.Option(help="'classification', or 'regression' for numeric labels (ridge, MAE).")] = (
        "classification"),
    class_balanced: Annotated[bool, typer.Option(help="Spread budgets evenly over classes.")] = False,
    variant_choice: Annotated[str, typer.Option(help="How skmm_best picks convex SkMM or greedy SkMMv2: 'val' (the "
                                                     "better finetuned model on the val split) or 'proxy' "
                                                     "(label-free variance proxy).")] = "val",
    full_pool_reference: Annotated[bool, typer.Option(help="Also finetune on the whole train split, as the report's "
                                                      "reference row and line (costly on a large pool).")] = False,
    val_limit: Annotated[int, typer.Option(min=0, help="Choices on the val split (probe strength, FT epoch, "
                                                       "skmm_best's variant) use its N smallest sample ids, a "
                                                       "fixed content-determined sample; 0: the whole val split. "
                                                       "The test split is always evaluated in full.")] = 10_000,
    third_candidate: Annotated[bool, typer.Option(help="skmm_best's choice on the val split also tries convex "
                                                  "SkMM seeded by greedy pivots (one more finetune per budget; "
                                                  "--no-third-candidate: the two variants only; "
                                                  "bench/README.md §14).")] = True,
    pivoted_candidate: Annotated[bool, typer.Option(help="skmm_best's choice on the val split also tries SkMM's "
                                                    "pivoted seeding alone for the whole budget (one more "
                                                    "finetune per budget; --no-pivoted-candidate: the three "
                                                    "others only; bench/README.md §14, \"A fourth "
                                                    "candidate\").")] = True,
    embeddings: Annotated[bool, typer.Option(help="SOURCE is a Parquet table of precomputed embeddings.")] = False,
    split_seed: Annotated[int, typer.Option(min=0, help="Seed of the train/val/test split.")] = 0,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image (width × height) ingested; larger ones are "
                                                        "quarantined (default: Pillow's limit).")] = MAX_PIXELS,
    store: Annotated[str, typer.Option(help="Artifact store URL (local path, s3://bucket/prefix, ...).")] = (
        "./skmm-store"),
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint (credentials from the environment).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print every selection's and model's "
                                          "path, and Prefect's task-run log lines.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Embedding progress bars on "
                                                  "stderr (default: when stderr is a terminal).")] = None,
    dask_workers: Annotated[int | None, typer.Option(min=1, help="Run the shard stages (embed, FT gradients) on a "
                                                     "local Dask cluster of N worker processes.")] = None,
    dask_address: Annotated[str | None, typer.Option(help="... or on the existing Dask cluster at this scheduler "
                                                     "address (tcp://host:8786).")] = None,
    dask_gpus: Annotated[str | None, typer.Option(help="... or on a local Dask cluster with one worker per GPU "
                                                  "(comma-separated device ids, e.g. 0,1,2,3).")] = None,
) -> None:
    """Select, finetune and evaluate on a pool: the whole curation flow, run under Prefect."""
    try:
        budget_list, method_list = _int_list(budgets, "--budgets"), _items(methods, "--methods")
        seed_list = _int_list(seeds, "--seeds", allow_zero=True)
        from flows.curate import FinetuneConfig, ModelConfig, curate, source_config

        if dask_workers or dask_address or dask_gpus:
            from flows.runners import dask_task_runner

            gpus = _items(dask_gpus, "--dask-gpus") if dask_gpus else None
            runner = dask_task_runner(workers=dask_workers, address=dask_address, gpus=gpus)
            curate = curate.with_options(task_runner=runner)  # this run's flow: its shard tasks go to Dask

        src = source_config(source, embeddings, image_size, split_seed, max_pixels=max_pixels)
        mdl = ModelConfig(name=model, pretrained=pretrained, init_seed=init_seed, precision=precision)
        with _one_line_errors(verbose):
            result = curate(source=src, budgets=budget_list, methods=method_list, seeds=seed_list, model=mdl,
                            sketch_dim="auto" if sketch_dim is None else sketch_dim, class_balanced=class_balanced,
                            store_url=store,
                            endpoint_url=endpoint_url, gradients=gradients,
                            finetune=FinetuneConfig(kind=finetune, layers=ft_layers, epochs=ft_epochs), task=task,
                            variant_choice=variant_choice, full_pool_reference=full_pool_reference,
                            val_limit=val_limit or None, third_candidate=third_candidate,
                            pivoted_candidate=pivoted_candidate,
                            progress=sys.stderr.isatty() if progress is None else progress)
    except Exception as exc:
        _fail(exc)
    _print_result(result, as_json, verbose)


def _fail(exc: BaseException) -> NoReturn:
    """One line on stderr: bad input and storage errors exit 2; anything else is a bug and exits 1. With
    --debug, the traceback first."""
    from storage.errors import StorageError

    if _debug():
        traceback.print_exception(exc, file=sys.stderr)
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[:3]) if lines else type(exc).__name__
    if isinstance(exc, ValueError | FileNotFoundError | StorageError):  # pydantic's ValidationError included
        typer.echo(f"error: {text}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"error: unexpected {type(exc).__name__}: {text} (a bug: run again with --debug for the traceback, "
               "or see the run's logs in Prefect)", err=True)
    raise typer.Exit(1) from None


def _load_run(run: str, store: str, endpoint_url: str | None) -> dict:
    """RUN: a JSON file (``skmm curate --json``), or a run id or unique prefix in ``store`` → that run's result
    (read once, now: a missing or ambiguous id fails before any flow starts)."""
    import json

    from storage.runs import looks_like_run_id

    path = pathlib.Path(run)
    if not path.is_file():
        if not looks_like_run_id(run):
            raise ValueError(f"run {run!r} is neither a file nor a run id (a UUID or a unique prefix of one)")
        from storage.runs import read_run_result
        from tasks.store import open_store, store_spec

        return read_run_result(open_store(store_spec(store, endpoint_url)), run)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"run file {path} is not JSON ({exc.msg}); save it with 'skmm curate --json'") from None
    if not isinstance(data, dict):
        raise ValueError(f"run file {path} does not hold a curate result")
    return data


_RUN_HELP = ("An earlier run: its run id (or a unique prefix) in --store, e.g. from 'skmm lineage runs' or a "
             "scheduled run, or its result saved with 'skmm curate --json'.")


@app.command("reselect")
def reselect_cmd(
    run: Annotated[str, typer.Argument(metavar="RUN", help=_RUN_HELP)],
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets n.")] = "50,100,200",
    methods: Annotated[str, typer.Option(help="Comma-separated selection methods.")] = "skmm_best,uniform",
    seeds: Annotated[str, typer.Option(help="Comma-separated selection seeds.")] = "0",
    class_balanced: Annotated[bool, typer.Option(help="Spread budgets evenly over classes.")] = False,
    variant_choice: Annotated[str, typer.Option(help="How skmm_best picks convex SkMM or greedy SkMMv2: 'val' (the "
                                                     "better finetuned model on the val split) or 'proxy' "
                                                     "(label-free variance proxy).")] = "val",
    val_limit: Annotated[int, typer.Option(min=0, help="Choices on the val split use its N smallest sample ids; "
                                                       "0: the whole val split (as in curate).")] = 10_000,
    third_candidate: Annotated[bool, typer.Option(help="skmm_best also tries convex SkMM seeded by greedy pivots "
                                                  "(as in curate).")] = True,
    pivoted_candidate: Annotated[bool, typer.Option(help="skmm_best also tries SkMM's pivoted seeding alone (as in "
                                                    "curate).")] = True,
    store: Annotated[str, typer.Option(help="Artifact store URL.")] = "./skmm-store",
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print every selection's and model's "
                                          "path, and Prefect's task-run log lines.")] = False,
) -> None:
    """Select again from an earlier run's sketch (no source needed), finetune and evaluate."""
    try:
        budget_list, method_list = _int_list(budgets, "--budgets"), _items(methods, "--methods")
        seed_list = _int_list(seeds, "--seeds", allow_zero=True)
        from flows.rerun import reselect

        earlier = _load_run(run, store, endpoint_url)
        with _one_line_errors(verbose):
            result = reselect(run=earlier, budgets=budget_list, methods=method_list, seeds=seed_list,
                              class_balanced=class_balanced, variant_choice=variant_choice,
                              val_limit=val_limit or None, third_candidate=third_candidate,
                              pivoted_candidate=pivoted_candidate, store_url=store,
                              endpoint_url=endpoint_url)
    except Exception as exc:
        _fail(exc)
    _print_result(result, as_json, verbose)


@app.command("reevaluate")
def reevaluate_cmd(
    run: Annotated[str, typer.Argument(metavar="RUN", help=_RUN_HELP)],
    store: Annotated[str, typer.Option(help="Artifact store URL.")] = "./skmm-store",
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print every selection's and model's "
                                          "path, and Prefect's task-run log lines.")] = False,
) -> None:
    """Evaluate an earlier run's models again on the test split."""
    try:
        from flows.rerun import reevaluate

        earlier = _load_run(run, store, endpoint_url)
        with _one_line_errors(verbose):
            result = reevaluate(run=earlier, store_url=store, endpoint_url=endpoint_url)
    except Exception as exc:
        _fail(exc)
    _print_result(result, as_json, verbose)


def _print_result(result: dict, as_json: bool, verbose: bool = False) -> None:
    """The metric table, the variant choices, the run id and where the report lies; each selection's and model's
    path only with ``verbose`` (``--json`` has everything)."""
    import json

    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(result["report"]["markdown"])
    typer.echo(f"\nrun id:      {result['run_id']}")
    typer.echo(f"store:       {result['store']}")
    typer.echo(f"report:      {result['report']['report']['uri']}")
    typer.echo(f"plot:        {result['report']['plot']['uri']}")
    if result.get("result"):
        typer.echo(f"result:      {result['result']['uri']}  (skmm reselect|reevaluate {result['run_id'][:8]})")
    if verbose:
        for r in result["results"]:
            typer.echo(f"{r['method']:>12} n={r['n']:<5} seed={r['seed']}  selection {r['selection']['uri']}")
            typer.echo(f"{'':>12} {'':<15} model     {r['model']['uri']}")
    else:
        typer.echo(f"models:      {len(result['results'])} (paths: --verbose, or --json)")
    if result["quarantined"]:
        typer.echo(f"quarantined: {result['quarantined']} unreadable file(s) (see the ingest stage's lineage)")


@bench_app.command("synthetic")
def bench_synthetic(
    out: Annotated[pathlib.Path, typer.Option(help="Folder for runs.csv, summary.csv, table.md, plot.")] = (
        pathlib.Path("bench/out/synthetic")),
    seeds: Annotated[int, typer.Option(min=1, help="Selection seeds 0..seeds-1.")] = 8,
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets n.")] = "48,64,80,120,200,400,800,1600",
    methods: Annotated[str, typer.Option(help="Comma-separated methods (default: all in the paper's table).")] = "",
    n_samples: Annotated[int, typer.Option(min=3, help="Pool size N.")] = 3000,
    dim: Annotated[int, typer.Option(min=1, help="Dimension r.")] = 5000,
    sketch_dim: Annotated[int, typer.Option(min=1, help="Sketch dimension m.")] = 40,
    generator_seed: Annotated[int, typer.Option(min=0, help="Seed of the GMM pool (0 = evaluation pool).")] = 0,
    third_candidate: Annotated[bool, typer.Option(help="skmm_best_val also chooses convex SkMM seeded by greedy "
                                                  "pivots, as the pipeline does; --no-third-candidate: the two "
                                                  "variants.")] = True,
    pivoted_candidate: Annotated[bool, typer.Option(help="skmm_best_val also chooses SkMM's pivoted seeding alone, "
                                                    "as the pipeline does; --no-pivoted-candidate: the three "
                                                    "others.")] = True,
    quiet: Annotated[bool, typer.Option(help="No per-run progress lines.")] = False,
) -> None:
    """Run the paper's synthetic experiment (SKMM.md §6) and print the risk table."""
    from skmm.synthetic.benchmark import SyntheticConfig, markdown_table, run_synthetic, summarize, write_report

    try:
        budget_list = _int_list(budgets, "--budgets")
    except ValueError as exc:
        _fail(exc)
    config = SyntheticConfig(n_samples=n_samples, dim=dim, sketch_dim=sketch_dim, generator_seed=generator_seed,
                             budgets=budget_list, seeds=tuple(range(seeds)), third_candidate=third_candidate,
                             pivoted_candidate=pivoted_candidate)
    if methods:
        from skmm.select import SELECTORS

        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = sorted(set(chosen) - set(SELECTORS))
        if unknown:
            raise typer.BadParameter(f"unknown method(s) {unknown}; expected some of {sorted(SELECTORS)}")
        config.methods = tuple(chosen)

    def progress(row: dict) -> None:
        if not quiet:
            typer.echo(f"  {row['method']:<16} n={row['n']:<5} seed={row['seed']} risk={row['risk']:.4g} "
                       f"({row['select_seconds']:.2f}s select)", err=True)

    try:
        result = run_synthetic(config, progress)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    paths = write_report(result, out)
    shown = list(dict.fromkeys(r["method"] for r in result["rows"]))  # with skmm_best_val, the pipeline's rule
    typer.echo(markdown_table(summarize(result["rows"]), result["full_data_risk"], shown))
    typer.echo(f"\nwrote {', '.join(str(p) for p in paths.values())}")


@store_app.command("gc")
def store_gc(
    store: Annotated[str, typer.Option(help="Artifact store URL (local path, s3://bucket/prefix, ...).")] = (
        "./skmm-store"),
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint (credentials from the environment).")] = None,
    older_than: Annotated[float, typer.Option(min=0, help="Remove only leftovers older than HOURS (a younger one "
                                                          "may belong to a running writer).", metavar="HOURS")] = 24.0,
    dry_run: Annotated[bool, typer.Option(help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove staging leftovers of killed runs (the store's tmp/.* files; for a remote store, this machine's
    staging folder). Published artifacts, records and results are never touched."""
    try:
        from tasks.store import open_store, store_spec

        st = open_store(store_spec(store, endpoint_url))
        if st.is_local and not pathlib.Path(st.root).is_dir():
            raise FileNotFoundError(f"store {st.root} does not exist; check --store")
        gone = st.clean_staging(older_than * 3600.0, dry_run=dry_run)
    except Exception as exc:
        _fail(exc)
    for entry in gone:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {entry.path}  ({entry.size} bytes, "
                   f"{entry.age_s / 3600:.1f} h old)")
    size = sum(e.size for e in gone)
    typer.echo(f"{'would remove' if dry_run else 'removed'} {len(gone)} staging leftover(s), {size} bytes, "
               f"older than {older_than:g} h (staging folder: {st.staging_dir() or 'none'})")


def main() -> None:
    """Console-script entry point."""
    import os

    # Offline machines: Prefect's temporary server would log a telemetry error on every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A loaded 2-core machine can take longer than Prefect's 20 s default to start the temporary server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server lives for one command: when it stops while task-run events are still being written, it
    # logs the cancelled write as an ERROR with two tracebacks (~100 lines after the table). Only that server reads
    # this variable here (a standing server is its own process); the run's own logs are unaffected.
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    app(prog_name="skmm")


if __name__ == "__main__":
    sys.exit(main())
