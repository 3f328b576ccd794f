"""``hotpatch batch``: run a manifest (or consecutive release folders) and print the summary.

Exit codes: 0 every job finished (whatever its verdict), 1 some jobs failed
(recorded in the results with their error), 2 bad input (manifest, folders).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import BatchError
from ..jsonio import print_answer
from .jobs import DISK_CACHE, CacheSpec
from .manifest import KINDS, load_manifest, release_jobs
from .runner import DEFAULT_TIMEOUT, run_batch

__all__ = ["add_batch_command"]


def add_batch_command(commands: Any) -> None:
    batch = commands.add_parser("batch", help="many diff/build/verify jobs, locally or on a Dask cluster")
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("manifest", nargs="?", help="TOML or JSON-lines manifest of jobs")
    source.add_argument("--releases", nargs="+", metavar="FOLDER",
                        help="release folders, oldest first: every module of each consecutive pair")
    batch.add_argument("--kind", action="append", choices=KINDS, help="with --releases: jobs per pair (diff)")
    batch.add_argument("-o", "--out", required=True, help="folder for results.jsonl, summary.json, packages/")
    where = batch.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="a Dask scheduler (tcp://host:port)")
    where.add_argument("--local-cluster", action="store_true", help="a Dask LocalCluster of --workers workers")
    batch.add_argument("--workers", type=int, help="job processes or LocalCluster workers (default: CPUs)")
    batch.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per job (default 600)")
    batch.add_argument("--retry-failed", action="store_true", help="run again the jobs recorded as failed")
    batch.add_argument("--keep-packages", action="store_true", help="write built packages to OUT/packages/")
    batch.add_argument("--memory-limit", type=float, metavar="MB",
                       help="replace a job process whose peak memory passed this")
    caches = batch.add_mutually_exclusive_group()
    caches.add_argument("--no-cache", action="store_true", help="no on-disk analysis cache (memory only)")
    caches.add_argument("--cache-dir", metavar="DIR", help="the on-disk analysis cache (default as for train)")
    caches.add_argument("--cache", metavar="MODULE:FACTORY[=ARG]", help="another analysis cache each worker builds")
    batch.add_argument("--no-progress", action="store_true")
    batch.add_argument("--json", action="store_true", help="print the summary as JSON")
    batch.set_defaults(run=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise BatchError("--workers must be at least 1")
    if args.timeout <= 0:
        raise BatchError("--timeout must be positive")
    if args.manifest:
        jobs = load_manifest(args.manifest)
    else:
        if len(args.releases) < 2:
            raise BatchError("--releases needs at least two folders")
        jobs = release_jobs(args.releases, args.kind or ["diff"])
        if not jobs:
            raise BatchError("no module is in two consecutive release folders")
    cache: CacheSpec | None = DISK_CACHE
    if args.no_cache:
        cache = None
    elif args.cache_dir:
        cache = CacheSpec(DISK_CACHE.factory, args.cache_dir)
    elif args.cache:
        factory, _, argument = args.cache.partition("=")
        if ":" not in factory:
            raise BatchError("--cache is MODULE:FACTORY[=ARGUMENT]")
        cache = CacheSpec(factory, argument or None)
    result = run_batch(jobs, args.out, workers=args.workers, scheduler=args.scheduler,
                       local_cluster=args.local_cluster, timeout=args.timeout, retry_failed=args.retry_failed,
                       cache=cache, keep_packages=args.keep_packages, memory_limit_mb=args.memory_limit,
                       progress=False if args.no_progress else None)
    summary = result.summary
    if args.json:
        print_answer(summary, (), True)
    else:
        _print_summary(summary, result.results_path)
    return 1 if summary["by_status"].get("failed") else 0


def _print_summary(summary: dict[str, Any], results: Any) -> None:
    from rich.console import Console

    console = Console()
    share = summary["hotpatchable_share"]
    console.print(f"[bold]{summary['jobs']} jobs[/bold] ({summary['ran']} run, {summary['skipped']} already done) "
                  f"on {summary['engine']}: " + ", ".join(f"{v} {k}" for k, v in summary["by_status"].items()))
    console.print("verdicts: " + (", ".join(f"{v} {k}" for k, v in summary["verdicts"].items()) or "-")
                  + (f"; hotpatchable {share:.0%}" if share is not None else ""))
    for kind, counts in summary["reasons"].items():
        console.print(f"  {kind}: {counts['jobs']} jobs, {counts['reasons']} reasons")
    cache = summary["cache"]
    if cache["hits"] or cache["analyses"]:
        console.print(f"analysis cache: {cache['analyses']} analyses, {cache['hits']} hits")
    for error, count in summary["failures"].items():
        console.print(f"  failed: {count} x {error}")
    if summary["jobs_per_minute"]:
        console.print(f"{summary['jobs_per_minute']} jobs/min, wall {summary['wall_seconds']} s")
    console.print(f"results: {results}")
