"""The ``--health``/``--soak`` options of ``hotpatch apply`` and the gate they run after the commits.

``hotpatch apply PKG --pid ... --soak 30s [--health CHECK ...] [--no-auto-rollback]``
watches every process the package went into (hotpatch.apply.health). A
failure is one line on stderr naming the check and what was rolled back, and
exit 1 (the processes run their original code again), or 4 when a rollback
itself failed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .agent import AgentClient
from .health import BUILTIN_CHECKS, HealthSpec, parse_check, parse_duration, run_gate
from .journal import Journal

__all__ = ["add_health_arguments", "health_gate"]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check(text: str) -> str:
    try:
        return parse_check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_health_arguments(apply: argparse.ArgumentParser) -> None:
    """Register --health, --soak, --probe-interval, --probe-timeout and --no-auto-rollback on ``apply``."""
    group = apply.add_argument_group("health gate (after the commit)")
    group.add_argument("--soak", type=_duration, default=None, metavar="DURATION",
                       help="watch the patched processes this long (30s, 5m); --health alone: one round")
    group.add_argument("--health", type=_check, action="append", default=[], metavar="CHECK",
                       help="alive, sites, cmd:COMMAND or python:MODULE:FUNCTION; repeatable "
                            f"(default with --soak: {', '.join(BUILTIN_CHECKS)})")
    group.add_argument("--probe-interval", type=_duration, default=1.0, metavar="DURATION",
                       help="time between two rounds of checks (default 1s)")
    group.add_argument("--probe-timeout", type=_duration, default=10.0, metavar="DURATION",
                       help="a probe command still running after this fails (default 10s)")
    group.add_argument("--no-auto-rollback", action="store_true",
                       help="on a failed check, leave the package applied and only report")


def health_gate(args: argparse.Namespace, client: AgentClient, package_id: str, results: list[dict[str, Any]],
                lines: list[str]) -> int:
    """Soak the processes ``results`` says were patched; returns the exit code the gate adds (0, 1 or 4)."""
    if args.soak is None and not args.health:
        return 0
    pids = [r["pid"] for r in results if r.get("status") == "applied"]
    if not pids or args.dry_run:
        return 0
    # --health without --soak: one round of checks right after the commit
    spec = HealthSpec(tuple(args.health) or BUILTIN_CHECKS, args.soak or 0.0, args.probe_interval, args.probe_timeout)
    gate = run_gate(client, Journal(), package_id, pids, spec, auto_rollback=not args.no_auto_rollback)
    for result in results:
        if result.get("pid") in pids:
            result["health"] = gate.to_json()
            if result["pid"] in gate.rolled_back:
                result["status"] = "rolled_back"
    lines.append(gate.summary())
    if gate.ok:
        return 0
    print(f"hotpatch: error: {gate.summary()}", file=sys.stderr)
    return 4 if gate.rollback_errors else 1
