"""The train as a calendar picture (matplotlib; SVG or PNG by the file's suffix).

Like the hotpatch calendar Microsoft publishes: months left to right, each
release a box in its month, baselines (a restart) and hotpatch months told
apart by colour, unplanned baselines highlighted (red, hatched) with their
blocking module named; under it, the bytes of each release's packages, which
grow through a cycle because every package is cumulative.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_bytes
from .manifest import BEFORE, HOTPATCH, PLANNED, UNPLANNED

if TYPE_CHECKING:
    from .run import ReleaseOutcome, TrainResult

__all__ = ["COLOURS", "draw_calendar"]

COLOURS = {PLANNED: "#2b6cb0", HOTPATCH: "#38a169", UNPLANNED: "#e53e3e", BEFORE: "#a0aec0"}
LABELS = {PLANNED: "planned baseline (restart)", HOTPATCH: "hotpatch (no restart)",
          UNPLANNED: "unplanned baseline (restart)", BEFORE: "before the program"}


def _month_index(day: dt.date, first: dt.date) -> int:
    return (day.year - first.year) * 12 + day.month - first.month


def _box_text(outcome: ReleaseOutcome) -> str:
    if outcome.kind == HOTPATCH:
        return f"{outcome.name}\nhotpatch {outcome.sequence}"
    if outcome.kind == UNPLANNED:
        blocking = sorted({Path(r["module"]).name for r in outcome.reasons})
        named = blocking[0] if len(blocking) == 1 else f"{len(blocking)} modules"
        return f"{outcome.name}\nunplanned\n{named[:16]}"
    if outcome.kind == PLANNED:
        return f"{outcome.name}\nbaseline"
    return outcome.name


def draw_calendar(result: TrainResult, path: str | Path) -> Path:
    """Draw the train's calendar into ``path`` (.svg or .png); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    path = Path(path)
    outcomes = result.releases
    first = outcomes[0].date.replace(day=1)
    months = _month_index(outcomes[-1].date, first) + 1
    per_month: dict[int, list[ReleaseOutcome]] = {}
    for outcome in outcomes:
        per_month.setdefault(_month_index(outcome.date, first), []).append(outcome)

    figure = Figure(figsize=(max(6.0, 1.25 * months + 1.5), 4.2), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(1.4, 1.0), sharex=True)
    for month in range(months):
        label_day = dt.date(first.year + (first.month - 1 + month) // 12, (first.month - 1 + month) % 12 + 1, 1)
        top.text(month + 0.5, 1.08, label_day.strftime("%b\n%Y"), ha="center", va="bottom", fontsize=8)
        for slot, outcome in enumerate(per_month.get(month, [])):
            width = 0.9 / len(per_month[month])
            x = month + 0.05 + slot * width
            unplanned = outcome.kind == UNPLANNED
            top.add_patch(Rectangle((x, 0.1), width - 0.02, 0.8, facecolor=COLOURS[outcome.kind],
                                    edgecolor="#742a2a" if unplanned else "white", linewidth=2 if unplanned else 1,
                                    hatch="//" if unplanned else None))
            top.text(x + (width - 0.02) / 2, 0.5, _box_text(outcome), ha="center", va="center", fontsize=7,
                     color="white", fontweight="bold" if outcome.kind != HOTPATCH else "normal")
            if outcome.kind in (PLANNED, UNPLANNED):
                top.text(x + (width - 0.02) / 2, 0.02, "restart", ha="center", va="bottom", fontsize=6)
            bottom.bar(x + (width - 0.02) / 2, outcome.package_bytes / 1024, width=width * 0.8,
                       color=COLOURS[outcome.kind])
    figures = result.figures
    top.set_xlim(0, months)
    top.set_ylim(0, 1.35)
    top.axis("off")
    top.set_title(f"{result.manifest.name}: {figures['restarts']} restarts for {figures['releases']} releases "
                  f"({figures['restarts_unplanned']} unplanned)\nwithout hotpatches fixes would have waited "
                  f"{figures['fix_wait_days_total']} days in all for a restart", fontsize=9)
    top.legend(handles=[Patch(facecolor=COLOURS[k], label=LABELS[k]) for k in (PLANNED, HOTPATCH, UNPLANNED)],
               loc="upper center", bbox_to_anchor=(0.5, -0.02), ncols=3, fontsize=7, frameon=False)
    if not any(o.package_bytes for o in outcomes):
        bottom.set_ylim(0, 1)
        bottom.text(months / 2, 0.5, "no hotpatch packages", ha="center", va="center", fontsize=8, color="#4a5568")
    bottom.set_ylabel("package KiB", fontsize=8)
    bottom.set_xticks([])
    bottom.tick_params(labelsize=7)
    bottom.spines[["top", "right"]].set_visible(False)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("svg", "png"):
        raise ValueError(f"{path}: the calendar is drawn as .svg or .png")
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "hotpatch", "svg.fonttype": "none"}):
        # no dates in the file: the same train draws the same bytes
        figure.savefig(buffer, format=suffix, metadata={"Date": None} if suffix == "svg" else {"Software": None})
    write_bytes(path, buffer.getvalue())
    return path
