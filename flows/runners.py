"""Where the shard-level stages run: Prefect's thread pool (default), or a Dask cluster through prefect-dask.

The curate flow submits one task per dataset shard (embedding); each task reads its shard from the store and
writes its vectors back to the store, returning a small ref. So the same flow scales out by changing only its
task runner — no scheduler of our own:

    curate.with_options(task_runner=dask_task_runner(workers=4))              # a local cluster, 4 processes
    curate.with_options(task_runner=dask_task_runner(address="tcp://h:8786"))  # an existing cluster
    curate.with_options(task_runner=dask_task_runner(gpus=["0", "1"]))       # one worker per GPU

Workers must reach the store (an s3:// store for a cluster of several machines; a local folder works on one
machine) and import this package (install it on every worker). Each worker runs one task at a time by default.

A local cluster (``workers`` or ``gpus``) shares this machine's cores among its task slots (workers × threads per
worker): each worker's embed tasks get that share as torch threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``; Dask
sets 1 per worker otherwise), so that workers do not oversubscribe the cores. ``SKMM_DECODE_WORKERS`` (share − 1)
is set too, and a local cluster's workers are not daemonic (Dask's are by default), so they may fork the decode
worker processes and the CPU's block workers of :func:`skmm.models.embed_images`, as one process does. These
variables set in the environment win (the user's choice); the workers start with them (Dask otherwise applies them
only once a worker runs, after its ``OMP_NUM_THREADS=1``). Its workers also start with glibc's mmap threshold at 32 MiB
(:func:`spawn_env`): Dask's memory trimming otherwise made decoding and encoding 1.3–1.4× slower. On an existing
cluster (``address``) set these in each worker's environment. A local cluster is started inside the flow run, and its
workers are given that run's Prefect API: without ``PREFECT_API_URL`` (the embedded temporary server) each worker
would otherwise start a temporary server of its own on its first task (~8 s of CPU each) and record its task runs
there instead of with the flow's.

Scheduled runs cannot pass a Python object as a parameter, so deployments set the same choice through the
environment of the worker's job (``SKMM_DASK_WORKERS``, ``SKMM_DASK_ADDRESS``, ``SKMM_DASK_GPUS``), which
:func:`task_runner_from_env` reads when the flow module is imported.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from skmm.models.clip import available_cores

__all__ = ["DAEMON_SETTING", "DASK_ENV", "MMAP_THRESHOLD_BYTES", "dask_task_runner", "gpu_cluster", "local_cluster",
           "prefect_api_env", "spawn_env", "task_runner_from_env", "worker_env"]

#: Environment variables that choose the task runner of a scheduled run (see :func:`task_runner_from_env`).
DASK_ENV = ("SKMM_DASK_WORKERS", "SKMM_DASK_ADDRESS", "SKMM_DASK_GPUS")


def worker_env(workers: int, threads_per_worker: int = 1, cores: int | None = None,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of each worker of a local cluster of ``workers`` × ``threads_per_worker`` task slots on
    ``cores`` cores (default: the cores this process may use): a slot's share s = max(cores // slots, 1) gives
    s torch threads (and s − 1 decode worker processes, or s block workers on the CPU).
    ``SKMM_DECODE_WORKERS``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set in ``environ`` (default: this
    process's) are passed on as they are: the user's choice."""
    env = os.environ if environ is None else environ
    share = max((cores or available_cores()) // max(workers * threads_per_worker, 1), 1)
    chosen = {"SKMM_DECODE_WORKERS": str(share - 1), "OMP_NUM_THREADS": str(share), "MKL_NUM_THREADS": str(share)}
    return {name: env.get(name, "").strip() or value for name, value in chosen.items()}


#: glibc's ceiling for its dynamic mmap threshold on 64-bit machines (32 MiB): see :func:`spawn_env`.
MMAP_THRESHOLD_BYTES = 32 << 20


def spawn_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a local cluster's workers are started with, before their process starts (glibc reads it then):
    ``MALLOC_MMAP_THRESHOLD_`` at :data:`MMAP_THRESHOLD_BYTES`, or the value in ``environ`` (default: this
    process's), the user's choice.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_`` set (to hand freed memory back to the
    system), and setting it turns glibc's dynamic mmap threshold off: every allocation over 128 KiB, so each
    tensor of a forward pass and each decoded image, became a fresh ``mmap`` whose pages were faulted in again.
    ViT-S-32 decoded 1.41× and encoded 1.27× slower in such a worker than in a plain process (bench/README.md
    §13). With the threshold where glibc's dynamic one would climb to, allocations are reused as in a plain
    process, and Dask's trimming stays."""
    env = os.environ if environ is None else environ
    return {"MALLOC_MMAP_THRESHOLD_": env.get("MALLOC_MMAP_THRESHOLD_", "").strip() or str(MMAP_THRESHOLD_BYTES)}


#: Dask's setting for its worker processes: daemonic (its default) processes may not fork children.
DAEMON_SETTING = "distributed.worker.daemon"

_SPAWN_LOCK = threading.Lock()
_kept: dict[str, str | None] = {}  # this process's values of the variables nannies are writing, None: unset
_daemon_before: Any = None  # Dask's daemon setting as it was before the first nanny in
_spawning = 0
_spawning_values: dict[str, str] = {}  # what the nannies spawning now write
#: How often a nanny whose values differ from those being spawned with looks again (seconds).
SPAWN_POLL_SECONDS = 0.05


def _join_spawning(values: Mapping[str, str]) -> bool:
    """Join the nannies spawning now if they write the same ``values`` (or none is), as :func:`_spawning_workers`
    does; False where they write others."""
    import dask

    global _spawning, _daemon_before
    with _SPAWN_LOCK:
        if _spawning and _spawning_values != values:
            return False
        if _spawning == 0:
            _daemon_before = dask.config.get(DAEMON_SETTING, default=True)
            dask.config.set({DAEMON_SETTING: False})
            _spawning_values.update(values)
            for name in values:
                _kept[name] = os.environ.get(name)
        _spawning += 1
        return True


def _leave_spawning() -> None:
    import dask

    global _spawning
    with _SPAWN_LOCK:
        _spawning -= 1
        if _spawning == 0:
            for name, value in _kept.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _kept.clear()
            _spawning_values.clear()
            dask.config.set({DAEMON_SETTING: _daemon_before})


@contextlib.asynccontextmanager
async def _spawning_workers(values: Mapping[str, str]) -> AsyncIterator[None]:
    """While our nannies start their workers: Dask's worker processes not daemonic, and this process's
    environment put back as it was once the last of the overlapping nannies leaves.

    A Dask nanny writes the variables its worker must start with (``values``) into the environment of the process
    that runs it, and leaves them there (Dask's docs: "even if this means poisoning the process running the
    Nanny"); its worker is spawned a moment later from another thread, with whatever that environment holds then.
    It reads ``distributed.worker.daemon`` from the global configuration right then too. So nannies that write the
    same values (those of one cluster) spawn together, the first one in saving what was there and the last one out
    restoring it; a nanny that writes other values (another cluster's, with another share) waits until they are
    done."""
    import asyncio

    while not _join_spawning(values):
        await asyncio.sleep(SPAWN_POLL_SECONDS)
    try:
        yield
    finally:
        _leave_spawning()


@functools.cache
def _nanny_class() -> type:
    """A Dask ``Nanny`` whose worker process starts with its final environment and may fork children, and which
    leaves this process's environment as it found it.

    Dask starts a worker's process with its ``pre-spawn-environ`` (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
    ``MALLOC_TRIM_THRESHOLD_``, ...) and applies the nanny's ``env`` only once the worker runs. That is too late
    for glibc (:func:`spawn_env`), and too late for torch where the main module imports it (a user's script; the
    ``skmm`` command's does not): the spawned worker imports that module again first, so OpenMP and MKL read one
    thread, and a worker given two cores encoded on one (bench/README.md §13). So each variable Dask sets before
    spawning takes the nanny's final value there (the nannies of one cluster share them: :func:`worker_env`).

    Its worker is not daemonic (:func:`_spawning_workers`; Dask's ``distributed.worker.daemon``, the maintainers'
    answer for tasks that start processes), so a worker with more than one core decodes and encodes in block
    worker processes, as one process does, and a GPU's worker decodes in processes rather than threads: one
    2-core worker decoded in its task's thread while its second core idled (bench/README.md §13). The worker
    still ends with its nanny (Dask closes it, and a worker whose parent died exits by itself)."""
    from distributed import Nanny

    class SpawnEnvNanny(Nanny):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pre_spawn_env.update({name: self.env[name] for name in self.pre_spawn_env})  # env holds them all
            self.pre_spawn_env.update(spawn_env())

        async def instantiate(self) -> Any:
            async with _spawning_workers(self.pre_spawn_env):
                return await super().instantiate()

    return SpawnEnvNanny


def prefect_api_env() -> dict[str, str]:
    """``PREFECT_API_URL`` of the Prefect API this process reports to, for workers started now: the configured
    one, else the embedded temporary server's while it runs (a flow run started it); empty when there is none."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer._instances.get(None)
            url = server.api_url if server is not None and server.running else None
        except Exception:  # another Prefect's internals: the workers then find a server as before
            url = None
    return {"PREFECT_API_URL": str(url)} if url else {}


#: Where our local clusters listen. A Dask scheduler runs whatever pickled function a client sends it, so none of a
#: local cluster's servers may be reachable from another host (the GPU cluster's listened on every interface).
LOOPBACK = "127.0.0.1"
#: The scheduler's HTTP server (Dask's /health and /metrics; no dashboard, bokeh is not installed): on a free
#: loopback port, never the fixed 8787 that two clusters on one host fight over.
HTTP_ADDRESS = f"{LOOPBACK}:0"


def local_cluster(n_workers: int, threads_per_worker: int = 1, **options: Any):
    """A Dask LocalCluster of ``n_workers`` processes for the flow run being executed, listening on loopback only
    (:data:`LOOPBACK`): each worker with its share of the cores (:func:`worker_env`), the run's Prefect API
    (:func:`prefect_api_env`) and glibc's mmap threshold from its start (:func:`spawn_env`)."""
    from distributed import LocalCluster

    env = {**worker_env(n_workers, threads_per_worker), **prefect_api_env()}
    options = {"host": LOOPBACK, **options}
    options["scheduler_kwargs"] = {"dashboard_address": HTTP_ADDRESS, **(options.get("scheduler_kwargs") or {})}
    return LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=threads_per_worker,
                        dashboard_address=None, env=env, worker_class=_nanny_class(), **options)


def gpu_cluster(devices: Sequence[str], threads_per_worker: int = 1, **scheduler_options: Any):
    """A local Dask cluster with one worker process per GPU: worker ``gpu-<d>`` sees only device ``d``
    (``CUDA_VISIBLE_DEVICES=d``, set by its nanny before the worker starts, so CUDA never sees the others), and
    its share of the host's cores for decoding (:func:`worker_env`). Scheduler, nannies and workers listen on
    loopback only (:data:`LOOPBACK`; ``scheduler_options`` may say otherwise)."""
    from distributed import Scheduler, SpecCluster

    devices = [str(d).strip() for d in devices if str(d).strip()]
    if not devices:
        raise ValueError("gpu_cluster needs at least one device id (e.g. ['0', '1'])")
    share = {**worker_env(len(devices), threads_per_worker), **prefect_api_env()}
    workers = {f"gpu-{d}": {"cls": _nanny_class(), "options": {"nthreads": threads_per_worker, "host": LOOPBACK,
                                                      "env": {**share, "CUDA_VISIBLE_DEVICES": d}}}
               for d in devices}
    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard": False, "dashboard_address": HTTP_ADDRESS,
                                               **scheduler_options}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="skmm-gpus")


def dask_task_runner(workers: int | None = None, address: str | None = None, gpus: Sequence[str] | None = None,
                     threads_per_worker: int = 1) -> TaskRunner:
    """A prefect-dask ``DaskTaskRunner``: on an existing cluster (``address``), on a local cluster of ``workers``
    processes, or on a local cluster with one worker per GPU (``gpus``: device ids). Exactly one of the three."""
    from prefect_dask import DaskTaskRunner

    chosen = [name for name, value in (("workers", workers), ("address", address), ("gpus", gpus)) if value]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --dask-workers, --dask-address, --dask-gpus; got {chosen or 'none'}")
    if isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise ValueError(f"threads per Dask worker must be a positive integer; got {threads_per_worker!r}")
    if address:
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"--dask-address must be a scheduler URL such as tcp://host:8786; got {address!r}")
        return DaskTaskRunner(address=address)
    if gpus:
        return DaskTaskRunner(cluster_class=gpu_cluster,
                              cluster_kwargs={"devices": list(gpus), "threads_per_worker": threads_per_worker})
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--dask-workers must be a positive integer; got {workers!r}")
    return DaskTaskRunner(cluster_class=local_cluster,
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": threads_per_worker})


def task_runner_from_env(environ: Mapping[str, str] | None = None) -> TaskRunner:
    """The task runner the environment asks for (``SKMM_DASK_ADDRESS``, ``SKMM_DASK_WORKERS`` or
    ``SKMM_DASK_GPUS`` = comma-separated device ids), else Prefect's default thread pool."""
    env = os.environ if environ is None else environ
    address = env.get("SKMM_DASK_ADDRESS") or None
    gpus = [d for d in (env.get("SKMM_DASK_GPUS") or "").split(",") if d.strip()] or None
    text = env.get("SKMM_DASK_WORKERS") or ""
    if not (address or gpus or text):
        return ThreadPoolTaskRunner()
    try:
        workers = int(text) if text else None
    except ValueError:
        raise ValueError(f"SKMM_DASK_WORKERS must be a positive integer; got {text!r}") from None
    return dask_task_runner(workers=workers, address=address, gpus=gpus)
