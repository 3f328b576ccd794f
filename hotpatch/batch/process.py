"""The parent side of a job process: send a job, wait for its record with a deadline, replace the process
when the job crashed it, ran out of time, or left it holding more memory than allowed."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import orjson

from .jobs import failed_record
from .manifest import Job

__all__ = ["ChildProcess"]

#: how much of a dead process's stderr goes into the failed record
_STDERR_TAIL = 400


class ChildProcess:
    """One ``python -m hotpatch.batch.child``, started on first use and again after a failure."""

    def __init__(self, settings: dict[str, Any], memory_limit_mb: float | None = None) -> None:
        self.settings = settings
        self.memory_limit_mb = memory_limit_mb
        self._process: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._stderr: Any = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile()
        process = subprocess.Popen([sys.executable, "-m", "hotpatch.batch.child"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=self._stderr)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(orjson.dumps(self.settings) + b"\n")
        process.stdin.flush()
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout, self._lines), daemon=True).start()
        self._process = process
        return process

    @staticmethod
    def _read(stream: Any, lines: queue.Queue[bytes | None]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def run(self, job: Job, timeout: float) -> dict[str, Any]:
        """The job's record; a crash or a timeout gives a failed record and a fresh process next time."""
        process = self._process if self._process and self._process.poll() is None else self._start()
        started = time.perf_counter()
        try:
            assert process.stdin is not None
            process.stdin.write(orjson.dumps(job.to_json()) + b"\n")
            process.stdin.flush()
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            self.restarts += 1
            return failed_record(job, f"timed out after {timeout:g} s (job process killed)",
                                 time.perf_counter() - started)
        except BrokenPipeError:
            line = None
        if line is None:
            return failed_record(job, self._death(), time.perf_counter() - started)
        record: dict[str, Any] = orjson.loads(line)
        if self.memory_limit_mb and record.get("peak_rss_mb", 0) > self.memory_limit_mb:
            self.stop()
            self.restarts += 1  # the next job starts in a fresh process: peak memory never goes down in this one
        return record

    def _death(self) -> str:
        assert self._process is not None
        code = self._process.wait()
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip()[-_STDERR_TAIL:]
        self._process = None
        self.restarts += 1
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = tail.splitlines()[-1] if tail else "no output"
        return f"job process died ({how}): {last}"

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()
        self._process = None

