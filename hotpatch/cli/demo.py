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

import queue
import sys
import threading
import time
from pathlib import Path

from ..process.demohost import CASE, HostProcess, banner, demo_arguments, demo_env, run_hotpatch

__all__ = ["main"]


class Host(HostProcess):
    """The running target, its output lines on a queue."""

    def __init__(self, fixtures: Path, env: dict[str, str]) -> None:
        super().__init__(fixtures, env, threads=4, interval_ms=400)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

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


def main(argv: list[str] | None = None) -> int:
    fixtures, work = demo_arguments(argv, "python -m hotpatch.cli.demo", __doc__, "build/demo",
                                    "where the package and the Wine prefix go")
    work.mkdir(parents=True, exist_ok=True)
    env = demo_env(work)
    env["HOTPATCH_TRUST_DIR"] = str(work / "trusted-keys")  # the demo's own trust store, not this machine's
    baseline, patched = fixtures / CASE / "baseline.dll", fixtures / CASE / "patched.dll"
    package = work / "scale-fix.hpk"
    private_key, public_key = work / "release.key", work / "release.pub"

    banner("what hotpatch sees in the baseline DLL")
    run_hotpatch("info", str(baseline), env=env)

    banner("the running host, before: 4 threads call scale(10) and scale_then_xor(10, 1)")
    host = Host(fixtures, env)
    failures = 0
    try:
        print(f"  host is Windows process {host.pid}", flush=True)
        host.show(1.5)

        banner("diff of the baseline against the fixed DLL, and the verdict")
        failures += run_hotpatch("diff", str(baseline), str(patched), env=env) != 0
        banner("a release key, trusted on this machine: only packages it signs go in")
        if not private_key.exists():
            failures += run_hotpatch("keygen", str(private_key), str(public_key), env=env) != 0
        failures += run_hotpatch("trust", "add", str(public_key), "--name", "demo release key", env=env) != 0
        banner("build the patch package, signed")
        failures += run_hotpatch("build", str(baseline), str(patched), "-o", str(package), "--sequence", "1",
                              "--description", "scale: fix the arithmetic", "--sign-key", str(private_key),
                              env=env) != 0
        run_hotpatch("inspect", str(package), "--lines", "8", env=env)

        banner("apply it to the running host: no restart")
        failures += run_hotpatch("apply", str(package), "--pid", str(host.pid), env=env) != 0
        host.show(1.5)
        banner("status, read from the target's memory")
        failures += run_hotpatch("status", "--pid", str(host.pid), env=env) != 0

        banner("roll back: the original code is back, still no restart")
        failures += run_hotpatch("rollback", "--pid", str(host.pid), env=env) != 0
        host.show(1.5)
    finally:
        code = host.stop()
    banner(f"the host exited with {code} after running the whole time")
    return 1 if failures or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
