"""The curation deployments on a real standing Prefect server (``prefect server start``, not the test harness,
whose temporary server never fires schedules): registration (cron + timezone stored as given, and the server
plans runs on it), a run triggered now and executed by a real process worker, a served interval schedule that
fires by itself, and prefect.yaml agreeing with the Python definitions.

The server (tests/server_helpers.py, one for tests/deployments) runs on a free loopback port with its own
PREFECT_HOME and SQLite file; workers and ``serve`` run in their own process group and are stopped, with the flow
runs they spawned, whatever the outcome. Runs use the bundled digits and the tiny open_clip tower; the module
shares one store, so later runs hit the first's cache.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import pathlib
import subprocess
import sys
import time
import zoneinfo
from uuid import UUID

import pytest
from helpers import free_port
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from server_helpers import REPO, RUN_TIMEOUT_S, api, prefect_env, running, tail, wait_final, worker_command

from deployments.curate_nightly import (
    CRON,
    POOL,
    TIMEZONE,
    build_deployments,
    ensure_process_pool,
    main,
    nightly_parameters,
    nightly_schedule,
    source_config,
)
from flows.curate import ModelConfig, SourceConfig
from skmm.models import TINY_MODEL
from storage.artifacts import ArtifactRef
from storage.index import LineageIndex
from storage.lineage import git_commit
from storage.runs import read_run_result
from tasks.store import open_store, store_spec

FAST = ["--budgets", "20", "--methods", "skmm_best,uniform", "--seeds", "0", "--model", TINY_MODEL,
        "--sketch-dim", "16"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("curation") / "store"


# ------------------------------------------------------------------------------------------ checks


def assert_outputs_in_store(store_dir: pathlib.Path, flow_run_id: UUID, tmp_path: pathlib.Path) -> None:
    """The flow run's lineage is in the store, complete and from this checkout; its models read back verified
    and each was trained on exactly the budget's 20 samples."""
    st = open_store(store_spec(store_dir))
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(st)
    (run,) = [r for r in index.table("runs").to_pylist() if r["flow_run_id"] == str(flow_run_id)]
    assert run["status"] == "completed" and run["git_commit"] == git_commit(), run
    models = [m for m in index.table("models").to_pylist() if m["run_id"] == run["run_id"]]
    assert {m["stage"].split(".")[1] for m in models} >= {"skmm_best", "uniform"}, models
    for m in models:
        st.get_bytes(ArtifactRef(m["model_uri"], m["model_sha256"], m["model_size"], m["model_kind"]))
        assert index.samples_for_model(m["model_sha256"]).num_rows == 20


# ------------------------------------------------------------------------------------------ tests


def test_deploy_stores_the_cron_and_a_process_worker_runs_it(server, shared_store, tmp_path):
    with api(server.api_url) as client:
        main(["deploy", "--cron", "30 3 * * 1-5", "--timezone", "Europe/Berlin", "--store", str(shared_store),
              *FAST, "--checkout", str(REPO)])
        nightly = client.read_deployment_by_name("curate/nightly")
        assert client.read_work_pool(POOL).type == "process"
        for name in ("reselect/on-demand", "reevaluate/on-demand"):
            rerun = client.read_deployment_by_name(name)
            assert rerun.schedules == [] and rerun.parameters["store_url"] == str(shared_store)

    (sched,) = nightly.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("30 3 * * 1-5", "Europe/Berlin", True)
    assert nightly.work_pool_name == POOL and nightly.entrypoint == "flows.curate.curate"
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert {"skmm", "curation", "scheduled"} <= set(nightly.tags) and nightly.description.startswith("Nightly")
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == "CANCEL_NEW"
    p = nightly.parameters
    assert (p["budgets"], p["methods"], p["model"]["name"]) == ([20], ["skmm_best", "uniform"], TINY_MODEL)
    assert p["store_url"] == str(shared_store) and p["source"]["kind"] == "digits"

    worker_log = tmp_path / "worker.log"
    worker = worker_command(POOL)
    env = prefect_env(server.root / "worker-home", server.api_url, PREFECT_WORKER_QUERY_SECONDS="1")
    with running(worker, worker_log, env), api(server.api_url) as client:
        triggered = run_deployment("curate/nightly", timeout=0, as_subflow=False)
        # Meanwhile: the scheduler has planned the cron's next runs, at 03:30 Berlin time, Monday to Friday.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            planned = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[nightly.id]))) if r.auto_scheduled]
            if planned:
                break
            time.sleep(1)
        assert planned, "the scheduler planned no runs"
        berlin = [r.expected_start_time.astimezone(zoneinfo.ZoneInfo("Europe/Berlin")) for r in planned]
        assert all((t.hour, t.minute, t.isoweekday() <= 5) == (3, 30, True) for t in berlin), berlin

        run = wait_final(server.api_url, triggered.id, worker_log)
        # A scheduled run leaves no --json file: reselect/on-demand starts from its run id (result in the store).
        st = open_store(store_spec(shared_store))
        (curated,) = [p.rsplit("/", 1)[-1].removesuffix(".json") for p in st.list_paths("runs")]
        rerun = run_deployment("reselect/on-demand", parameters={"run": curated, "budgets": [20],
                                                                  "methods": ["uniform"]}, timeout=0, as_subflow=False)
        wait_final(server.api_url, rerun.id, worker_log)
    assert run.deployment_id == nightly.id and not run.auto_scheduled
    assert_outputs_in_store(shared_store, run.id, tmp_path)
    (again,) = [read_run_result(st, p.rsplit("/", 1)[-1].removesuffix(".json")) for p in st.list_paths("runs")
                if curated not in p]
    assert again["sketch"] == read_run_result(st, curated)["sketch"]
    assert [(r["method"], r["n"]) for r in again["results"]] == [("uniform", 20)]


def test_a_served_interval_schedule_fires_by_itself(server, shared_store, tmp_path):
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "deployments.curate_nightly", "serve", "--name", "every-5s", "--interval", "5",
           "--store", str(shared_store), *FAST]
    env = prefect_env(server.root / "serve-home", server.api_url, PREFECT_RUNNER_POLL_FREQUENCY="1")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    fired = served = None
    with running(cmd, log, env) as proc, api(server.api_url) as client:
        while fired is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited with {proc.returncode}\n{tail(log)}"
            time.sleep(1)
            with contextlib.suppress(ObjectNotFound):
                served = client.read_deployment_by_name("curate/every-5s")
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                    any_=[served.id])))
                fired = next((r for r in runs if r.state and r.state.is_completed()), None)
    assert fired is not None, f"no scheduled run completed in {RUN_TIMEOUT_S} s\n{tail(log)}"
    assert fired.auto_scheduled, "the completed run was not created by the scheduler"
    assert served.schedules[0].schedule.interval == dt.timedelta(seconds=5)
    assert served.work_pool_name is None  # served: the serve process runs it, no pool or worker
    assert_outputs_in_store(shared_store, fired.id, tmp_path)


def test_prefect_yaml_registers_what_the_python_definitions_do(server, tmp_path):
    with api(server.api_url):
        ensure_process_pool(POOL)  # prefect deploy needs the pool to exist
    out = subprocess.run([sys.executable, "-m", "prefect", "deploy", "--all", "--prefect-file",
                          "deployments/prefect.yaml", "--no-prompt"], cwd=REPO, capture_output=True, text=True,
                         env=prefect_env(server.root / "cli-home", server.api_url), stdin=subprocess.DEVNULL,
                         timeout=RUN_TIMEOUT_S, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    expected = build_deployments(nightly_parameters(store_url=str(REPO / "skmm-store")), nightly_schedule(),
                                 checkout=REPO)
    assert (expected[0].schedules[0].schedule.cron, expected[0].schedules[0].schedule.timezone) == (CRON, TIMEZONE)
    with api(server.api_url) as client:
        for want in expected:
            got = client.read_deployment_by_name(f"{want.flow_name}/{want.name}")
            assert (got.entrypoint, got.description, sorted(got.tags), got.work_pool_name) == (
                want.entrypoint, want.description, sorted(want.tags), want.work_pool_name), want.name
            assert got.pull_steps == [want.storage.to_pull_step()]
            assert [(s.schedule, s.active) for s in got.schedules] == [(s.schedule, s.active) for s in want.schedules]
            limit = got.global_concurrency_limit.limit if got.global_concurrency_limit else None
            assert (limit, got.concurrency_options) == (want.concurrency_limit, want.concurrency_options), want.name
            params = dict(got.parameters)
            params["store_url"] = str((REPO / params["store_url"]).resolve())  # relative to the working folder
            for key, config in (("source", SourceConfig), ("model", ModelConfig)):
                if key in want.parameters:
                    assert config.model_validate(params.pop(key)) == config.model_validate(want.parameters[key])
            assert params == {k: v for k, v in want.parameters.items() if k not in ("source", "model")}, want.name


def test_refuses_to_run_without_a_standing_server(tmp_path, capsys):
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as info:
        main(["deploy", "--store", str(tmp_path / "store")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: PREFECT_API_URL is not set: point it at a standing server")


BAD_DEPLOY_OPTIONS = [
    (["--source", "{tmp}/missing-pool"], "error: source '{tmp}/missing-pool' does not exist or is no manifest "),
    (["--timezone", "Mars/Olympus_Mons"], "error: --timezone 'Mars/Olympus_Mons' is not an IANA timezone"),
    (["--methods", "skmm_best,nope"], "error: unknown selection method(s) ['nope']"),
    (["--dask-address", "127.0.0.1:8786"], "error: --dask-address must be a scheduler URL"),
]


@pytest.mark.parametrize(("args", "message"), BAD_DEPLOY_OPTIONS)
def test_bad_deploy_options_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    """One line on stderr, no traceback, before any server is contacted (PREFECT_API_URL points at a port where
    nothing listens)."""
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), \
            pytest.raises(SystemExit) as info:
        main(["deploy", *[a.format(tmp=tmp_path) for a in args]])
    assert info.value.code == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith(message.format(tmp=tmp_path)), out.err
    assert out.out == ""


def test_a_bad_deploy_option_is_one_line_where_the_module_runs_as_a_user_runs_it(tmp_path):
    """The real module in its own interpreter (``python -m deployments.curate_nightly``): exit 2, one line, no
    traceback, nothing on stdout (the cases above run in this process: each interpreter costs ~5 s)."""
    args, message = BAD_DEPLOY_OPTIONS[0]
    env = prefect_env(tmp_path / "home", f"http://127.0.0.1:{free_port()}/api")
    cmd = [sys.executable, "-m", "deployments.curate_nightly", "deploy", *[a.format(tmp=tmp_path) for a in args]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message.format(tmp=tmp_path)), proc.stderr
    assert proc.stdout == ""


def test_bad_schedules_and_parameters_fail_at_registration():
    with pytest.raises(zoneinfo.ZoneInfoNotFoundError):
        nightly_schedule(timezone="Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="cron"):
        nightly_schedule(cron="every night")
    with pytest.raises(ValueError, match="unknown selection method"):
        nightly_parameters(methods=["skmm_best", "nope"])


def test_sources_are_stored_with_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "pool" / "3").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert source_config("pool") == SourceConfig(kind="folder", path=str(tmp_path / "pool"))
    assert source_config("later.parquet").path == str(tmp_path / "later.parquet")  # a manifest may appear later
    assert source_config("emb.parquet", embeddings=True).kind == "embeddings"
    assert source_config("s3://bucket/pool.csv") == SourceConfig(kind="manifest", path="s3://bucket/pool.csv")
    with pytest.raises(ValueError, match="expected 'digits'"):
        source_config("no-such-folder")
    assert nightly_parameters(store_url="rel/store")["store_url"] == str(tmp_path / "rel" / "store")


def test_dask_options_become_the_nightly_job_environment(tmp_path):
    """--dask-* options reach the scheduled run as job variables (env), which flows.runners reads at import."""
    from deployments.curate_nightly import dask_env

    assert dask_env() == {}
    env = dask_env(workers=4)
    assert env == {"SKMM_DASK_WORKERS": "4"}
    with pytest.raises(ValueError, match="exactly one"):
        dask_env(workers=2, address="tcp://127.0.0.1:8786")
    nightly, *reruns = build_deployments(nightly_parameters(store_url=str(tmp_path / "store")), nightly_schedule(),
                                         env=env)
    assert nightly.job_variables == {"env": {"SKMM_DASK_WORKERS": "4"}}
    assert all(not d.job_variables for d in reruns)  # re-runs have no shard stages


def test_the_nightly_run_uses_curates_automatic_m_and_takes_val_limit():
    """The scheduled run's defaults are skmm curate's: the automatic sketch dimension and the default val sample."""
    from deployments.curate_nightly import _parser
    from tasks.finetune import VAL_LIMIT

    params = nightly_parameters()
    assert params["sketch_dim"] == "auto" and "val_limit" not in params  # the flow's own default applies
    assert nightly_parameters(sketch_dim=32, val_limit=500)["sketch_dim"] == 32
    assert nightly_parameters(val_limit=500)["val_limit"] == 500
    assert nightly_parameters(val_limit=None)["val_limit"] is None
    for bad in ({"sketch_dim": 0}, {"sketch_dim": "big"}, {"val_limit": 0}, {"val_limit": True}):
        with pytest.raises(ValueError):
            nightly_parameters(**bad)
    args = _parser().parse_args(["deploy", "--sketch-dim", "48", "--val-limit", "0"])
    assert (args.sketch_dim, args.val_limit) == (48, 0)
    args = _parser().parse_args(["deploy"])
    assert (args.sketch_dim, args.val_limit) == ("auto", VAL_LIMIT)
