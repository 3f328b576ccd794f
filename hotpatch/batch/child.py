"""A job process: runs jobs one at a time for a batch worker, one JSON line in, one JSON line out.

Jobs run in a separate process so that a job that crashes the interpreter
(a fault in a compiled library) or runs out of time can be killed and
recorded as failed without taking the batch with it. The process lives across
jobs, so imports and the in-memory analysis cache are paid once.

Protocol on stdin/stdout: the first line is the settings
(``{"cache": CacheSpec | null, "packages_dir": str | null}``), then each line
is a job (``Job.to_json()``) answered by its record. Anything else the job
prints goes to stderr, never into the protocol.

``python -m hotpatch.batch.child`` is what ``ChildProcess`` starts.
"""

from __future__ import annotations

import os
import sys

import orjson

from .jobs import make_cache, run_job
from .manifest import Job

__all__ = ["main"]


def main() -> int:
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of libraries go to stderr, not into the protocol
    lines = sys.stdin.buffer
    settings = orjson.loads(lines.readline() or b"{}")
    cache = make_cache(settings.get("cache"))
    packages_dir = settings.get("packages_dir")
    for line in lines:
        if not line.strip():
            continue
        job = Job.from_json(orjson.loads(line))
        record = run_job(job, cache, packages_dir)
        protocol.write(orjson.dumps(record) + b"\n")
        protocol.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
