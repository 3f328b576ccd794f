"""Running one job in the current process: load both images, diff, and build or verify when asked.

The result is a JSON-ready record (schema ``hotpatch.batch.job/1``): timings,
verdict, reasons, sizes. A bad input (not a PE, a package that does not
verify) is a failed record with its one-line error, never an exception: the
batch goes on.

Images are loaded through an analysis cache (``TableCache``): by default the
on-disk ``hotpatch.cache.AnalysisCache`` shared with trains, so a chain of
releases (2.1.0->2.1.1, 2.1.1->2.1.2) analyses the middle release once whichever
worker meets it first, and a rerun analyses nothing. Without it (``--no-cache``)
each job process keeps its last two tables in memory (``MemoryCache``). Any other
cache plugs in by naming a factory (``CacheSpec``), which each job process
imports and calls once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import resource
import socket
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..analysis.functions import FunctionTable, discover
from ..errors import HotpatchError
from ..package.format import dumps, package_id_of
from ..pe.image import Image
from .manifest import Job

__all__ = ["DISK_CACHE", "MEMORY_CACHE", "CacheSpec", "MemoryCache", "TableCache", "failed_record", "make_cache",
           "run_job"]

SCHEMA = "hotpatch.batch.job/1"
#: reasons kept per record with their subject; the counts cover all of them
MAX_REASONS = 50


class TableCache(Protocol):
    """Where a job gets the analysed function table of an image."""

    def table(self, source: str) -> FunctionTable: ...


class MemoryCache:
    """The last few tables of this process, keyed by file content (SHA-256)."""

    def __init__(self, entries: int = 2) -> None:
        self.entries = entries
        self._tables: OrderedDict[str, FunctionTable] = OrderedDict()
        self.hits = 0

    def table(self, source: str) -> FunctionTable:
        path = source
        with open(path, "rb") as handle:
            data = handle.read()
        key = hashlib.sha256(data).hexdigest()
        table = self._tables.get(key)
        if table is not None:
            self.hits += 1
            self._tables.move_to_end(key)
            return table
        table = discover(Image.load(path))
        self._tables[key] = table
        while len(self._tables) > self.entries:
            self._tables.popitem(last=False)
        return table


@dataclass(frozen=True)
class CacheSpec:
    """A cache each worker process builds for itself: ``factory`` is ``"module:callable"``,
    called with ``argument`` (for instance a cache directory)."""

    factory: str
    argument: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"factory": self.factory, "argument": self.argument}


#: the default: the on-disk analysis cache in its default directory
DISK_CACHE = CacheSpec("hotpatch.cache:AnalysisCache")
#: no cache beyond this job process' memory
MEMORY_CACHE = CacheSpec("hotpatch.batch.jobs:MemoryCache")


def make_cache(spec: dict[str, Any] | None) -> TableCache:
    if not spec:
        return MemoryCache()
    module_name, _, attribute = spec["factory"].partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    return factory(spec["argument"]) if spec.get("argument") is not None else factory()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _base_record(job: Job) -> dict[str, Any]:
    return {"schema": SCHEMA, **job.to_json(), "status": None, "verdict": None, "reasons": [],
            "reason_counts": {}, "summary": None, "sizes": _sizes(job), "timings": {}, "error": None,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "started": _now(), "finished": None}


def _sizes(job: Job) -> dict[str, int | None]:
    def size(path: str) -> int | None:
        try:
            return os.path.getsize(path)
        except OSError:
            return None

    return {"baseline": size(job.baseline), "patched": size(job.patched)}


def failed_record(job: Job, error: str, elapsed: float | None = None) -> dict[str, Any]:
    """The record of a job that did not finish (crash, timeout, refused input)."""
    record = _base_record(job)
    record.update(status="failed", error=error, finished=_now())
    if elapsed is not None:
        record["timings"] = {"total": round(elapsed, 4)}
    return record


def run_job(job: Job, cache: TableCache | None = None, packages_dir: str | None = None) -> dict[str, Any]:
    """Run one job here and now; bad input becomes a failed record, not an exception."""
    cache = cache or MemoryCache()
    record = _base_record(job)
    stats = getattr(cache, "stats", None)
    before = (stats.hits, stats.analyses) if stats is not None else None
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cpu = time.process_time()
    try:
        _run_stages(job, cache, packages_dir, record, timings)
        record["status"] = "done"
    except HotpatchError as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    except (OSError, ValueError) as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    timings["total"] = time.perf_counter() - started
    # CPU time says what the job costs whatever else the machine is doing; wall time says what it took here
    timings["cpu"] = time.process_time() - cpu
    record["timings"] = {k: round(v, 4) for k, v in timings.items()}
    record["finished"] = _now()
    if before is not None:
        record["cache"] = {"hits": stats.hits - before[0], "analyses": stats.analyses - before[1]}
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record


def _run_stages(job: Job, cache: TableCache, packages_dir: str | None, record: dict[str, Any],
                timings: dict[str, float]) -> None:
    from ..diff.compare import diff
    from ..verdict.rules import decide

    mark = time.perf_counter()
    table_a = cache.table(job.baseline)
    timings["load_baseline"] = time.perf_counter() - mark
    mark = time.perf_counter()
    table_b = cache.table(job.patched)
    timings["load_patched"] = time.perf_counter() - mark
    record["sizes"].update(functions_baseline=len(table_a), functions_patched=len(table_b))
    mark = time.perf_counter()
    result = diff(table_a, table_b)
    verdict = decide(result, allow_layout_change=job.allow_layout_change)
    timings["diff"] = time.perf_counter() - mark
    record.update(verdict=verdict.status, summary=result.summary(),
                  reasons=[{"kind": r.kind, "subject": r.subject} for r in verdict.reasons[:MAX_REASONS]],
                  reason_counts=dict(Counter(r.kind for r in verdict.reasons)))
    if job.kind == "diff" or not verdict.hotpatchable:
        return
    from ..package.builder import build_package

    mark = time.perf_counter()
    package = build_package(result, verdict=verdict)
    data = dumps(package, None)
    timings["build"] = time.perf_counter() - mark
    record["sizes"]["package"] = len(data)
    record["package"] = {"id": package_id_of(package), "sites": len(package.sites), "fixups": len(package.fixups)}
    if packages_dir:
        path = Path(packages_dir) / f"{job.job_id}.hpk"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record["package"]["path"] = str(path)
    if job.kind != "verify":
        return
    from ..verify.calls import load_inputs
    from ..verify.check import verify

    mark = time.perf_counter()
    calls = load_inputs(job.inputs) if job.inputs else None
    report = verify(package, job.baseline, job.patched, calls)
    timings["verify"] = time.perf_counter() - mark
    verified = report.to_json()
    record["verify"] = {"agrees": report.agrees, "calls": len(report.calls),
                        "first_difference": verified["first_difference"]}
