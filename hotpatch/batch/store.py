"""The results file of a batch: JSON lines, one record per job, appended and synced as each job ends.

A rerun reads it back to skip the jobs already finished; the last record of a
job wins (a failed job retried later). A line cut short by a killed run is
dropped when the file is opened again, so appending stays well-formed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from ..errors import BatchError

__all__ = ["ResultStore", "read_results"]


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Every job's last record in a results file, in the order they were first written."""
    records: dict[str, dict[str, Any]] = {}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BatchError(f"cannot read results {path}: {exc.strerror or exc}") from None
    complete = data[: data.rfind(b"\n") + 1]
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise BatchError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or "id" not in record:
            raise BatchError(f"{path}:{number}: not a batch job record")
        records[record["id"]] = record
    return list(records.values())


class ResultStore:
    """Append-only JSON lines with one fsync per record: a crash loses at most the job that was running."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._drop_partial_line()
            self.records = {r["id"]: r for r in read_results(self.path)}

    def _drop_partial_line(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)

    def finished(self, retry_failed: bool = False) -> set[str]:
        return {job_id for job_id, r in self.records.items()
                if r.get("status") == "done" or (r.get("status") == "failed" and not retry_failed)}

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "ab") as handle:
            handle.write(orjson.dumps(record) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record["id"]] = record
