"""What the page shows of a release train (``hotpatch.train/1``, docs/TRAIN.md): its calendar and releases.

The calendar is a month grid with each release on its day, coloured by what it
was (hotpatch, planned or unplanned baseline); the picture ``hotpatch train``
drew (``calendar.svg`` beside ``train.json``) is inlined too when it is there.
"""

from __future__ import annotations

import calendar
import datetime as dt
from pathlib import Path
from typing import Any

from ..errors import ReportError

__all__ = ["train_page"]

_CSS = {"hotpatch": "hotpatch", "planned_baseline": "planned", "unplanned_baseline": "baseline",
        "before_program": ""}


def train_page(document: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    try:
        releases = [{"name": r["name"], "date": dt.date.fromisoformat(r["date"]), "kind": r["kind"],
                     "bytes": r.get("package_bytes"),
                     "reasons": sorted({f"{x.get('module', '')}: {x['kind']}".lstrip(": ")
                                        for x in r.get("reasons") or []})}
                    for r in document["releases"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"not a train document (hotpatch.train/1): {exc}") from None
    figures = document.get("figures") or {}
    kinds = [r["kind"] for r in releases]
    picture = folder / "calendar.svg" if folder is not None else None
    svg = picture.read_text(errors="replace") if picture is not None and picture.is_file() else None
    return {
        "name": document.get("train") or "release train",
        "releases": [{**r, "date": r["date"].isoformat(), "outcome": r["kind"].replace("_", " ")} for r in releases],
        "hotpatches": kinds.count("hotpatch"),
        "baselines": kinds.count("planned_baseline") + kinds.count("unplanned_baseline"),
        "unplanned": kinds.count("unplanned_baseline"),
        "restarts": figures.get("restarts"),
        "months": _months(releases),
        "svg": svg[svg.index("<svg"):] if svg and "<svg" in svg else None,
    }


def _months(releases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not releases:
        return []
    by_day: dict[dt.date, list[dict[str, Any]]] = {}
    for release in releases:
        by_day.setdefault(release["date"], []).append(release)
    first, last = min(by_day), max(by_day)
    months = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        lead, length = calendar.monthrange(year, month)
        days = [{"css": "blank", "title": "", "label": ""} for _ in range(lead)]
        for number in range(1, length + 1):
            found = by_day.get(dt.date(year, month, number), [])
            label = f"{number} " + " ".join(r["name"] for r in found)
            days.append({"css": " ".join(_CSS.get(r["kind"], "") for r in found) or "day",
                         "title": "; ".join(f"{r['name']}: {r['kind'].replace('_', ' ')}" for r in found),
                         "label": label.strip()})
        months.append({"title": f"{calendar.month_name[month]} {year}", "days": days})
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months
