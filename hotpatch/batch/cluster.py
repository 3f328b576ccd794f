"""Batch jobs on a Dask distributed cluster: a scheduler address, or a LocalCluster started here.

Each Dask worker thread drives its own job process (``ChildProcess``), so a
job that crashes or hangs is killed and recorded as failed while the worker
lives on. Memory per worker is bounded with Dask worker resources: workers
declare ``image_memory=1`` and a job over big images asks for it, so a worker
runs at most one such job at a time whatever its thread count. Workers of a
remote cluster must see the image paths (a shared file system) and have
hotpatch installed; started with ``--resources image_memory=1`` they bound
memory the same way (without it the summary says the bound was not applied).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .jobs import failed_record
from .manifest import Job
from .process import ChildProcess

__all__ = ["RESOURCE", "run_on_dask"]

RESOURCE = "image_memory"

_children: dict[int, ChildProcess] = {}
_children_lock = threading.Lock()


def run_in_worker(job_document: dict[str, Any], settings: dict[str, Any], timeout: float,
                  memory_limit_mb: float | None) -> dict[str, Any]:
    """The Dask task: one job through this worker thread's job process."""
    key = threading.get_ident()
    with _children_lock:
        child = _children.get(key)
        if child is None:
            child = _children[key] = ChildProcess(settings, memory_limit_mb)
    job = Job.from_json(job_document)
    record = child.run(job, timeout)
    try:
        from distributed import get_worker

        record["dask_worker"] = get_worker().address
    except ValueError:
        pass
    return record


def stop_children() -> int:
    """Stop this worker's job processes (run on every worker before the client lets go)."""
    with _children_lock:
        children = list(_children.values())
        _children.clear()
    for child in children:
        child.stop()
    return len(children)


def run_on_dask(jobs: Sequence[Job], settings: dict[str, Any], record: Callable[[dict[str, Any]], None], *,
                scheduler: str | None, workers: int, timeout: float, memory_limit_mb: float | None,
                big_image_bytes: int, threads_per_worker: int = 1) -> str:
    from distributed import Client, LocalCluster, as_completed

    from .runner import job_bytes

    cluster = None
    if scheduler is None:
        # never fixed ports: other clusters run on the same machine
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               scheduler_port=0, dashboard_address=None, resources={RESOURCE: 1},
                               silence_logs=logging.ERROR)
    client = Client(cluster if cluster is not None else scheduler)
    try:
        info = client.scheduler_info()["workers"]
        bounded = any(RESOURCE in (w.get("resources") or {}) for w in info.values())
        futures: dict[Any, Job] = {}
        for job in jobs:
            resources = {RESOURCE: 1} if bounded and job_bytes(job) > big_image_bytes else None
            future = client.submit(run_in_worker, job.to_json(), settings, job.timeout or timeout, memory_limit_mb,
                                   key=f"hotpatch-batch-{job.job_id}", resources=resources, pure=False)
            futures[future] = job
        for future in as_completed(list(futures)):
            job = futures[future]
            try:
                record(future.result())
            except Exception as exc:  # the worker itself died: Dask gives up on the task after its retries
                record(failed_record(job, f"dask worker lost: {type(exc).__name__}: {exc}"))
        engine = f"dask:{len(info)} workers" + ("" if bounded else f" (no {RESOURCE} resource: memory not bounded)")
        return engine if scheduler else f"dask-local:{workers} workers"
    finally:
        client.run(stop_children)
        client.close()
        if cluster is not None:
            cluster.close()

