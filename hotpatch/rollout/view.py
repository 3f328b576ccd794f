"""What a person sees of a rollout: the live view while it runs, and the final report (JSON and a table)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .runner import Runner
from .state import STATES, RolloutStore

__all__ = ["LiveView", "report", "report_table"]

_SHOWN = ("pending", "applying", "checking", "applied", "failed", "unhealthy", "rolling_back", "rolled_back",
          "unknown")


def report(store: RolloutStore, rollout_id: str) -> dict[str, Any]:
    """The rollout's report: status, per-wave counts, every target's state and last detail, the figures."""
    row = store.rollout(rollout_id)
    targets = store.targets(rollout_id)
    history = store.history(rollout_id)
    got_it = {e["host"] for e in history if (e["detail"] or {}).get("committed")}
    failed = {e["host"] for e in history if e["new"] in ("failed", "unhealthy")}
    waves: dict[int, Counter[str]] = {}
    for target in targets:
        waves.setdefault(target.wave, Counter())[target.state] += 1
    return {
        "schema": "hotpatch.rollout/1",
        "id": row.id,
        "status": row.status,
        "reason": row.reason,
        "package_id": row.package_id,
        "holder": store.holder(rollout_id),
        "waves": [{"wave": w, "hosts": sum(c.values()), **{s: c[s] for s in STATES if c[s]}}
                  for w, c in sorted(waves.items())],
        "targets": [{"host": t.host, "wave": t.wave, "group": t.group, "state": t.state, "attempts": t.attempts,
                     "updated": t.updated, "detail": t.detail} for t in targets],
        "stats": (row.report or {}).get("stats"),  # of the last run (start, resume or abort)
        # over every run: hosts the package went into, hosts that failed
        "blast_radius": len(got_it),
        "failed_hosts": sorted(failed),
    }


def report_table(document: dict[str, Any]) -> Group:
    """Waves with their counts, then the targets that did not end applied (and why)."""
    waves = Table(title=f"rollout {document['id']}: {document['status']}"
                        + (f" ({document['reason']})" if document.get("reason") else ""))
    waves.add_column("wave", justify="right")
    waves.add_column("hosts", justify="right")
    for state in _SHOWN:
        waves.add_column(state.replace("_", " "), justify="right")
    for wave in document["waves"]:
        waves.add_row(str(wave["wave"]), str(wave["hosts"]), *(str(wave.get(s, "") or "") for s in _SHOWN))
    parts: list[Any] = [waves]
    trouble = [t for t in document["targets"] if t["state"] not in ("applied", "pending")]
    if trouble:
        table = Table(title="targets not applied")
        for column in ("host", "wave", "state", "why"):
            table.add_column(column)
        for target in trouble[:50]:
            detail = target.get("detail") or {}
            why = detail.get("error") or detail.get("note") or detail.get("outcome") or ""
            table.add_row(target["host"], str(target["wave"]), target["state"], str(why)[:400])
        parts.append(table)
    stats = document.get("stats") or {}
    parts.append(Text(f"the package went into {document['blast_radius']} host(s); "
                      f"{len(document['failed_hosts'])} failed; most hosts of one group busy at once "
                      f"{stats.get('max_unavailable', 0)}"))
    return Group(*parts)


class LiveView:
    """A rich Live table of the waves, refreshed (at most 5 times a second) as targets change."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live: Live | None = None
        self._last = 0.0

    def __enter__(self) -> LiveView:
        self.live = Live(Text("starting"), console=self.console, refresh_per_second=5, transient=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def __call__(self, runner: Runner) -> None:
        if self.live is None or time.monotonic() - self._last < 0.2:
            return
        self._last = time.monotonic()
        table = Table(title=f"rollout {runner.id}" + (" HALTING" if runner.halting else "")
                      + (" ABORTING" if runner.aborting else ""))
        table.add_column("wave", justify="right")
        for state in _SHOWN:
            table.add_column(state.replace("_", " "), justify="right")
        counts: dict[int, Counter[str]] = {}
        for host, state in runner.state.items():
            counts.setdefault(runner.wave_of[host], Counter())[state] += 1
        for wave, counter in sorted(counts.items()):
            marker = "▶ " if wave == runner.planner.current else ""
            table.add_row(f"{marker}{wave}", *(str(counter[s] or "") for s in _SHOWN))
        self.live.update(table)
