"""What the demos share: the host program they patch (host.exe running body_change's baseline DLL) and how
they print their steps and run the real CLI (``hotpatch.cli.demo``, ``hotpatch.rollout.demo``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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
    """host.exe with the baseline DLL, calling CALLS on worker threads until its stdin closes (Wine off Windows)."""

    def __init__(self, fixtures: Path, env: dict[str, str], threads: int, interval_ms: int) -> None:
        from .winehost import wine_command

        argv = [str(fixtures / "host.exe"), str(fixtures / CASE / "baseline.dll"), "--threads", str(threads),
                "--seconds", "0", "--until-stdin-closes", "--interval-ms", str(interval_ms), *CALLS]
        if sys.platform != "win32":
            argv = [*wine_command(), *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True)
        assert self.proc.stdout is not None
        line = ""
        while not line.startswith("pid "):
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("demo: the host program ended before printing its pid")
        self.pid = int(line.split()[1])

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
