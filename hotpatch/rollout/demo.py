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

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["main"]

CASE = "body_change"
CALLS = ("scale:10", "scale_then_xor:10,1")
HOSTS = {"web-1": ("Europe/Paris", "web"), "web-2": ("America/New_York", "web"), "db-1": ("Asia/Tokyo", "db")}
PROBE = """import os, pathlib, sys
for pid in os.environ["HOTPATCH_PIDS"].split():
    lines = [l for l in pathlib.Path(sys.argv[1], pid + ".log").read_text().splitlines()
             if l.startswith("observed scale_then_xor")]
    if lines and lines[-1].split()[2:] != ["30"]:
        sys.exit(f"pid {pid}: scale_then_xor(10, 1) = {lines[-1].split()[2:]}, clients expect 30")
"""


def _banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _hotpatch(*args: str, env: dict[str, str]) -> int:
    print("$ hotpatch " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "hotpatch.cli", *args], env=env).returncode


class Service:
    """host.exe with the baseline DLL; its output goes to LOGS/<pid>.log, where the probe reads it."""

    def __init__(self, fixtures: Path, logs: Path, env: dict[str, str]) -> None:
        from ..process.winehost import wine_command

        argv = [str(fixtures / "host.exe"), str(fixtures / CASE / "baseline.dll"), "--threads", "3",
                "--seconds", "0", "--until-stdin-closes", "--interval-ms", "200", *CALLS]
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

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -1


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
    parser = argparse.ArgumentParser(prog="python -m hotpatch.rollout.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default="build/fixtures", help="built fixtures (make fixtures)")
    parser.add_argument("--work", default="build/demo-rollout", help="package, plans, state, Wine prefix")
    args = parser.parse_args(argv)
    fixtures, work = Path(args.fixtures).resolve(), Path(args.work).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "probe.py").write_text(PROBE)
    db = work / "rollouts.sqlite"
    db.unlink(missing_ok=True)
    env = dict(os.environ, HOTPATCH_STATE=str(work / "state"))
    if sys.platform != "win32":
        from ..process.winehost import ensure_prefix, wine_env

        env = {**wine_env(work / "wineprefix"), "HOTPATCH_STATE": str(work / "state"),
               "HOTPATCH_WINEPREFIX": str(work / "wineprefix")}
        _banner("preparing a private Wine prefix (the first time takes a while)")
        ensure_prefix(work / "wineprefix")
    package = work / "scale-fix.hpk"
    _banner("build the package: scale() changes, and scale_then_xor(10, 1) with it (30 -> 49)")
    if _hotpatch("build", str(fixtures / CASE / "baseline.dll"), str(fixtures / CASE / "patched.dll"),
                 "-o", str(package), "--sequence", "1", env=env) != 0:
        return 1
    services = {name: Service(fixtures, logs, env) for name in HOSTS}
    problems = 0
    try:
        _banner("three hosts, each running the service")
        _show(services)
        probe = f"cmd:{sys.executable} {work / 'probe.py'} {logs}"
        _banner("rollout with a probe that checks what clients rely on: the canary fails it")
        bad = _plan(work / "with-probe.toml", "scale-fix", package, services, probe)
        problems += _hotpatch("rollout", str(bad), "--db", str(db), env=env) != 1  # halted
        _show(services)

        _banner("the same package without that probe: waves, canary first")
        good = _plan(work / "plain.toml", "scale-fix-2", package, services, None)
        problems += _hotpatch("rollout", str(good), "--db", str(db), env=env) != 0
        _show(services)
        _banner("abort: roll the whole rollout back, live")
        problems += _hotpatch("rollout", "abort", "scale-fix-2", "--db", str(db), env=env) != 0
        _show(services)
    finally:
        codes = [service.stop() for service in services.values()]
    _banner(f"the services exited with {codes} after running the whole time")
    return 1 if problems or any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
