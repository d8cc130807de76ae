"""Where the shard-level stages run: Prefect's thread pool (default), or a Dask cluster through prefect-dask.

The curate flow submits one task per dataset shard (embedding); each task reads its shard from the store and
writes its vectors back to the store, returning a small ref. So the same flow scales out by changing only its
task runner — no scheduler of our own:

    curate.with_options(task_runner=dask_task_runner(workers=4))              # a local cluster, 4 processes
    curate.with_options(task_runner=dask_task_runner(address="tcp://h:8786"))  # an existing cluster
    curate.with_options(task_runner=dask_task_runner(gpus=["0", "1"]))       # one worker per GPU

Workers must reach the store (an s3:// store for a cluster of several machines; a local folder works on one
machine) and import this package (install it on every worker). Each worker runs one task at a time by default:
torch already uses the worker's cores (Dask sets OMP/MKL threads to 1 per worker process, so give a worker one
task thread per core you want it to use).

Scheduled runs cannot pass a Python object as a parameter, so deployments set the same choice through the
environment of the worker's job (``SKMM_DASK_WORKERS``, ``SKMM_DASK_ADDRESS``, ``SKMM_DASK_GPUS``), which
:func:`task_runner_from_env` reads when the flow module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

__all__ = ["DASK_ENV", "dask_task_runner", "gpu_cluster", "task_runner_from_env"]

#: Environment variables that choose the task runner of a scheduled run (see :func:`task_runner_from_env`).
DASK_ENV = ("SKMM_DASK_WORKERS", "SKMM_DASK_ADDRESS", "SKMM_DASK_GPUS")


def gpu_cluster(devices: Sequence[str], threads_per_worker: int = 1, **scheduler_options: Any):
    """A local Dask cluster with one worker process per GPU: worker ``gpu-<d>`` sees only device ``d``
    (``CUDA_VISIBLE_DEVICES=d``, set by its nanny before the worker starts, so CUDA never sees the others)."""
    from distributed import Nanny, Scheduler, SpecCluster

    devices = [str(d).strip() for d in devices if str(d).strip()]
    if not devices:
        raise ValueError("gpu_cluster needs at least one device id (e.g. ['0', '1'])")
    workers = {f"gpu-{d}": {"cls": Nanny, "options": {"nthreads": threads_per_worker,
                                                      "env": {"CUDA_VISIBLE_DEVICES": d}}}
               for d in devices}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, **scheduler_options}}
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
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "processes": True,
                                          "threads_per_worker": threads_per_worker, "dashboard_address": None})


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
