"""The health gate after a commit: soak the patched processes, roll back live on a failure.

A soak runs every check once per ``interval`` until ``soak`` has passed or a
check fails. Built-in checks read the truth from the target, never from the
journal alone:

    alive          every patched process still runs (same pid *and* start time)
    sites          every site of the package still holds our redirect (status reads memory)
    cmd:COMMAND    a probe command (shell words); exit 0 passes; killed after ``probe_timeout``
    python:MOD:FN  a Python entry point called as FN(pids) -> bool (False or an exception fails)

Probe commands get ``HOTPATCH_PIDS`` (space-separated) and
``HOTPATCH_PACKAGE`` in their environment. On a failure the package is
rolled back from every patched process (unless ``auto_rollback`` is off), and
each process's journal record gets the health history as events
(``step: "health"``), so ``status`` and ``recover`` see what happened.

The same gate serves ``hotpatch apply --health/--soak`` and the rollout
host task (hotpatch.rollout.hostwork).
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import HotpatchError, ProcessGoneError
from .agent import AgentClient
from .engine import Engine
from .journal import Journal

__all__ = [
    "BUILTIN_CHECKS",
    "GateResult",
    "HealthEvent",
    "HealthSpec",
    "parse_check",
    "parse_duration",
    "roll_back_package",
    "run_gate",
]

BUILTIN_CHECKS = ("alive", "sites")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds from "250ms", "30s", "5m", "2h", "1d" or a plain number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{what}: negative duration {text}")
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{what}: not a duration: {text!r} (e.g. 30s, 5m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_check(text: str) -> str:
    """Validate one check name; returns it unchanged (ValueError with a one-line reason)."""
    if text in BUILTIN_CHECKS:
        return text
    if text.startswith("cmd:"):
        try:
            words = shlex.split(text[4:])
        except ValueError as exc:
            raise ValueError(f"health check {text!r}: {exc}") from None
        if not words:
            raise ValueError(f"health check {text!r}: empty command")
        return text
    if text.startswith("python:"):
        parts = text[7:].split(":")
        if len(parts) != 2 or not all(p.replace(".", "").replace("_", "").isalnum() for p in parts):
            raise ValueError(f"health check {text!r}: expected python:MODULE:FUNCTION")
        return text
    raise ValueError(f"unknown health check {text!r} (alive, sites, cmd:COMMAND, python:MODULE:FUNCTION)")


@dataclass(frozen=True)
class HealthSpec:
    """What to watch after the commit, for how long, and how often."""

    checks: tuple[str, ...] = BUILTIN_CHECKS
    soak: float = 0.0
    interval: float = 1.0
    probe_timeout: float = 10.0

    def __post_init__(self) -> None:
        for check in self.checks:
            parse_check(check)

    def to_json(self) -> dict[str, Any]:
        return {"checks": list(self.checks), "soak": self.soak, "interval": self.interval,
                "probe_timeout": self.probe_timeout}


@dataclass(frozen=True)
class HealthEvent:
    time: float
    check: str
    ok: bool
    detail: str = ""
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "check": self.check, "ok": self.ok, "detail": self.detail, "pid": self.pid}


@dataclass
class GateResult:
    """How the soak went: ``failed`` names the failing check, ``rolled_back`` the pids taken out."""

    package_id: str
    pids: list[int]
    rounds: int = 0
    failed: HealthEvent | None = None
    rolled_back: list[int] = field(default_factory=list)
    rollback_errors: dict[int, str] = field(default_factory=dict)
    events: list[HealthEvent] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed is None

    def summary(self) -> str:
        if self.ok:
            return f"healthy: {self.rounds} round(s) of {len(self.pids)} process(es)"
        where = f" on pid {self.failed.pid}" if self.failed.pid is not None else ""
        text = f"health check '{self.failed.check}' failed{where}: {self.failed.detail}"
        if self.rolled_back:
            text += f"; rolled back {self.package_id} from pid {', '.join(map(str, self.rolled_back))}"
        elif not self.rollback_errors:
            text += f"; {self.package_id} left applied (no auto-rollback)"
        if self.rollback_errors:
            text += "; rollback FAILED on " + ", ".join(f"pid {p} ({e})" for p, e in self.rollback_errors.items())
        return text

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "package_id": self.package_id, "pids": self.pids, "rounds": self.rounds,
                "failed": self.failed.to_json() if self.failed else None, "rolled_back": self.rolled_back,
                "rollback_errors": {str(k): v for k, v in self.rollback_errors.items()},
                "summary": self.summary()}


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------


def _check_alive(client: AgentClient, starts: dict[int, int]) -> HealthEvent | None:
    for pid, start in starts.items():
        try:
            now = client.process_info(pid).start_time
        except ProcessGoneError:
            return HealthEvent(time.time(), "alive", False, "the process exited", pid)
        if now != start:
            return HealthEvent(time.time(), "alive", False, "the pid now belongs to another process", pid)
    return None


def _check_sites(client: AgentClient, journal: Journal, package_id: str, pids: Sequence[int]) -> HealthEvent | None:
    for pid in pids:
        try:
            with client.open(pid) as backend:
                packages = Engine(backend, journal).status().packages
        except HotpatchError as exc:
            return HealthEvent(time.time(), "sites", False, f"cannot read its memory: {exc}", pid)
        mine = [p for p in packages if p.package_id == package_id]
        if not mine:
            return HealthEvent(time.time(), "sites", False, "the package is no longer applied", pid)
        if mine[0].state != "ours":
            bad = [s.function for s in mine[0].sites if s.state != "ours"]
            return HealthEvent(time.time(), "sites", False, f"sites no longer ours: {', '.join(bad)}", pid)
    return None


def _check_command(check: str, spec: HealthSpec, package_id: str, pids: Sequence[int]) -> HealthEvent | None:
    env = dict(os.environ, HOTPATCH_PIDS=" ".join(map(str, pids)), HOTPATCH_PACKAGE=package_id)
    try:
        proc = subprocess.run(shlex.split(check[4:]), env=env, capture_output=True, text=True,
                              timeout=spec.probe_timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return HealthEvent(time.time(), check, False, f"timed out after {spec.probe_timeout:g} s")
    except OSError as exc:
        return HealthEvent(time.time(), check, False, f"cannot run: {exc.strerror or exc}")
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return HealthEvent(time.time(), check, False, f"exit {proc.returncode} {last[0][:200]}".rstrip())
    return None


def _check_python(check: str, pids: Sequence[int]) -> HealthEvent | None:
    module_name, function_name = check[7:].split(":")
    try:
        function: Callable[[list[int]], object] = getattr(importlib.import_module(module_name), function_name)
        ok = function(list(pids))
    except Exception as exc:  # noqa: BLE001 - a probe's own failure is a failed check, reported in one line
        return HealthEvent(time.time(), check, False, f"raised {type(exc).__name__}: {exc}")
    return None if ok else HealthEvent(time.time(), check, False, f"returned {ok!r}")


def _round(client: AgentClient, journal: Journal, spec: HealthSpec, package_id: str,
           starts: dict[int, int]) -> HealthEvent | None:
    pids = list(starts)
    for check in spec.checks:
        if check == "alive":
            failed = _check_alive(client, starts)
        elif check == "sites":
            failed = _check_sites(client, journal, package_id, pids)
        elif check.startswith("cmd:"):
            failed = _check_command(check, spec, package_id, pids)
        else:
            failed = _check_python(check, pids)
        if failed is not None:
            return failed
    return None


# --------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------


def run_gate(
    client: AgentClient,
    journal: Journal,
    package_id: str,
    pids: Sequence[int],
    spec: HealthSpec,
    *,
    auto_rollback: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> GateResult:
    """Soak ``pids`` (all carrying ``package_id``); on a failure roll the package back from each of them."""
    result = GateResult(package_id, list(pids))
    starts: dict[int, int] = {}
    for pid in pids:
        try:
            starts[pid] = client.process_info(pid).start_time
        except ProcessGoneError:
            result.failed = HealthEvent(time.time(), "alive", False, "the process exited", pid)
            break
    deadline = time.monotonic() + spec.soak
    while result.failed is None:
        result.failed = _round(client, journal, spec, package_id, starts)
        result.rounds += 1
        left = deadline - time.monotonic()
        if result.failed is not None or left <= 0:
            break
        sleep(min(spec.interval, left))
    if result.failed is not None:
        result.events.append(result.failed)
        if auto_rollback:
            _roll_back(client, journal, result, [p for p in pids if p in starts and p != _gone(result)])
    else:
        result.events.append(HealthEvent(time.time(), "all", True, f"{result.rounds} round(s) passed"))
    _journal_history(client, journal, result)
    return result


def _gone(result: GateResult) -> int | None:
    failed = result.failed
    return failed.pid if failed is not None and failed.check == "alive" else None


def _roll_back(client: AgentClient, journal: Journal, result: GateResult, pids: Sequence[int]) -> None:
    rolled, errors = roll_back_package(client, journal, result.package_id, pids)
    result.rolled_back += rolled
    result.rollback_errors.update(errors)


def roll_back_package(client: AgentClient, journal: Journal, package_id: str,
                      pids: Sequence[int]) -> tuple[list[int], dict[int, str]]:
    """Take ``package_id`` out of each process that still has it: (pids rolled back, pid -> error)."""
    rolled: list[int] = []
    errors: dict[int, str] = {}
    for pid in pids:
        try:
            with client.open(pid) as backend:
                engine = Engine(backend, journal)
                if package_id not in {p.package_id for p in engine.status().packages}:
                    continue  # nothing of ours there any more
                with engine.transaction() as tx:
                    tx.rollback(package_id)
            rolled.append(pid)
        except HotpatchError as exc:
            errors[pid] = str(exc)
    return rolled, errors


def _journal_history(client: AgentClient, journal: Journal, result: GateResult) -> None:
    """Append the soak's outcome to the package's record in each live process's journal."""
    for pid in result.pids:
        try:
            start = client.process_info(pid).start_time
        except ProcessGoneError:
            continue
        process = journal.process(pid, start)
        with process.locked():
            records = [r for r in process.records if r.package_id == result.package_id]
            if not records:
                continue
            for event in result.events:
                records[-1].events.append({"time": event.time, "step": "health",
                                           "state": "passed" if event.ok else "failed",
                                           "check": event.check, "detail": event.detail, "pid": event.pid})
            if result.rolled_back and pid in result.rolled_back:
                records[-1].events.append({"time": time.time(), "step": "health", "state": "rolled_back",
                                           "check": result.failed.check if result.failed else "", "detail": ""})
            process.save()
