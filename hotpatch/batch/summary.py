"""The summary of a batch: counts, the reasons histogram, the hotpatchable share, the slowest jobs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["summarize"]

SCHEMA = "hotpatch.batch.summary/1"


def summarize(records: Iterable[dict[str, Any]], slowest: int = 5, **run: Any) -> dict[str, Any]:
    """A JSON-ready summary of job records; ``run`` adds facts about the run (workers, wall time)."""
    records = list(records)
    status = Counter(r.get("status") for r in records)
    verdicts = Counter(r["verdict"] for r in records if r.get("verdict"))
    by_kind = Counter(r.get("kind") for r in records)
    # a job counts once per reason kind for "jobs"; every reason for "reasons"
    reason_jobs: Counter[str] = Counter()
    reason_total: Counter[str] = Counter()
    for record in records:
        counts = record.get("reason_counts") or {}
        reason_jobs.update(counts.keys())
        reason_total.update(counts)
    judged = sum(verdicts.values())
    timed = sorted((r for r in records if r.get("timings", {}).get("total") is not None),
                   key=lambda r: r["timings"]["total"], reverse=True)
    errors = Counter((r.get("error") or "").split(":")[0] for r in records if r.get("status") == "failed")
    return {
        "schema": SCHEMA,
        "jobs": len(records),
        "by_status": dict(status),
        "by_kind": dict(by_kind),
        "verdicts": dict(verdicts),
        "hotpatchable_share": round(verdicts.get("HOTPATCH", 0) / judged, 4) if judged else None,
        "reasons": {kind: {"jobs": reason_jobs[kind], "reasons": reason_total[kind]}
                    for kind, _ in reason_jobs.most_common()},
        "failures": dict(errors.most_common()),
        "cache": {key: sum((r.get("cache") or {}).get(key, 0) for r in records) for key in ("hits", "analyses")},
        "job_seconds": round(sum(r["timings"]["total"] for r in timed), 3),
        "cpu_seconds": round(sum(r["timings"].get("cpu", 0) for r in timed), 3),
        "slowest": [{"id": r["id"], "name": r.get("name"), "kind": r.get("kind"), "seconds": r["timings"]["total"],
                     "status": r.get("status")} for r in timed[:slowest]],
        **run,
    }
