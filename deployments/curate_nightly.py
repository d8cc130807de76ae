"""The nightly curation deployment and on-demand re-runs, for a standing Prefect server.

    python -m deployments.curate_nightly deploy [options]   # process work pool (if missing) + deployments at
                                                            # PREFECT_API_URL; `prefect worker start` runs them
    python -m deployments.curate_nightly serve [options]    # the same deployments, run by this process

    curate/nightly        the ``curate`` flow on a cron schedule (default 02:00 UTC), one run at a time
    reselect/on-demand    no schedule: select again from an earlier run (parameters ``run`` and ``budgets``)
    reevaluate/on-demand  no schedule: evaluate an earlier run's models again (parameter ``run``)

``run`` is the earlier run's id (every curate, reselect and reevaluate run, scheduled ones included, writes its
result to ``runs/<run_id>.json`` in the store) or that result as JSON.

The code is loaded from a local checkout (``flow.from_source(<checkout>, "flows.curate.curate")``): the runs
start in that folder with the worker's Python, so a ``process`` worker started from the project's venv needs no
image and no remote storage. Lineage records the code that ran (the skmm version, and the commit of the source
tree its packages were imported from), whatever the folder.

Bad options (a missing source folder, an unknown timezone or method, no PREFECT_API_URL) stop with one line on
stderr, ``error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pathlib
import sys
import zoneinfo
from collections.abc import Sequence
from typing import Any, Literal, NoReturn
from uuid import UUID

from prefect import deploy, flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule

from flows import curate as curate_flow
from flows.curate import ModelConfig, SourceConfig, check_methods
from tasks.finetune import VAL_LIMIT
from tasks.store import DEFAULT_STORE

__all__ = ["CRON", "NIGHTLY", "POOL", "TIMEZONE", "build_deployments", "dask_env", "ensure_process_pool", "main",
           "nightly_parameters", "nightly_schedule", "register", "source_config"]

POOL = "skmm-process"
NIGHTLY = "nightly"
CRON = "0 2 * * *"  # every day at 02:00
TIMEZONE = "UTC"
TAGS = ["skmm", "curation"]
ENTRYPOINTS = {"curate": "flows.curate.curate", "reselect": "flows.rerun.reselect",
               "reevaluate": "flows.rerun.reevaluate"}
NIGHTLY_DESCRIPTION = ("Nightly curation: ingest the pool (unchanged shards hit the embedding cache), sketch, "
                       "select each budget with each method and seed, finetune, evaluate and report. Results, models "
                       "and lineage events land in the store (parameter store_url).")


def _local(path: str) -> str:
    return path if "://" in path else str(pathlib.Path(path).expanduser().resolve())


def source_config(source: str = "digits", embeddings: bool = False, image_size: int = 32) -> SourceConfig:
    """The CLI's source rule (:func:`flows.curate.source_config`) with local paths made absolute, so every
    scheduled run reads the same pool whatever its working folder."""
    return curate_flow.source_config(source, embeddings, image_size, absolute=True)


def nightly_parameters(source: SourceConfig | None = None, store_url: str = DEFAULT_STORE,
                       budgets: Sequence[int] = (50, 100, 200), methods: Sequence[str] = ("skmm_best", "uniform"),
                       seeds: Sequence[int] = (0,), model: ModelConfig | None = None,
                       sketch_dim: int | Literal["auto"] = "auto", endpoint_url: str | None = None,
                       val_limit: int | None = VAL_LIMIT) -> dict[str, Any]:
    """The ``curate`` parameters the deployment stores (plain JSON; checked now rather than at 2 am).

    ``sketch_dim``: m, or "auto" (``skmm curate``'s default: m chosen from the sketch's spectrum, recorded in the
    lineage); ``val_limit``: as in ``curate`` (stored only when it is not the default)."""
    check_methods(list(methods))
    if not budgets or min(budgets) <= 0 or not seeds:
        raise ValueError("budgets and seeds must be non-empty, budgets positive")
    if sketch_dim != "auto" and (isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim <= 0):
        raise ValueError(f"sketch_dim must be a positive integer or 'auto'; got {sketch_dim!r}")
    if val_limit is not None and (isinstance(val_limit, bool) or not isinstance(val_limit, int) or val_limit <= 0):
        raise ValueError(f"val_limit must be a positive integer or None (the whole val split); got {val_limit!r}")
    params = {"source": (source or SourceConfig()).model_dump(mode="json"), "budgets": list(budgets),
              "methods": list(methods), "seeds": list(seeds), "model": (model or ModelConfig()).model_dump(mode="json"),
              "sketch_dim": sketch_dim, "store_url": _local(store_url), "endpoint_url": endpoint_url}
    if val_limit != VAL_LIMIT:
        params["val_limit"] = val_limit
    return params


def nightly_schedule(cron: str = CRON, timezone: str = TIMEZONE, interval_s: float | None = None) -> Schedule:
    """A cron schedule in an IANA timezone (daylight saving handled by the server), or every ``interval_s``."""
    zoneinfo.ZoneInfo(timezone)  # an unknown zone fails here, not on the server
    if interval_s is not None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive seconds; got {interval_s}")
        return Interval(dt.timedelta(seconds=interval_s), timezone=timezone)
    return Cron(cron, timezone=timezone)


def dask_env(workers: int | None = None, address: str | None = None, gpus: str | None = None) -> dict[str, str]:
    """The job environment that puts a scheduled curate run's shard stages on Dask (:mod:`flows.runners`):
    a local cluster of ``workers`` processes, the cluster at ``address``, or one worker per GPU id in ``gpus``.
    Empty when none is given; checked now (ValueError), not at 2 am."""
    from flows.runners import task_runner_from_env

    env = {key: str(value) for key, value in (("SKMM_DASK_WORKERS", workers), ("SKMM_DASK_ADDRESS", address),
                                              ("SKMM_DASK_GPUS", gpus)) if value}
    task_runner_from_env(env)  # builds the runner (starts nothing): bad or conflicting values fail here
    return env


def build_deployments(parameters: dict[str, Any], schedule: Schedule | None, work_pool: str | None = POOL,
                      name: str = NIGHTLY, checkout: str | os.PathLike | None = None,
                      env: dict[str, str] | None = None) -> list[RunnerDeployment]:
    """curate/<name> on ``schedule`` (None: only when triggered) with ``parameters``, plus reselect/ and
    reevaluate/on-demand on the same store. ``work_pool`` None: for ``serve``. ``checkout``: the folder the runs
    start in (default: cwd). ``env``: environment of the curate run's job, a work pool's job variable (e.g.
    :func:`dask_env`, or the test-only fault switch ``SKMM_FAULT_FILE`` of :mod:`flows.faults`)."""
    source = str(pathlib.Path(checkout or os.getcwd()).resolve())
    nightly = flow.from_source(source, ENTRYPOINTS["curate"]).to_deployment(
        name, schedules=[schedule] if schedule is not None else [], parameters=parameters,
        description=NIGHTLY_DESCRIPTION,
        tags=[*TAGS, "scheduled"], work_pool_name=work_pool, job_variables={"env": env} if env else None,
        # Tonight's run is dropped, not queued, while yesterday's is still going.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW))
    store = {"store_url": parameters["store_url"], "endpoint_url": parameters.get("endpoint_url")}
    reruns = [
        flow.from_source(source, ENTRYPOINTS[kind]).to_deployment(
            "on-demand", parameters=store, tags=[*TAGS, "on-demand"], work_pool_name=work_pool, description=text)
        for kind, text in (
            ("reselect", "Select again from an earlier run's sketch (parameters run = its run id, whose result is "
                         "in the store under runs/<run_id>.json, or that JSON result; budgets), then finetune, "
                         "evaluate and report."),
            ("reevaluate", "Evaluate an earlier run's models again (parameter run = its run id, whose result is in "
                           "the store under runs/<run_id>.json, or that JSON result)."))]
    return [nightly, *reruns]


def ensure_process_pool(name: str = POOL) -> bool:
    """Create the ``process`` work pool ``name`` unless it exists (an existing one is left as configured).
    Returns True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description=f"skmm curation runs in local processes (start: prefect worker start --pool {name})"))
            return True
    if pool.type != "process":
        raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; these deployments need 'process'")
    return False


def register(deployments: Sequence[RunnerDeployment], work_pool: str = POOL) -> list[UUID]:
    """Create or update ``deployments`` on the server at PREFECT_API_URL, in work pool ``work_pool``."""
    ensure_process_pool(work_pool)
    return deploy(*deployments, work_pool_name=work_pool, print_next_steps_message=False, ignore_warnings=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _sketch_dim(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.curate_nightly", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["deploy", "serve"],
                   help="deploy: to a process work pool on the server at PREFECT_API_URL; serve: run them here")
    p.add_argument("--pool", default=POOL, help="work pool for 'deploy' (created as type process if missing)")
    p.add_argument("--name", default=NIGHTLY, help="name of the scheduled curate deployment")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", default=CRON, help="cron schedule (default: %(default)s)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS instead of on a cron")
    p.add_argument("--timezone", default=TIMEZONE, help="IANA timezone of the schedule (default: %(default)s)")
    p.add_argument("--source", default="digits", help="'digits', an image folder, or a manifest (.csv/.tsv/.parquet)")
    p.add_argument("--embeddings", action="store_true", help="the source is a table of precomputed embeddings")
    p.add_argument("--store", default=DEFAULT_STORE, help="store folder or URL (s3://...); local paths made absolute")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (credentials: worker environment)")
    p.add_argument("--budgets", type=_ints, default=[50, 100, 200], help="comma-separated budgets")
    p.add_argument("--methods", type=lambda t: [m for m in t.split(",") if m], default=["skmm_best", "uniform"])
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--model", default=ModelConfig().name, help="open_clip model name")
    p.add_argument("--pretrained", default=None, help="pretrained tag or local weights (default: random init)")
    p.add_argument("--sketch-dim", type=_sketch_dim, default="auto",
                   help="sketch dimension m, or 'auto' (default: chosen from the sketch's spectrum, as skmm curate)")
    p.add_argument("--val-limit", type=int, default=VAL_LIMIT, metavar="N",
                   help="choices on the val split use its N smallest sample ids; 0: the whole split "
                        "(default: %(default)s)")
    p.add_argument("--checkout", default=None, help="folder the runs start in (default: current folder)")
    dask = p.add_mutually_exclusive_group()
    dask.add_argument("--dask-workers", type=int, default=None,
                      help="run the shard stages on a local Dask cluster of N worker processes")
    dask.add_argument("--dask-address", default=None, help="... or on the Dask cluster at this scheduler address")
    dask.add_argument("--dask-gpus", default=None, help="... or on a local cluster with one worker per GPU (0,1,..)")
    return p


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit code 2 (argparse's code for bad usage)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Register (``deploy``) or ``serve`` the deployments, as the command line asks."""
    from prefect.settings import get_current_settings

    args = _parser().parse_args(argv)
    try:  # everything checkable is checked before the server is involved
        params = nightly_parameters(source_config(args.source, args.embeddings), args.store, args.budgets,
                                    args.methods, args.seeds, ModelConfig(name=args.model, pretrained=args.pretrained),
                                    args.sketch_dim, args.endpoint_url, args.val_limit or None)
        schedule = nightly_schedule(args.cron, args.timezone, args.interval)
        env = dask_env(args.dask_workers, args.dask_address, args.dask_gpus)
    except zoneinfo.ZoneInfoNotFoundError:
        _fail(f"--timezone {args.timezone!r} is not an IANA timezone (e.g. UTC, Europe/Berlin)")
    except (ValueError, FileNotFoundError) as exc:  # pydantic's ValidationError is a ValueError
        _fail(str(exc))
    if not get_current_settings().api.url:
        _fail("PREFECT_API_URL is not set: point it at a standing server (prefect server start), e.g. export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api. A temporary server never fires schedules.")
    pool = args.pool if args.command == "deploy" else None
    if pool is None:  # serve: flow runs are subprocesses of this one, and inherit its environment
        os.environ.update(env)
    deployments = build_deployments(params, schedule, pool, args.name, args.checkout, env if pool else None)
    if args.command == "deploy":
        ids = register(deployments, pool)
        print(f"registered {len(ids)} deployment(s) in work pool {pool!r}; start a worker: "
              f"prefect worker start --pool {pool}")
    else:
        serve(*deployments)


if __name__ == "__main__":
    main()
