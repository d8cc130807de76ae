"""The curate flow on a real Dask cluster (2 worker processes) against moto's S3 store: the same dataset, the
bitwise-same features, and the same selections and metrics as the single-process run."""

from __future__ import annotations

import pytest
from flow_helpers import FAST, task_states

from flows.curate import SourceConfig, curate
from flows.runners import dask_task_runner, gpu_cluster, task_runner_from_env
from storage.artifacts import ArtifactRef
from storage.datasets import VectorTableRef, read_vectors
from storage.selections import read_selection
from tasks.store import open_store, store_spec

ARGS = {**FAST, "source": SourceConfig(shard_rows=400)}  # digits in 5 shards: 5 embed tasks to spread


def _summary(result: dict, store: dict) -> dict:
    st = open_store(store)
    ids, features = read_vectors(st, VectorTableRef.from_dict(result["embeddings"]))
    selections = {(r["method"], r["n"], r["seed"]): read_selection(st, ArtifactRef.from_dict(r["selection"]))
                  .column("sample_id").to_pylist() for r in result["results"]}
    metrics = {(r["method"], r["n"], r["seed"]): (r["accuracy"], r["macro_f1"]) for r in result["results"]}
    return {"dataset": result["dataset"]["version"], "ids": ids, "features": features,
            "feature_sha": result["embeddings"]["artifact"]["sha256"], "selections": selections, "metrics": metrics}


def test_curate_on_a_two_worker_dask_cluster_equals_one_process(prefect_server, s3_bucket):
    from distributed import Client, LocalCluster

    name, options = s3_bucket
    single_store = store_spec(f"s3://{name}/single", options["endpoint_url"])
    dask_store = store_spec(f"s3://{name}/dask", options["endpoint_url"])  # its own cache: nothing is a hit
    single = curate(**ARGS, store_url=single_store["url"], endpoint_url=options["endpoint_url"])

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        flow = curate.with_options(task_runner=dask_task_runner(address=cluster.scheduler_address))
        state = flow(**ARGS, store_url=dask_store["url"], endpoint_url=options["endpoint_url"], return_state=True)
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    distributed_result = state.result()

    assert sorted(executed.values())[0] > 0 and sum(executed.values()) >= 5, executed  # both workers embedded
    assert task_states(state)["embed"] == ["Completed"] * 5
    a, b = _summary(single, single_store), _summary(distributed_result, dask_store)
    assert a["dataset"] == b["dataset"] and a["ids"] == b["ids"]
    assert a["feature_sha"] == b["feature_sha"] and (a["features"] == b["features"]).all()
    assert a["selections"] == b["selections"]
    assert a["metrics"] == b["metrics"]


def test_runner_choices_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        dask_task_runner()
    with pytest.raises(ValueError, match="exactly one"):
        dask_task_runner(workers=2, address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="--dask-address"):
        dask_task_runner(address="127.0.0.1:8786")
    with pytest.raises(ValueError, match="--dask-workers"):
        dask_task_runner(workers=-1)
    with pytest.raises(ValueError, match="SKMM_DASK_WORKERS"):
        task_runner_from_env({"SKMM_DASK_WORKERS": "two"})
    assert type(task_runner_from_env({})).__name__ == "ThreadPoolTaskRunner"
    runner = task_runner_from_env({"SKMM_DASK_ADDRESS": "tcp://10.0.0.1:8786"})  # not contacted: only configured
    assert type(runner).__name__ == "DaskTaskRunner" and runner.address == "tcp://10.0.0.1:8786"


def test_gpu_cluster_gives_each_worker_one_device():
    """One worker per device, each seeing only its own (checked in the workers' environment; no GPU needed)."""
    from distributed import Client

    with gpu_cluster(["0", "1"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        names = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
    assert sorted(seen.values()) == ["0", "1"]
    assert sorted(names) == ["gpu-0", "gpu-1"]
    with pytest.raises(ValueError, match="at least one device"):
        gpu_cluster([])


def test_cli_runs_the_shard_stages_on_a_local_dask_cluster(prefect_server, tmp_path):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    args = ["curate", "digits", "--model", "skmm-tiny-vit", "--budgets", "20", "--methods", "uniform",
            "--sketch-dim", "16", "--no-progress", "--json"]
    plain = CliRunner().invoke(app, [*args, "--store", str(tmp_path / "a")])
    on_dask = CliRunner().invoke(app, [*args, "--store", str(tmp_path / "b"), "--dask-workers", "2"])
    assert plain.exit_code == 0 and on_dask.exit_code == 0, on_dask.output
    a, b = (json.loads(r.stdout) for r in (plain, on_dask))
    assert a["embeddings"]["artifact"]["sha256"] == b["embeddings"]["artifact"]["sha256"]
    assert a["results"][0]["accuracy"] == b["results"][0]["accuracy"]

    both = CliRunner().invoke(app, [*args, "--dask-workers", "2", "--dask-address", "tcp://127.0.0.1:1"])
    assert both.exit_code == 2 and "exactly one of --dask-workers, --dask-address, --dask-gpus" in both.stderr
