"""The end-to-end demo (``make demo``): patch a running process and take the patch out again.

A multi-threaded host program loads a sample DLL and calls ``scale`` and
``scale_then_xor`` in a loop (under Wine on Linux, natively on Windows). The
demo diffs the baseline DLL against its fixed version, builds a package,
signs it with a release key the demo's trust store holds (``hotpatch trust
add``), applies it to the running host with ``hotpatch apply``, shows the host's
output change without a restart, shows ``hotpatch status``, rolls back, and
shows the original behaviour again. Every step is the real CLI a user runs.

    python -m hotpatch.cli.demo --fixtures build/fixtures
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["main"]

CASE = "body_change"
CALLS = ("scale:10", "scale_then_xor:10,1")


def _banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _hotpatch(*args: str, env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "hotpatch.cli", *args]
    print("$ hotpatch " + " ".join(args), flush=True)
    return subprocess.run(command, env=env).returncode


class Host:
    """The running target: host.exe with the baseline DLL, its output lines on a queue."""

    def __init__(self, fixtures: Path, env: dict[str, str]) -> None:
        from ..process.winehost import wine_command

        argv = [str(fixtures / "host.exe"), str(fixtures / CASE / "baseline.dll"), "--threads", "4",
                "--seconds", "0", "--until-stdin-closes", "--interval-ms", "400", *CALLS]
        if sys.platform != "win32":
            argv = [*wine_command(), *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.pid = int(self._wait("pid").split()[1])

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _wait(self, kind: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith(kind):
                return line
        raise SystemExit(f"demo: the host printed no '{kind}' line")

    def show(self, seconds: float) -> None:
        """Print what the worker threads observed for a while."""
        while not self.lines.empty():
            self.lines.get_nowait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line.startswith("observed"):
                print(f"  host: {line}", flush=True)

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hotpatch.cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default="build/fixtures", help="built fixtures (make fixtures)")
    parser.add_argument("--work", default="build/demo", help="where the package and the Wine prefix go")
    args = parser.parse_args(argv)
    fixtures, work = Path(args.fixtures).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if sys.platform != "win32":
        from ..process.winehost import ensure_prefix, wine_env

        prefix = work / "wineprefix"
        env = wine_env(prefix)
        env["HOTPATCH_WINEPREFIX"] = str(prefix)
        env["HOTPATCH_STATE"] = str(work / "state")
        _banner("preparing a private Wine prefix (the first time takes a while)")
        ensure_prefix(prefix)
    env["HOTPATCH_TRUST_DIR"] = str(work / "trusted-keys")  # the demo's own trust store, not this machine's
    baseline, patched = fixtures / CASE / "baseline.dll", fixtures / CASE / "patched.dll"
    package = work / "scale-fix.hpk"
    private_key, public_key = work / "release.key", work / "release.pub"

    _banner("what hotpatch sees in the baseline DLL")
    _hotpatch("info", str(baseline), env=env)

    _banner("the running host, before: 4 threads call scale(10) and scale_then_xor(10, 1)")
    host = Host(fixtures, env)
    failures = 0
    try:
        print(f"  host is Windows process {host.pid}", flush=True)
        host.show(1.5)

        _banner("diff of the baseline against the fixed DLL, and the verdict")
        failures += _hotpatch("diff", str(baseline), str(patched), env=env) != 0
        _banner("a release key, trusted on this machine: only packages it signs go in")
        if not private_key.exists():
            failures += _hotpatch("keygen", str(private_key), str(public_key), env=env) != 0
        failures += _hotpatch("trust", "add", str(public_key), "--name", "demo release key", env=env) != 0
        _banner("build the patch package, signed")
        failures += _hotpatch("build", str(baseline), str(patched), "-o", str(package), "--sequence", "1",
                              "--description", "scale: fix the arithmetic", "--sign-key", str(private_key),
                              env=env) != 0
        _hotpatch("inspect", str(package), "--lines", "8", env=env)

        _banner("apply it to the running host: no restart")
        failures += _hotpatch("apply", str(package), "--pid", str(host.pid), env=env) != 0
        host.show(1.5)
        _banner("status, read from the target's memory")
        failures += _hotpatch("status", "--pid", str(host.pid), env=env) != 0

        _banner("roll back: the original code is back, still no restart")
        failures += _hotpatch("rollback", "--pid", str(host.pid), env=env) != 0
        host.show(1.5)
    finally:
        code = host.stop()
    _banner(f"the host exited with {code} after running the whole time")
    return 1 if failures or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
