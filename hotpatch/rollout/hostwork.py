"""The task a host's Dask worker runs: the same apply / status / rollback / health gate as one host's CLI.

``host_task(action, request)`` runs on the worker named after the host, with
that host's environment: ``HOTPATCH_STATE`` (journals), the agent
(``HOTPATCH_AGENT``, ``HOTPATCH_WINEPREFIX`` under Wine). It returns a plain
dict (the completion's outcome and detail) and never raises for a failure
of the target; only a worker that vanishes loses a task.

- apply: selects the processes, applies the package to each (skipping a
  process whose memory already holds it: a retried task never patches
  twice), then runs the health gate; on any failure the host rolls its own
  processes back when ``auto_rollback``.
- status: finishes or undoes an operation cut short (``recover``), then reads
  each process's sites from memory: ``ours`` (every process holds the
  package), ``original`` (none does), ``partial`` (some do, the others are
  untouched: an apply cut short between two processes) or ``mixed`` (a
  process whose sites disagree, or that cannot be read).
- rollback: takes the package out of every selected process that has it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..apply.agent import AgentClient
from ..apply.engine import Engine
from ..apply.health import HealthSpec, roll_back_package, run_gate
from ..apply.journal import Journal
from ..errors import HotpatchError
from ..package import Package
from ..package.format import loads, package_id_of
from ..package.trust import TrustStore

__all__ = ["HostRequest", "describe_worker", "host_task"]


@dataclass(frozen=True)
class HostRequest:
    package: bytes
    trusted_keys: tuple[bytes, ...]
    allow_unsigned: bool
    module: str | None
    pids: tuple[int, ...]
    health: HealthSpec
    auto_rollback: bool


def _select(client: AgentClient, request: HostRequest, module_name: str) -> list[int]:
    if request.pids:
        return list(request.pids)
    return client.pids_with_module(request.module or module_name)


def _ours(engine: Engine, package_id: str) -> str:
    """The package's state in this process's memory: ours, original (absent) or mixed/foreign."""
    for package in engine.status().packages:
        if package.package_id == package_id:
            return package.state
    return "original"


def host_task(action: str, request: HostRequest) -> dict[str, Any]:
    """Run ``action`` (apply, status, rollback) on this host; the outcome and what happened, as a dict."""
    started = time.monotonic()
    try:
        package = loads(request.package, trusted_keys=list(request.trusted_keys) or None,
                                require_signature=not request.allow_unsigned)
        with AgentClient.start() as client:
            pids = _select(client, request, package.target.module_name)
            if not pids:
                return {"outcome": "failed" if action == "apply" else "original", "committed": False,
                        "error": "no process matches the selector", "processes": []}
            run = {"apply": _apply, "status": _status, "rollback": _rollback}[action]
            result = run(client, package, request, pids)
    except HotpatchError as exc:
        result = {"outcome": "failed", "committed": False, "error": str(exc), "processes": []}
    result["seconds"] = round(time.monotonic() - started, 3)
    result["worker_host"] = socket.gethostname()
    return result


def _apply(client: AgentClient, package: Package, request: HostRequest, pids: list[int]) -> dict[str, Any]:
    journal = Journal()
    processes: list[dict[str, Any]] = []
    applied: list[int] = []
    error = None
    for pid in pids:
        try:
            with client.open(pid) as backend:
                # the host's trust store, plus the plan's keys (as `hotpatch apply --trust`)
                engine = Engine(backend, journal, allow_unsigned=request.allow_unsigned,
                                trusted_keys=TrustStore.default(request.trusted_keys).raw_keys())
                # a task cut short here before (its worker died, Dask re-ran it) is finished or undone first
                engine.recover()
                if _ours(engine, package_id_of(package)) == "ours":
                    processes.append({"pid": pid, "status": "already applied"})
                    applied.append(pid)
                    continue
                with engine.transaction() as tx:
                    result = tx.apply(package)
                applied.append(pid)
                commit = result.commit
                processes.append({"pid": pid, "status": "applied",
                                  "pause_ms": commit.pause_us / 1000 if commit else None})
        except HotpatchError as exc:
            error = f"pid {pid}: {exc}"
            processes.append({"pid": pid, "status": "refused", "error": str(exc)})
            break
    committed = any(p["status"] == "applied" for p in processes)
    if error is not None:
        rolled = _take_out(client, journal, package_id_of(package), applied) if request.auto_rollback else []
        return {"outcome": "failed" if request.auto_rollback or not applied else "unhealthy",
                "committed": committed, "error": error, "processes": processes, "rolled_back": rolled}
    gate = run_gate(client, journal, package_id_of(package), applied, request.health,
                    auto_rollback=request.auto_rollback)
    out: dict[str, Any] = {"committed": committed, "processes": processes, "health": gate.to_json()}
    if gate.ok:
        out["outcome"] = "applied"
    else:
        out["outcome"] = "failed" if gate.rolled_back and not gate.rollback_errors else "unhealthy"
        out["error"] = gate.summary()
    return out


def _take_out(client: AgentClient, journal: Journal, package_id: str, pids: list[int]) -> list[int]:
    return roll_back_package(client, journal, package_id, pids)[0]  # what is left is read back afterwards


def _status(client: AgentClient, package: Package, request: HostRequest, pids: list[int]) -> dict[str, Any]:
    journal = Journal()
    states = {}
    for pid in pids:
        try:
            with client.open(pid) as backend:
                engine = Engine(backend, journal)
                engine.recover()  # an apply or rollback cut short is finished or undone from what memory says
                states[pid] = _ours(engine, package_id_of(package))
        except HotpatchError as exc:
            states[pid] = f"error: {exc}"
    values = set(states.values())
    if not values <= {"ours", "original"}:
        outcome = "mixed"
    elif len(values) == 1:
        outcome = values.pop()
    else:
        outcome = "partial"  # an apply stopped between two processes; each one is whole
    return {"outcome": outcome, "committed": False, "processes": [{"pid": p, "state": s} for p, s in states.items()]}


def _rollback(client: AgentClient, package: Package, request: HostRequest, pids: list[int]) -> dict[str, Any]:
    journal = Journal()
    rolled = _take_out(client, journal, package_id_of(package), pids)
    left = []
    for pid in pids:
        try:
            with client.open(pid) as backend:
                engine = Engine(backend, journal)
                engine.recover()  # a rollback cut short (an agent that timed out mid-commit) is settled first
                if _ours(engine, package_id_of(package)) != "original":
                    left.append(pid)
        except HotpatchError:
            continue  # the process is gone: nothing of ours is left in it
    return {"outcome": "rolled_back" if not left else "failed", "committed": False, "rolled_back": rolled,
            "processes": [{"pid": p, "state": "original" if p not in left else "still applied"} for p in pids]}


def describe_worker() -> dict[str, Any]:
    """What a worker says of its host (inventory ``every_worker``): zone, group, tags, window, selector."""
    env = os.environ
    out: dict[str, Any] = {"time_zone": env.get("HOTPATCH_TIME_ZONE") or env.get("TZ") or "UTC"}
    for key, name in (("group", "HOTPATCH_GROUP"), ("window", "HOTPATCH_WINDOW"), ("module", "HOTPATCH_MODULE")):
        if env.get(name):
            out[key] = env[name]
    if env.get("HOTPATCH_TAGS"):
        out["tags"] = env["HOTPATCH_TAGS"].split(",")
    return out
