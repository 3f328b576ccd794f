"""What the demos share: the host program they patch (host.exe running body_change's baseline DLL) and how
they print their steps and run the real CLI (``hotpatch.cli.demo``, ``hotpatch.rollout.demo``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["CALLS", "CASE", "HostProcess", "banner", "demo_arguments", "demo_env", "run_hotpatch"]

CASE = "body_change"
CALLS = ("scale:10", "scale_then_xor:10,1")


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run_hotpatch(*args: str, env: dict[str, str]) -> int:
    """Run ``hotpatch ARGS`` as a user would, showing the command first."""
    print("$ hotpatch " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "hotpatch.cli", *args], env=env).returncode


class HostProcess:
    """host.exe with the baseline DLL, calling CALLS on worker threads until its stdin closes (Wine off Windows).

    Under Wine a start that ends before the pid line with no output at all is
    Wine's failure (winehost.ended_silently): it is tried once more.
    """

    def __init__(self, fixtures: Path, env: dict[str, str], threads: int, interval_ms: int) -> None:
        argv = [str(fixtures / "host.exe"), str(fixtures / CASE / "baseline.dll"), "--threads", str(threads),
                "--seconds", "0", "--until-stdin-closes", "--interval-ms", str(interval_ms), *CALLS]
        attempts = 1
        if sys.platform != "win32":
            from .winehost import START_ATTEMPTS, wine_command

            argv, attempts = [*wine_command(), *argv], START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            pid = self._start(argv, env, last=attempt == attempts)
            if pid is not None:
                self.pid = pid
                return

    def _start(self, argv: list[str], env: dict[str, str], last: bool) -> int | None:
        """The host's pid; None when Wine ended it silently and another try is left."""
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        stderr: list[str] = []
        # read all along (a full pipe would block the host), kept for the message if it ends early
        reader = threading.Thread(target=lambda s=self.proc.stderr: stderr.extend(s), daemon=True)
        reader.start()
        printed = []
        for line in self.proc.stdout:
            if line.startswith("pid "):
                return int(line.split()[1])
            printed.append(line)
        code = self.proc.wait()
        reader.join(timeout=5)
        if not last and sys.platform != "win32":
            from .winehost import ended_silently

            if ended_silently("".join(printed), "".join(stderr)):
                return None
        tail = "".join((printed + stderr)[-10:]).strip()
        raise SystemExit(f"demo: the host program ended before printing its pid (exit code {code})"
                         + (f":\n{tail}" if tail else ", printing nothing"))

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -1


def demo_arguments(argv: list[str] | None, prog: str, doc: str, work: str, work_help: str) -> tuple[Path, Path]:
    """A demo's command line: the built fixtures and its work directory, both absolute."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--fixtures", default="build/fixtures", help="built fixtures (make fixtures)")
    parser.add_argument("--work", default=work, help=work_help)
    args = parser.parse_args(argv)
    return Path(args.fixtures).resolve(), Path(args.work).resolve()


def demo_env(work: Path) -> dict[str, str]:
    """The environment every step of a demo runs in: its own state directory under ``work`` and, off
    Windows, its own Wine prefix there (made now: the first time takes a while)."""
    env = dict(os.environ, HOTPATCH_STATE=str(work / "state"))
    if sys.platform != "win32":
        from .winehost import ensure_prefix, wine_env

        prefix = work / "wineprefix"
        env = {**wine_env(prefix), "HOTPATCH_STATE": str(work / "state"), "HOTPATCH_WINEPREFIX": str(prefix)}
        banner("preparing a private Wine prefix (the first time takes a while)")
        ensure_prefix(prefix)
    return env
