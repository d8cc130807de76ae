"""The ``skmm`` command line.

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


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"{name} must be positive integers; got {text!r}")
    return values


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
    app(prog_name="skmm")


if __name__ == "__main__":
    sys.exit(main())
