"""The curate flow on a real Dask cluster (2 worker processes) against moto's S3 store: the same dataset, the
bitwise-same features, and the same selections and metrics as the single-process run."""

from __future__ import annotations

import pytest
from flow_helpers import FAST, task_states

from flows.curate import SourceConfig, curate
from flows.runners import (
    DAEMON_SETTING,
    HTTP_ADDRESS,
    LOOPBACK,
    dask_task_runner,
    gpu_cluster,
    local_cluster,
    spawn_env,
    task_runner_from_env,
    worker_env,
)
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

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, host=LOOPBACK,
                      scheduler_kwargs={"dashboard_address": HTTP_ADDRESS}) as cluster, Client(cluster) as client:
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


def test_a_local_clusters_workers_share_the_cores_instead_of_each_taking_them_all(monkeypatch):
    """Each worker of a local cluster gets its share of the cores: share − 1 decode processes and share torch
    threads, as one process gets the machine. Before, every worker forked cores − 1 decoders (with 2 workers on 2
    cores: 2 encoders and 2 decoders on 2 cores), so a 2-worker cluster barely outran one worker."""
    from distributed import Client

    for name in ("SKMM_DECODE_WORKERS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert worker_env(2, cores=2) == {"SKMM_DECODE_WORKERS": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert worker_env(1, cores=16)["SKMM_DECODE_WORKERS"] == "15"
    assert worker_env(4, 2, cores=16)["OMP_NUM_THREADS"] == "2"
    assert worker_env(3, cores=2)["SKMM_DECODE_WORKERS"] == "0"  # more slots than cores: one core each, no decoders
    mine = worker_env(2, cores=2, environ={"SKMM_DECODE_WORKERS": "3", "OMP_NUM_THREADS": "4"})  # the user's choice
    assert (mine["SKMM_DECODE_WORKERS"], mine["OMP_NUM_THREADS"], mine["MKL_NUM_THREADS"]) == ("3", "4", "1")
    runner = dask_task_runner(workers=2)
    assert runner.cluster_class is local_cluster and runner.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1}
    with local_cluster(2) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        seen = client.run(lambda: {k: __import__("os").environ.get(k) for k in worker_env(2)})
    assert list(seen.values()) == [worker_env(2)] * 2


def _start_environment() -> dict[str, str]:
    """This process's environment as it started (what glibc's malloc read), not as it is now."""
    with open("/proc/self/environ", "rb") as fh:
        pairs = [item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


def test_a_local_clusters_workers_start_with_glibcs_mmap_threshold(monkeypatch):
    """Dask's nanny starts each worker with MALLOC_TRIM_THRESHOLD_ set, which turns glibc's dynamic mmap threshold
    off: every allocation over 128 KiB (each tensor of a forward pass, each decoded image) was a fresh mmap, its
    pages faulted in again. ViT-S-32 decoded 1.41× and encoded 1.27× slower in a Dask worker than in a plain
    process (bench/README.md §13). The workers now start with the threshold at glibc's ceiling, 32 MiB; the
    user's own value wins."""
    from distributed import Client

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert spawn_env() == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    assert spawn_env({"MALLOC_MMAP_THRESHOLD_": "1048576"}) == {"MALLOC_MMAP_THRESHOLD_": "1048576"}
    with local_cluster(1) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=120)
        (seen,) = client.run(_start_environment).values()
    assert seen.get("MALLOC_MMAP_THRESHOLD_") == str(32 << 20)
    assert "MALLOC_TRIM_THRESHOLD_" in seen  # Dask's trimming stays


# A main module that imports torch at the top, as a user's script or bench/dask_cpu.py does: Dask's spawned
# workers import it again (as ``__mp_main__``) before the nanny applies their environment, so torch's OpenMP and
# MKL read the thread counts the workers' processes started with.
TORCH_FIRST_MAIN = """
import os
import torch

def threads():
    import torch
    return torch.get_num_threads()

if __name__ == "__main__":
    from distributed import Client
    from flows.runners import local_cluster
    cores = len(os.sched_getaffinity(0))  # one worker's share: every core
    for _ in range(2):  # a second cluster in the same process gets its share too
        with local_cluster(1) as cluster, Client(cluster) as client:
            print("RESULT", cores, client.submit(threads, pure=False).result(), flush=True)
"""


def test_a_local_clusters_workers_encode_with_their_share_of_threads_even_where_torch_loads_first(tmp_path):
    """Dask sets OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) in the environment a worker process starts with, and
    the nanny's own values (ours: the worker's share of the cores) only once the worker runs. Where the main
    module imports torch (a user's script, bench/dask_cpu.py), the spawned worker loaded torch before that: a
    worker given two cores encoded on one thread (bench/README.md §13: a 2-core worker half the default runner's
    speed; its torch threads used 0.3 of the stage's 83 CPU seconds)."""
    import os
    import subprocess
    import sys

    main = tmp_path / "torch_first.py"
    main.write_text(TORCH_FIRST_MAIN)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, str(main)], env=env, cwd=os.getcwd(), text=True, capture_output=True,
                         timeout=300, check=False)
    results = [ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert len(results) == 2, out.stdout[-2000:] + out.stderr[-4000:]
    for share, used in results:
        assert used == share, results


def test_starting_a_local_cluster_leaves_this_processs_environment_as_it_was(monkeypatch):
    """Dask's nanny writes the variables it sets before spawning a worker (OMP_NUM_THREADS=1,
    MALLOC_TRIM_THRESHOLD_, ...) into the environment of the process that starts the cluster, and leaves them
    there: the flow's process then handed one thread to every process it started later (a second cluster's
    workers took OMP_NUM_THREADS=1 for the user's choice)."""
    import os

    from distributed import Client

    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_MMAP_THRESHOLD_")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONHASHSEED", "11")

    def environment() -> dict[str, str]:  # less Dask's marker of the process that imported it (proctitle)
        return {k: v for k, v in os.environ.items() if k != "__DASK_PARENT_PID"}

    before = environment()
    with local_cluster(1) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=120)
        assert environment() == before
        (started,) = client.run(_start_environment).values()
    assert environment() == before
    assert (started["OMP_NUM_THREADS"], started["MKL_NUM_THREADS"]) == (
        worker_env(1)["OMP_NUM_THREADS"], worker_env(1)["MKL_NUM_THREADS"])  # set as the worker's process starts


def test_clusters_started_together_start_each_worker_with_its_own_clusters_share(monkeypatch):
    """A nanny writes its worker's variables into this process's environment and its worker is spawned from
    another thread a moment later: two clusters with different shares, started at once in one process (two
    flow runs), gave one cluster's workers the other's OMP_NUM_THREADS. The spawn is slowed here to make the
    window as wide as a loaded machine's."""
    import multiprocessing.context
    import threading
    import time

    from distributed import Client

    monkeypatch.setattr("flows.runners.available_cores", lambda: 4)  # shares 4 (1 worker) and 2 (2 workers)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SKMM_DECODE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    spawn = multiprocessing.context.SpawnProcess._Popen

    def slow_spawn(process_obj):
        time.sleep(1.0)
        return spawn(process_obj)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "_Popen", staticmethod(slow_spawn))
    barrier, seen, errors = threading.Barrier(2), {}, []

    def start(workers: int) -> None:
        try:
            barrier.wait(timeout=60)
            with local_cluster(workers) as cluster, Client(cluster) as client:
                client.wait_for_workers(workers, timeout=120)
                seen[workers] = sorted(env["OMP_NUM_THREADS"] for env in client.run(_start_environment).values())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(workers,)) for workers in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert seen == {1: ["4"], 2: ["2", "2"]}


def _embed_in_this_process(images: list[bytes]) -> tuple[bool, bool, object]:
    import multiprocessing

    from skmm.models import TINY_MODEL, ClipSpec, embed_images
    from skmm.models.clip import _can_fork

    features = embed_images(images, ClipSpec(TINY_MODEL, init_seed=3), device="cpu")
    return multiprocessing.current_process().daemon, _can_fork(), features


def test_a_local_clusters_workers_may_fork_so_a_many_core_worker_embeds_as_one_process_does():
    """Dask's workers are daemonic, and a daemonic process may not fork: a worker with several cores decoded in
    its task's thread while a core idled (bench/README.md §13), and a GPU's worker decoded in threads. Our local
    clusters' workers are not daemonic (Dask's ``distributed.worker.daemon``), so they fork the block or decode
    workers a single process would; the features are bitwise the same. Dask's setting is put back afterwards."""
    import dask
    import numpy as np
    from distributed import Client
    from helpers import random_png

    images = [random_png(i) for i in range(150)]  # three 64-image blocks: block workers where the worker may fork
    with local_cluster(1) as cluster, Client(cluster) as client:
        daemonic, can_fork, features = client.submit(_embed_in_this_process, images, pure=False).result()
    assert (daemonic, can_fork) == (False, True)
    assert np.array_equal(features, _embed_in_this_process(images)[2])
    assert dask.config.get(DAEMON_SETTING) is True  # Dask's own default, for clusters that are not ours


STRANDED_CLUSTER = """
import sys

from distributed import Client
from helpers import random_png

from flows.runners import local_cluster

def embed(images):  # leaves the worker's shared block workers running, as a shard task does
    from skmm.models import TINY_MODEL, ClipSpec, embed_images
    return embed_images(images, ClipSpec(TINY_MODEL, init_seed=3), device="cpu").shape

if __name__ == "__main__":
    cluster = local_cluster(1)
    client = Client(cluster)
    print("EMBEDDED", client.submit(embed, [random_png(i) for i in range(150)], pure=False).result(), flush=True)
    sys.exit(3)  # neither the client nor the cluster closed
"""


def test_a_process_that_exits_without_closing_its_cluster_does_not_wait_for_the_workers(tmp_path):
    """Python joins a process's non-daemonic children when it exits; a cluster left open, its worker holding the
    block workers of an embed, must not make the flow's process wait for its workers (Dask closes its clusters at
    exit, and the worker stops its block workers as it ends)."""
    import os
    import pathlib
    import subprocess
    import sys

    main = tmp_path / "stranded.py"
    main.write_text(STRANDED_CLUSTER)
    tests = str(pathlib.Path(__file__).resolve().parents[1])  # for tests/helpers.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(main)], env=env, cwd=os.getcwd(), text=True, capture_output=True,
                         timeout=180, check=False)
    assert "EMBEDDED (150, " in out.stdout and out.returncode == 3, out.stdout[-2000:] + out.stderr[-4000:]


TEMPORARY_SERVER_FLOW = """
import os
from prefect import flow, task
from flows.runners import dask_task_runner, prefect_api_env

@task
def where() -> str | None:
    return os.environ.get("PREFECT_API_URL")

@flow(task_runner=dask_task_runner(workers=1))
def probe() -> tuple:
    return prefect_api_env().get("PREFECT_API_URL"), where.submit().result()

print("RESULT", *probe())
"""


def test_a_local_clusters_workers_report_to_the_flows_temporary_server(tmp_path):
    """With the embedded temporary server (no PREFECT_API_URL), the workers of a cluster the flow starts are given
    that server's API: before, each worker started a temporary server of its own on its first task (~8 s of CPU,
    and its task runs recorded there)."""
    import os
    import subprocess
    import sys

    from server_helpers import prefect_env

    env = prefect_env(tmp_path / "home")  # no PREFECT_API_URL: the flow starts a temporary server
    out = subprocess.run([sys.executable, "-c", TEMPORARY_SERVER_FLOW], env=env, cwd=os.getcwd(), text=True,
                         capture_output=True, timeout=300, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-4000:]
    _, flow_api, worker_api = line.split()
    assert flow_api.startswith("http://127.0.0.1:") and worker_api == flow_api


def test_gpu_cluster_gives_each_worker_one_device():
    """One worker per device, each seeing only its own (checked in the workers' environment; no GPU needed)."""
    from distributed import Client

    with gpu_cluster(["0", "1"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        started = client.run(_start_environment)
        names = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
        decoders = [spec["options"]["env"]["SKMM_DECODE_WORKERS"] for spec in cluster.worker_spec.values()]
    assert sorted(seen.values()) == ["0", "1"]
    assert [env.get("MALLOC_MMAP_THRESHOLD_") for env in started.values()] == [str(32 << 20)] * 2
    assert sorted(names) == ["gpu-0", "gpu-1"]
    assert decoders == [worker_env(2)["SKMM_DECODE_WORKERS"]] * 2  # each worker's share of the host's cores
    with pytest.raises(ValueError, match="at least one device"):
        gpu_cluster([])


def _listening(pids: set[int]) -> set[tuple[int, str, int]]:
    """(pid, ip, port) of every TCP socket these processes listen on."""
    import psutil

    found = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((pid, conn.laddr.ip, conn.laddr.port))
    return found


@pytest.mark.parametrize("make", [lambda: local_cluster(1), lambda: gpu_cluster(["0"])], ids=["local", "gpu"])
def test_a_clusters_scheduler_and_workers_listen_on_loopback_only(make):
    """A Dask scheduler runs whatever pickled function a client sends it: the GPU cluster's scheduler, nanny and
    worker listened on every interface (0.0.0.0 and ::), so anyone who could reach the host could run code as the
    user. Our local clusters listen on 127.0.0.1 alone, the HTTP server (Dask's /health and /metrics) on a free
    port rather than 8787."""
    import os

    import psutil

    me = os.getpid()
    before = _listening({me})
    with make() as cluster:
        cluster.wait_for_workers(1, timeout=120)
        children = {p.pid for p in psutil.Process(me).children(recursive=True)}
        opened = _listening({me, *children}) - before
        addresses = [cluster.scheduler_address, *cluster.scheduler_info["workers"]]
    assert {pid for pid, _, _ in opened} & children and me in {pid for pid, _, _ in opened}
    assert {ip for _, ip, _ in opened} == {"127.0.0.1"}, sorted(opened)
    assert 8787 not in {port for _, _, port in opened}  # a free port is never 8787 (below the ephemeral range)
    assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses


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
