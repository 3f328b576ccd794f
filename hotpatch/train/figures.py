"""The train's figures: restarts, how long fixes would have waited for one, package growth.

- restarts: the baselines of the program (planned and unplanned, the first
  included) against a restart for every release;
- waits: for each release, the days its fixes would have waited for a restart
  if only baselines restarted (no hotpatches): until the next baseline of the
  train, or, after the last one, until the next planned date of the schedule.
  With the program they wait 0 days: a hotpatch goes in live, a baseline
  restarts that day;
- package sizes: per release and per cycle (cumulative packages grow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .manifest import BEFORE, HOTPATCH, PLANNED, UNPLANNED, Manifest
from .plan import Schedule

if TYPE_CHECKING:
    from .run import ReleaseOutcome

__all__ = ["train_figures"]


def train_figures(manifest: Manifest, outcomes: list[ReleaseOutcome], schedule: Schedule) -> dict[str, Any]:
    program = [o for o in outcomes if o.kind != BEFORE]
    planned = sum(o.kind == PLANNED for o in program)
    unplanned = sum(o.kind == UNPLANNED for o in program)
    waits = _waits(program, schedule)
    hotpatch_waits = [w["days_without_hotpatch"] for w in waits if w["kind"] == HOTPATCH]
    return {
        "releases": len(program),
        "hotpatch_months": sum(o.kind == HOTPATCH for o in program),
        "restarts": planned + unplanned,
        "restarts_planned": planned,
        "restarts_unplanned": unplanned,
        "restarts_every_release": len(program),
        "restarts_avoided": len(program) - planned - unplanned,
        "fix_waits": waits,
        "fix_wait_days_total": sum(hotpatch_waits),
        "fix_wait_days_max": max(hotpatch_waits, default=0),
        "fix_wait_days_mean": round(sum(hotpatch_waits) / len(hotpatch_waits), 1) if hotpatch_waits else 0.0,
        "package_bytes": [{"release": o.name, "kind": o.kind, "baseline": o.baseline, "sequence": o.sequence,
                           "bytes": o.package_bytes,
                           "modules": {m.module: m.package["bytes"] for m in o.modules if m.package}}
                          for o in program],
        "cycles": _cycles(program),
    }


def _waits(program: list[ReleaseOutcome], schedule: Schedule) -> list[dict[str, Any]]:
    out = []
    for position, outcome in enumerate(program):
        later = next((o for o in program[position + 1:] if o.kind in (PLANNED, UNPLANNED)), None)
        if outcome.kind != HOTPATCH:
            days, until = 0, outcome.name
        elif later is not None:
            days, until = (later.date - outcome.date).days, later.name
        else:
            cycle_start = next(o.date for o in reversed(program[:position]) if o.kind in (PLANNED, UNPLANNED))
            planned = schedule.next_planned(cycle_start)
            days, until = (planned - outcome.date).days, f"planned {planned.isoformat()}"
        out.append({"release": outcome.name, "kind": outcome.kind, "days_without_hotpatch": days,
                    "days_with_program": 0, "restart": until})
    return out


def _cycles(program: list[ReleaseOutcome]) -> list[dict[str, Any]]:
    cycles: list[dict[str, Any]] = []
    for outcome in program:
        if outcome.kind != HOTPATCH or not cycles:
            cycles.append({"baseline": outcome.name, "kind": outcome.kind, "hotpatches": [], "package_bytes": []})
        else:
            cycles[-1]["hotpatches"].append(outcome.name)
            cycles[-1]["package_bytes"].append(outcome.package_bytes)
    return cycles
