"""What the page shows of a batch: the summary, plots (matplotlib SVG, inline), every job.

Plots: verdicts across jobs, the reasons histogram, and each job's time
against the size of its images.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..batch.summary import summarize

__all__ = ["BatchPage", "batch_page"]

_COLOURS = {"HOTPATCH": "#4caf63", "NEW_BASELINE": "#d9534f", "failed": "#8a91a0"}


@dataclass
class BatchPage:
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    plots: list[dict[str, str]]


def batch_page(records: list[dict[str, Any]], run: dict[str, Any] | None = None) -> BatchPage:
    """The page of a batch's job records; ``run`` carries the facts of the run (engine, wall time)."""
    facts = {k: v for k, v in (run or {}).items()
             if k in ("engine", "workers", "wall_seconds", "jobs_per_minute", "ran", "skipped")}
    summary = summarize(records, **facts)
    rows = []
    for record in records:
        sizes = record.get("sizes") or {}
        megabytes = sum(v for k, v in sizes.items() if k in ("baseline", "patched") and v) / 2**20
        rows.append({**record, "megabytes": megabytes})
    return BatchPage(summary, rows, _plots(rows))


def _svg(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside HTML


def _plots(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # stable output for the same input, text kept as text (smaller, selectable)
    with matplotlib.rc_context({"svg.hashsalt": "hotpatch", "svg.fonttype": "none", "font.size": 9}):
        plots = []
        outcome = Counter(r.get("verdict") or "failed" for r in records)
        figure, axes = plt.subplots(figsize=(4.2, 2.4))
        names = [k for k in ("HOTPATCH", "NEW_BASELINE", "failed") if outcome.get(k)]
        axes.barh(names, [outcome[k] for k in names], color=[_COLOURS[k] for k in names])
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("jobs")
        axes.set_title("verdicts across jobs")
        axes.invert_yaxis()
        plots.append({"name": "verdicts", "svg": _svg(figure)})

        reasons: Counter[str] = Counter()
        for record in records:
            reasons.update((record.get("reason_counts") or {}).keys())
        figure, axes = plt.subplots(figsize=(4.8, 2.4))
        if reasons:
            kinds = [k for k, _ in reasons.most_common()]
            axes.barh(kinds, [reasons[k] for k in kinds], color="#d9534f")
            axes.invert_yaxis()
        else:
            axes.text(0.5, 0.5, "no blocking reasons", ha="center", va="center", transform=axes.transAxes)
            axes.set_yticks([])
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("jobs with the reason")
        axes.set_title("reasons across jobs")
        plots.append({"name": "reasons", "svg": _svg(figure)})

        figure, axes = plt.subplots(figsize=(4.8, 3.0))
        for key, colour in _COLOURS.items():
            points = [(r["megabytes"], r["timings"]["total"]) for r in records
                      if (r.get("verdict") or "failed") == key and r.get("timings", {}).get("total")]
            if points:
                xs, ys = zip(*points)
                axes.scatter(xs, ys, s=14, color=colour, label=key)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("image size, baseline + patched (MB)")
        axes.set_ylabel("job time (s)")
        axes.set_title("time against image size")
        if axes.collections:
            axes.legend(loc="upper left", fontsize=8)
        plots.append({"name": "time-vs-size", "svg": _svg(figure)})
    return plots
