"""Hosts of the inventory and their maintenance windows, in each host's own local time.

A window is one or more ``[DAYS] HH:MM-HH:MM`` spans separated by ``;``
(``Mon-Fri 01:00-05:00; Sat,Sun 00:00-08:00``), ``daily 22:00-04:00`` (an end
before the start runs past midnight), or ``always``. Days are Mon..Sun,
ranges and lists. Times are wall-clock times in the host's IANA time zone
(zoneinfo), so a window follows that zone's daylight-saving changes. All
instants outside this module are POSIX seconds (floats), which keeps the
planner cheap over 10,000+ hosts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["DAYS", "Host", "Window", "parse_window", "zone"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^(?:(?P<days>[A-Za-z,\- ]+?)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})$")


@cache
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError with a one-line reason when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _clock(text: str) -> time:
    hours, minutes = (int(part) for part in text.split(":"))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ValueError(f"not a time of day: {text!r}")
    return time(0, 0) if hours == 24 else time(hours, minutes)


def _days(text: str | None) -> frozenset[int]:
    if text is None or text.strip().lower() in ("daily", "every day", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for item in text.lower().replace(" ", "").split(","):
        first, _, last = item.partition("-")
        try:
            lo = DAYS.index(first[:3])
            hi = DAYS.index(last[:3]) if last else lo
        except ValueError:
            raise ValueError(f"not a day or day range: {item!r} (Mon..Sun)") from None
        out.update((lo + i) % 7 for i in range((hi - lo) % 7 + 1))
    return frozenset(out)


@dataclass(frozen=True)
class Span:
    days: frozenset[int]  # weekday of the span's start (Mon = 0)
    start: time
    minutes: int  # length; 24 h when start == end


@dataclass(frozen=True)
class Window:
    """When a host may be patched, as spans of its local week; no spans means always."""

    text: str
    spans: tuple[Span, ...] = ()

    @property
    def always(self) -> bool:
        return not self.spans

    def intervals(self, tz: ZoneInfo, day: date) -> list[tuple[float, float]]:
        """The spans that start on the local ``day``, as POSIX [start, end) instants."""
        out = []
        for span in self.spans:
            if day.weekday() in span.days:
                start = datetime.combine(day, span.start, tzinfo=tz)
                # the end is a wall-clock time too: a DST change inside the span shortens or lengthens it
                end_wall = datetime.combine(day, span.start) + timedelta(minutes=span.minutes)
                out.append((start.timestamp(), end_wall.replace(tzinfo=tz).timestamp()))
        return out

    def next_open(self, tz: ZoneInfo, at: float) -> tuple[float, float]:
        """The first open interval that ends after ``at``: (max(start, at), end)."""
        if self.always:
            return at, float("inf")
        today = datetime.fromtimestamp(at, tz).date()
        best: tuple[float, float] | None = None
        for offset in range(-1, 8):
            for start, end in self.intervals(tz, today + timedelta(days=offset)):
                if end > at and (best is None or start < best[0]):
                    best = (start, end)
            if best is not None and best[0] <= at:
                break
        assert best is not None  # every span recurs at least weekly
        return max(best[0], at), best[1]

    def is_open(self, tz: ZoneInfo, at: float) -> bool:
        return self.next_open(tz, at)[0] <= at


def parse_window(text: str) -> Window:
    """Parse a window (see the module docstring); ValueError with a one-line reason."""
    raw = str(text).strip()
    if raw.lower() in ("always", "any", ""):
        return Window("always")
    spans = []
    for part in raw.split(";"):
        match = _SPAN.match(part.strip())
        if not match:
            raise ValueError(f"cannot parse window {part.strip()!r} (e.g. 'Mon-Fri 01:00-05:00', 'daily 22:00-04:00')")
        start, end = _clock(match["start"]), _clock(match["end"])
        minutes = (end.hour * 60 + end.minute - start.hour * 60 - start.minute) % (24 * 60) or 24 * 60
        spans.append(Span(_days(match["days"]), start, minutes))
    return Window(raw, tuple(spans))


@dataclass(frozen=True)
class Host:
    """One host of the inventory: its Dask worker's name, zone, availability group, tags, window, selector."""

    name: str
    time_zone: str = "UTC"
    group: str = "default"
    tags: tuple[str, ...] = ()
    window: Window = field(default_factory=lambda: Window("always"))
    module: str | None = None  # processes that have this module loaded
    pids: tuple[int, ...] = ()  # or exactly these processes

    @property
    def tz(self) -> ZoneInfo:
        return zone(self.time_zone)

    def next_open(self, at: float) -> tuple[float, float]:
        return self.window.next_open(self.tz, at)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "time_zone": self.time_zone, "group": self.group, "tags": list(self.tags),
                "window": self.window.text, "module": self.module, "pids": list(self.pids)}
