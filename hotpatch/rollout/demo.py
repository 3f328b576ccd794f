"""The rollout demo (``make demo-rollout``): a small fleet, a package whose canary fails its probe.

Three "hosts" (Dask workers of a LocalCluster on this machine, named web-1,
web-2 and db-1, in three time zones) each run a host program that loads
body_change's baseline DLL and calls ``scale`` and ``scale_then_xor``. The
fix changes ``scale``, and with it ``scale_then_xor(10, 1)`` (30 -> 49), which
a client of the service relies on: the plan's health probe checks that value
in each process's output. The rollout's canary fails the probe, is rolled
back live, and the rollout halts with the other hosts untouched. A second
plan without that probe then goes through in waves, and ``rollout abort``
takes it out again. Every step is the real CLI.

    python -m hotpatch.rollout.demo --fixtures build/fixtures --work build/demo-rollout
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from ..process.demohost import CASE, HostProcess, banner, demo_arguments, demo_env, run_hotpatch

__all__ = ["main"]

HOSTS = {"web-1": ("Europe/Paris", "web"), "web-2": ("America/New_York", "web"), "db-1": ("Asia/Tokyo", "db")}
PROBE = """import os, pathlib, sys
for pid in os.environ["HOTPATCH_PIDS"].split():
    lines = [l for l in pathlib.Path(sys.argv[1], pid + ".log").read_text().splitlines()
             if l.startswith("observed scale_then_xor")]
    if lines and lines[-1].split()[2:] != ["30"]:
        sys.exit(f"pid {pid}: scale_then_xor(10, 1) = {lines[-1].split()[2:]}, clients expect 30")
"""


class Service(HostProcess):
    """The host program; its output goes to LOGS/<pid>.log, where the probe reads it."""

    def __init__(self, fixtures: Path, logs: Path, env: dict[str, str]) -> None:
        super().__init__(fixtures, env, threads=3, interval_ms=200)
        self.log = logs / f"{self.pid}.log"
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("w") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()

    def last(self) -> str:
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("observed scale_then_xor")]
        return lines[-1].split(maxsplit=2)[2] if lines else "?"


def _plan(path: Path, name: str, package: Path, services: dict[str, Service], probe: str | None) -> Path:
    hosts = ", ".join(f'{{name = "{n}", time_zone = "{HOSTS[n][0]}", group = "{HOSTS[n][1]}", pids = [{s.pid}]}}'
                      for n, s in services.items())
    checks = '["alive", "sites"' + (f", {probe!r}" if probe else "") + "]"
    path.write_text(f"""name = "{name}"
[package]
path = "{package.name}"
allow_unsigned = true
[inventory]
hosts = [{hosts}]
[defaults]
window = "always"
[[waves]]
name = "canary"
hosts = ["web-1"]
[[waves]]
name = "rest"
rest = true
[limits]
max_in_flight_per_group = 1
[health]
checks = {checks.replace("'", '"')}
soak = "3s"
interval = "1s"
[failure]
rollback = "host"
""")
    return path


def _show(services: dict[str, Service]) -> None:
    for name, service in services.items():
        print(f"  {name} (pid {service.pid}): scale_then_xor(10, 1) = {service.last()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    fixtures, work = demo_arguments(argv, "python -m hotpatch.rollout.demo", __doc__, "build/demo-rollout",
                                    "package, plans, state, Wine prefix")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "probe.py").write_text(PROBE)
    db = work / "rollouts.sqlite"
    db.unlink(missing_ok=True)
    env = demo_env(work)
    package = work / "scale-fix.hpk"
    banner("build the package: scale() changes, and scale_then_xor(10, 1) with it (30 -> 49)")
    if run_hotpatch("build", str(fixtures / CASE / "baseline.dll"), str(fixtures / CASE / "patched.dll"),
                 "-o", str(package), "--sequence", "1", env=env) != 0:
        return 1
    services = {name: Service(fixtures, logs, env) for name in HOSTS}
    problems = 0
    try:
        banner("three hosts, each running the service")
        _show(services)
        probe = f"cmd:{sys.executable} {work / 'probe.py'} {logs}"
        banner("rollout with a probe that checks what clients rely on: the canary fails it")
        bad = _plan(work / "with-probe.toml", "scale-fix", package, services, probe)
        problems += run_hotpatch("rollout", str(bad), "--db", str(db), env=env) != 1  # halted
        _show(services)

        banner("the same package without that probe: waves, canary first")
        good = _plan(work / "plain.toml", "scale-fix-2", package, services, None)
        problems += run_hotpatch("rollout", str(good), "--db", str(db), env=env) != 0
        _show(services)
        banner("abort: roll the whole rollout back, live")
        problems += run_hotpatch("rollout", "abort", "scale-fix-2", "--db", str(db), env=env) != 0
        _show(services)
    finally:
        codes = [service.stop() for service in services.values()]
    banner(f"the services exited with {codes} after running the whole time")
    return 1 if problems or any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
