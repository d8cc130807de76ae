"""The ``skmm`` command line.

    skmm curate [SOURCE] [--budgets 50,100,200] [--methods skmm_best,uniform] [--store ./skmm-store] [--json]
    skmm reselect RUN --budgets 20,40      skmm reevaluate RUN      (RUN: a run id or prefix, or a JSON file)
    skmm lineage rebuild | samples-of-model | models-of-sample | provenance | diff | failed
    skmm bench synthetic [--seeds 8] [--budgets 48,64,...] [--out DIR]   the paper's synthetic table
"""

from __future__ import annotations

import pathlib
import sys
from typing import Annotated

import typer

app = typer.Typer(help="skmm: fast, provable data selection for finetuning (Sketchy Moment Matching).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks from the paper.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _register_lineage() -> None:
    from flows.lineage_cli import lineage_app

    app.add_typer(lineage_app, name="lineage")


_register_lineage()


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"{name} must be positive integers; got {text!r}")
    return values


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
    image_size: Annotated[int, typer.Option(min=8, help="Render size for the digits source.")] = 32,
    sketch_dim: Annotated[int, typer.Option(min=1, help="Sketch dimension m.")] = 64,
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
    embeddings: Annotated[bool, typer.Option(help="SOURCE is a Parquet table of precomputed embeddings.")] = False,
    split_seed: Annotated[int, typer.Option(min=0, help="Seed of the train/val/test split.")] = 0,
    store: Annotated[str, typer.Option(help="Artifact store URL (local path, s3://bucket/prefix, ...).")] = (
        "./skmm-store"),
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint (credentials from the environment).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Embedding progress bars on "
                                                  "stderr (default: when stderr is a terminal).")] = None,
) -> None:
    """Select, finetune and evaluate on a pool: the whole curation flow, run under Prefect."""
    try:
        from flows.curate import FinetuneConfig, ModelConfig, curate, source_config

        src = source_config(source, embeddings, image_size, split_seed)
        mdl = ModelConfig(name=model, pretrained=pretrained, init_seed=init_seed)
        result = curate(source=src, budgets=_int_list(budgets, "--budgets"),
                        methods=[m.strip() for m in methods.split(",") if m.strip()],
                        seeds=[int(x) for x in seeds.split(",") if x.strip()], model=mdl, sketch_dim=sketch_dim,
                        class_balanced=class_balanced, store_url=store, endpoint_url=endpoint_url,
                        gradients=gradients, finetune=FinetuneConfig(kind=finetune, layers=ft_layers,
                                                                     epochs=ft_epochs), task=task,
                        variant_choice=variant_choice,
                        progress=sys.stderr.isatty() if progress is None else progress)
    except Exception as exc:
        _fail(exc)
    _print_result(result, as_json)


def _fail(exc: BaseException) -> None:
    """Bad input and storage errors: one line on stderr, exit code 2. Anything else is a bug: re-raise."""
    from storage.errors import StorageError

    if isinstance(exc, ValueError | FileNotFoundError | StorageError):  # pydantic's ValidationError included
        lines = str(exc).strip().splitlines()
        typer.echo(f"error: {' '.join(lines[:3]) if lines else type(exc).__name__}", err=True)
        raise typer.Exit(2) from None
    raise exc


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
    store: Annotated[str, typer.Option(help="Artifact store URL.")] = "./skmm-store",
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
) -> None:
    """Select again from an earlier run's sketch (no source needed), finetune and evaluate."""
    try:
        from flows.rerun import reselect

        result = reselect(run=_load_run(run, store, endpoint_url), budgets=_int_list(budgets, "--budgets"),
                          methods=[m.strip() for m in methods.split(",") if m.strip()],
                          seeds=[int(x) for x in seeds.split(",") if x.strip()], class_balanced=class_balanced,
                          variant_choice=variant_choice, store_url=store, endpoint_url=endpoint_url)
    except Exception as exc:
        _fail(exc)
    _print_result(result, as_json)


@app.command("reevaluate")
def reevaluate_cmd(
    run: Annotated[str, typer.Argument(metavar="RUN", help=_RUN_HELP)],
    store: Annotated[str, typer.Option(help="Artifact store URL.")] = "./skmm-store",
    endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
) -> None:
    """Evaluate an earlier run's models again on the test split."""
    try:
        from flows.rerun import reevaluate

        result = reevaluate(run=_load_run(run, store, endpoint_url), store_url=store, endpoint_url=endpoint_url)
    except Exception as exc:
        _fail(exc)
    _print_result(result, as_json)


def _print_result(result: dict, as_json: bool) -> None:
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
    for r in result["results"]:
        typer.echo(f"{r['method']:>12} n={r['n']:<5} seed={r['seed']}  selection {r['selection']['uri']}")
        typer.echo(f"{'':>12} {'':<15} model     {r['model']['uri']}")
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
    quiet: Annotated[bool, typer.Option(help="No per-run progress lines.")] = False,
) -> None:
    """Run the paper's synthetic experiment (SKMM.md §6) and print the risk table."""
    from skmm.synthetic.benchmark import SyntheticConfig, markdown_table, run_synthetic, summarize, write_report

    config = SyntheticConfig(n_samples=n_samples, dim=dim, sketch_dim=sketch_dim, generator_seed=generator_seed,
                             budgets=_int_list(budgets, "--budgets"), seeds=tuple(range(seeds)))
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
    typer.echo(markdown_table(summarize(result["rows"]), result["full_data_risk"], list(config.methods)))
    typer.echo(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def main() -> None:
    """Console-script entry point."""
    import os

    # Offline machines: Prefect's temporary server would log a telemetry error on every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A loaded 2-core machine can take longer than Prefect's 20 s default to start the temporary server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    app(prog_name="skmm")


if __name__ == "__main__":
    sys.exit(main())
