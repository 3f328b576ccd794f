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

from hotpatch.process.winehost import windows_path, wine_command, wine_env
from tests.fixtures.build_fixtures import host_exe

THREADS = 8
HOST_TIMEOUT = 30


class Host:
    """host.exe under Wine; a reader thread collects its output lines."""

    def __init__(self, prefix: Path, dll: Path, calls: list[str], threads: int = THREADS,
                 extra: tuple[str, ...] = (), timeout: float = HOST_TIMEOUT) -> None:
        argv = [
            *wine_command(),
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
        self.proc = subprocess.Popen(
            argv, env=wine_env(prefix), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.pid = int(self.wait_line("pid")[0])
        self.base = int(self.wait_line("base")[0], 16)
        self.wait_line("running", timeout=timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.strip())
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    def wait_line(self, kind: str, start: int = 0, timeout: float = HOST_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if line.split()[:1] == [kind]:
                        return line.split()[1:]
                    if line == "<eof>":
                        raise AssertionError(f"host ended before '{kind}': {self.lines}")
                if not self._changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no '{kind}' line within {timeout} s: {self.lines[-5:]}")

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
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read()
