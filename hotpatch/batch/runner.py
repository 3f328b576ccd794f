"""``run_batch``: the jobs not yet finished, on a local pool of job processes or a Dask cluster.

Each record is appended to ``results.jsonl`` as its job ends, so a killed
batch resumes where it stopped; ``summary.json`` is rewritten at the end.
Largest images go first: the longest jobs then overlap the many short ones
instead of running alone at the end; the later steps of a chain of releases
wait for the first ones, so the image they share is analysed once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .cluster import run_on_dask
from .jobs import DISK_CACHE, CacheSpec
from .manifest import Job
from .process import ChildProcess
from .store import ResultStore
from .summary import summarize

__all__ = ["BatchResult", "run_batch"]

DEFAULT_TIMEOUT = 600.0
#: a job whose two images together exceed this many bytes holds the worker's ``image_memory`` resource
BIG_IMAGE_BYTES = 8 << 20


@dataclass
class BatchResult:
    results_path: Path
    summary_path: Path
    summary: dict[str, Any]
    ran: int
    skipped: int
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)


def _order(jobs: list[Job]) -> list[Job]:
    """Largest first, but a job whose baseline is another job's patched image (the next step of a chain of
    releases) after every first step: two workers then do not analyse the shared image at the same time,
    and the second finds it in the analysis cache."""
    by_patched = {job.patched: job for job in jobs}

    def step(job: Job) -> int:
        count, baseline = 0, job.baseline
        while baseline in by_patched and count < len(jobs):
            baseline = by_patched[baseline].baseline
            count += 1
        return count

    return sorted(jobs, key=lambda job: (step(job), -job.input_bytes))


def run_batch(jobs: Sequence[Job], out_dir: str | Path, *, workers: int | None = None,
              scheduler: str | None = None, local_cluster: bool = False, timeout: float = DEFAULT_TIMEOUT,
              retry_failed: bool = False, cache: CacheSpec | None = DISK_CACHE, keep_packages: bool = False,
              memory_limit_mb: float | None = None, progress: bool | None = None) -> BatchResult:
    """Run ``jobs`` (skipping those ``out_dir/results.jsonl`` already has) and summarise all of them.

    ``workers`` job processes locally (default: the CPU count); ``scheduler`` a Dask scheduler address,
    or ``local_cluster`` a Dask LocalCluster with ``workers`` workers. ``cache`` names the analysis cache
    each job process builds: the on-disk ``AnalysisCache`` by default, None for memory only.
    """
    out = Path(out_dir)
    store = ResultStore(out / "results.jsonl")
    done = store.finished(retry_failed)
    todo = _order([j for j in jobs if j.job_id not in done])
    settings = {"cache": cache.to_json() if cache else None,
                "packages_dir": str((out / "packages").resolve()) if keep_packages else None}
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    with _progress(len(todo), progress) as advance:
        def record(result: dict[str, Any]) -> None:
            store.append(result)
            advance(result)

        if scheduler or local_cluster:
            engine = run_on_dask(todo, settings, record, scheduler=scheduler, workers=workers, timeout=timeout,
                                 memory_limit_mb=memory_limit_mb, big_image_bytes=BIG_IMAGE_BYTES)
        else:
            engine = _run_local(todo, settings, record, workers, timeout, memory_limit_mb)
    wall = time.perf_counter() - started
    wanted = {j.job_id for j in jobs}
    records = [r for job_id, r in store.records.items() if job_id in wanted]
    summary = summarize(records, engine=engine, workers=workers, ran=len(todo), skipped=len(jobs) - len(todo),
                        wall_seconds=round(wall, 3),
                        jobs_per_minute=round(len(todo) / wall * 60, 2) if todo and wall > 0 else None)
    summary_path = out / "summary.json"
    summary_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    return BatchResult(store.path, summary_path, summary, len(todo), len(jobs) - len(todo), records)


def _run_local(jobs: Sequence[Job], settings: dict[str, Any], record: Callable[[dict[str, Any]], None],
               workers: int, timeout: float, memory_limit_mb: float | None) -> str:
    """A thread per worker, each driving its own job process; records are written from this thread only."""
    local = threading.local()
    children: list[ChildProcess] = []
    lock = threading.Lock()

    def run(job: Job) -> dict[str, Any]:
        child = getattr(local, "child", None)
        if child is None:
            child = local.child = ChildProcess(settings, memory_limit_mb)
            with lock:
                children.append(child)
        return child.run(job, job.timeout or timeout)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") as pool:
            for future in as_completed([pool.submit(run, job) for job in jobs]):
                record(future.result())
    finally:
        for child in children:
            child.stop()
    return f"local:{workers}"


@contextmanager
def _progress(total: int, enabled: bool | None) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar with the rate in jobs per minute and the time left (only on a terminal)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    console = Console(stderr=True)
    if enabled is None:
        enabled = console.is_terminal
    if not enabled or total == 0:
        yield lambda record: None
        return

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed * 60:.1f} jobs/min" if speed else "- jobs/min")

    failed = 0
    with Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), RateColumn(),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.description}"),
                  console=console) as bar:
        task = bar.add_task("", total=total)

        def advance(record: dict[str, Any]) -> None:
            nonlocal failed
            failed += record.get("status") == "failed"
            bar.update(task, advance=1, description=f"{failed} failed" if failed else "")

        yield advance
