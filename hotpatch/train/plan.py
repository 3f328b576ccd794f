"""The servicing policy: when a planned baseline is due, and what kind each release becomes.

Windows Server Hotpatch's program, made a rule: the first baseline starts the
program; a planned baseline comes every ``cadence_months`` (on the calendar
from the first baseline, or ``rolling`` from the last baseline of any kind);
in between, a release is a hotpatch month only if every changed module can be
hotpatched, else it is an unplanned baseline. Overrides force a planned
baseline or skip one. Nothing here reads a binary: ``run`` asks the diff.
"""

from __future__ import annotations

import calendar
import datetime as dt

from .manifest import BEFORE, HOTPATCH, PLANNED, UNPLANNED, Policy, Release

__all__ = ["Schedule", "add_months", "kind_of"]


def add_months(day: dt.date, months: int) -> dt.date:
    """The same day ``months`` later (the month's last day when it has no such day)."""
    month0 = day.month - 1 + months
    year, month = day.year + month0 // 12, month0 % 12 + 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


class Schedule:
    """Dates of the planned baselines under a policy."""

    def __init__(self, policy: Policy, first_baseline: dt.date) -> None:
        self.policy = policy
        self.first = first_baseline

    def next_planned(self, cycle_start: dt.date) -> dt.date:
        """The first planned date after a cycle that began on ``cycle_start``."""
        months = self.policy.cadence_months
        if self.policy.schedule == "rolling":
            return add_months(cycle_start, months)
        step = 1
        while add_months(self.first, step * months) <= cycle_start:
            step += 1
        return add_months(self.first, step * months)

    def due(self, day: dt.date, cycle_start: dt.date) -> bool:
        """A release on ``day`` in a cycle begun on ``cycle_start`` is the planned baseline."""
        return day >= self.next_planned(cycle_start)


def kind_of(release: Release, *, started: bool, due: bool, policy: Policy,
            blocked: bool | None) -> str | None:
    """The release's kind; None while it depends on the diffs (call again with ``blocked``).

    ``started``: the first baseline is this release or behind it. ``blocked``:
    some changed module cannot be hotpatched (None: not diffed yet).
    """
    if not started:
        return BEFORE
    if release.name == policy.first_baseline:
        return PLANNED
    override = policy.overrides.get(release.name)
    if override is not None and override.kind == PLANNED:
        return PLANNED
    if due and override is None:
        return PLANNED
    if blocked is None:
        return None
    return UNPLANNED if blocked else HOTPATCH
