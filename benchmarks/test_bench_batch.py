"""Batch throughput over 43 real pairs: numpy 2.1.0->2.1.1->2.1.2 (42 modules) and cryptography 43.0.0->43.0.1.

Diff jobs through a cold on-disk analysis cache, with 1 and 2 local job processes and on a 2-worker Dask LocalCluster
(its start-up counted). Each run starts from an empty results folder. The jobs
per minute and the scaling against one worker are in the benchmark's extra info
and printed; docs/BATCH.md has the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hotpatch.batch import CacheSpec, Job, release_jobs, run_batch
from hotpatch.batch.jobs import DISK_CACHE
from tests.support.realbins import ensure_wheel

pytestmark = [pytest.mark.realbins, pytest.mark.slow]

_RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def real_jobs() -> list[Job]:
    numpy = [ensure_wheel("numpy", v) for v in ("2.1.0", "2.1.1", "2.1.2")]
    cryptography = [ensure_wheel("cryptography", v) for v in ("43.0.0", "43.0.1")]
    jobs = release_jobs(numpy) + release_jobs(cryptography)
    assert len(jobs) >= 40
    return jobs


@pytest.mark.parametrize("engine", ["local-1", "local-2", "dask-local-2"])
def test_batch_throughput(benchmark: Any, real_jobs: list[Job], tmp_path_factory: Any, engine: str) -> None:
    runs = iter(range(100))

    def run() -> Any:
        out = Path(tmp_path_factory.mktemp(f"batch-{engine}-{next(runs)}"))
        # a cold analysis cache of its own: each run analyses every image once, as on a fresh machine
        return run_batch(real_jobs, out, workers=int(engine[-1]), local_cluster=engine.startswith("dask"),
                         cache=CacheSpec(DISK_CACHE.factory, str(out / "analysis")), progress=False)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    summary = result.summary
    assert summary["by_status"] == {"done": len(real_jobs)}
    assert summary["verdicts"]["NEW_BASELINE"] >= 1  # cryptography's rebuilt Rust tree
    rate = len(real_jobs) / benchmark.stats.stats.max * 60
    _RATES[engine] = rate
    cpu_rate = len(real_jobs) / summary["cpu_seconds"] * 60
    benchmark.extra_info.update(jobs=len(real_jobs), jobs_per_minute=round(rate, 1),
                                job_seconds=summary["job_seconds"], jobs_per_cpu_minute=round(cpu_rate, 1),
                                scaling=round(rate / _RATES["local-1"], 2) if "local-1" in _RATES else None)
    print(f"\n{engine}: {len(real_jobs)} jobs in {benchmark.stats.stats.max:.1f} s = {rate:.1f} jobs/min"
          f" ({summary['cpu_seconds']:.1f} CPU s in jobs = {cpu_rate:.1f} jobs per CPU minute)"
          + (f", x{rate / _RATES['local-1']:.2f} of one worker" if "local-1" in _RATES else ""))
