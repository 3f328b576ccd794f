"""host.exe under Wine: the fixtures' multi-threaded host process, and a reader of its output lines.

host.exe (tests/fixtures) loads a DLL and runs threads calling its exports in a loop,
printing what each observation interval saw; the live tests (agent, apply, health,
rollout, train, corpus) patch it and watch those values switch.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from hotpatch.process.winehost import START_ATTEMPTS, ended_silently, windows_path, wine_command, wine_env
from tests.fixtures.build_fixtures import host_exe

THREADS = 8
HOST_TIMEOUT = 30
#: seconds to wait for the exit code and the end of stderr of a host whose output has ended
ENDED_WAIT = 10
#: stderr lines shown when a host ended too early
STDERR_TAIL = 20


class HostEndedSilently(AssertionError):
    """host.exe ended before its first line without writing anything: Wine did not start it."""


def run_to_end(argv: list[str], env: dict[str, str], timeout: float = HOST_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a Wine program to its end, once more if Wine ended the first start without any output."""
    for _ in range(START_ATTEMPTS):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if not ended_silently(proc.stdout, proc.stderr):
            break
    return proc


class Host:
    """host.exe under Wine; reader threads collect its output lines and its stderr.

    A start that ends before the first line with no output at all is Wine's
    failure (winehost.ended_silently), not host.exe's: it is started once
    more (``restarts`` counts it). A host that printed anything is never
    started again: whatever ended it is the test's to see.
    """

    def __init__(self, prefix: Path, dll: Path, calls: list[str], threads: int = THREADS,
                 extra: tuple[str, ...] = (), timeout: float = HOST_TIMEOUT,
                 command: list[str] | None = None) -> None:
        self.argv = [
            *(command if command is not None else wine_command()),
            str(host_exe(dll.parent.parent)),
            windows_path(dll),
            "--threads",
            str(threads),
            "--seconds",
            "0",
            "--until-stdin-closes",
            "--print-base",
            "--interval-ms",
            "30",
            *extra,
            *calls,
        ]
        self.env = wine_env(prefix)
        self.restarts = 0
        for attempt in range(1, START_ATTEMPTS + 1):
            self._start()
            try:
                self.pid = int(self.wait_line("pid")[0])
                break
            except HostEndedSilently:
                if attempt == START_ATTEMPTS:
                    raise
                self.restarts += 1
        self.base = int(self.wait_line("base")[0], 16)
        self.wait_line("running", timeout=timeout)

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._stderr_done = threading.Event()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, self._changed), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.proc.stderr, self.stderr, self._stderr_done),
                         daemon=True).start()

    # the streams and lists are passed in: a restarted host has new ones, and the threads of the first stay on theirs
    @staticmethod
    def _read(stream: IO[str], lines: list[str], changed: threading.Condition) -> None:
        for line in stream:
            with changed:
                lines.append(line.strip())
                changed.notify_all()
        with changed:
            lines.append("<eof>")
            changed.notify_all()

    @staticmethod
    def _read_stderr(stream: IO[str], lines: list[str], done: threading.Event) -> None:
        # read all along, so that a chatty Wine never blocks on a full pipe, and kept for the messages
        for line in stream:
            lines.append(line.rstrip("\n"))
        done.set()

    def _ended(self, kind: str) -> AssertionError:
        """The error for a host whose output ended before ``kind``: its exit code and stderr's tail."""
        try:
            code: int | str = self.proc.wait(timeout=ENDED_WAIT)
        except subprocess.TimeoutExpired:
            code = "none yet"
        self._stderr_done.wait(timeout=ENDED_WAIT)
        printed = [line for line in self.lines if line != "<eof>"]
        stderr = "\n".join(self.stderr)
        tail = "\n".join(self.stderr[-STDERR_TAIL:])
        message = (f"host ended before '{kind}' (exit code {code}); its output: {printed}; "
                   f"its stderr: {tail if tail else '(nothing)'}")
        if ended_silently("\n".join(printed), stderr):
            return HostEndedSilently(message)
        return AssertionError(message)

    def wait_line(self, kind: str, start: int = 0, timeout: float = HOST_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while "<eof>" not in self.lines[start:]:
                for line in self.lines[start:]:
                    if line.split()[:1] == [kind]:
                        return line.split()[1:]
                if not self._changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no '{kind}' line within {timeout} s: {self.lines[-5:]}")
            for line in self.lines[start:]:
                if line.split()[:1] == [kind]:
                    return line.split()[1:]
        raise self._ended(kind)  # outside the lock: it waits for the exit code

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def observed(self, start: int, name: str = "scale") -> list[tuple[int, ...]]:
        with self._changed:
            lines = self.lines[start:]
        return [tuple(int(v) for v in line.split()[2:]) for line in lines if line.split()[:2] == ["observed", name]]

    def wait_for_only(self, value: int, start: int, name: str = "scale", timeout: float = HOST_TIMEOUT) -> None:
        """Until an observation interval saw ``value`` and nothing else."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (value,) in self.observed(start, name):
                return
            with self._changed:
                self._changed.wait(timeout=0.1)
        raise AssertionError(f"host never saw only {value}: {self.observed(start, name)[-5:]}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=HOST_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc.stdin is not None:
            self.proc.stdin.close()
        self._stderr_done.wait(timeout=ENDED_WAIT)
        return self.proc.returncode, "".join(line + "\n" for line in self.stderr)
