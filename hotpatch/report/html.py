"""Rendering the page: one self-contained HTML document from the Jinja2 templates in ``templates/``.

Everything the page needs is inline (CSS, the script, SVG plots, the rows of
each function as JSON), so it opens without a network. Values reach the HTML
only through the templates' autoescaping; the inline JSON is escaped so that
no ``</script>`` can end it early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from .. import __version__
from ..verdict.rules import REASON_KINDS
from .batchpage import BatchPage
from .diffpage import DiffPage
from .highlight import css

__all__ = ["ReportPage", "render", "write"]


@dataclass
class ReportPage:
    title: str
    diff: DiffPage | None = None
    package: dict[str, Any] | None = None
    batch: BatchPage | None = None
    train: dict[str, Any] | None = None


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


def _script_json(value: Any) -> str:
    """JSON safe inside ``<script type="application/json">``."""
    text = orjson.dumps(value).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_environment: Environment | None = None


def _env() -> Environment:
    global _environment
    if _environment is None:
        _environment = Environment(loader=PackageLoader("hotpatch.report", "templates"),
                                   autoescape=select_autoescape(["html", "j2"], default_for_string=True),
                                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        _environment.filters["hex"] = _hex
    return _environment


def render(page: ReportPage) -> str:
    details = page.diff.details if page.diff is not None else {}
    return _env().get_template("report.html.j2").render(
        title=page.title, version=__version__, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        diff=page.diff, package=page.package, batch=page.batch, train=page.train,
        details_json=[(anchor, _script_json(rows)) for anchor, rows in details.items()], asm_css=css(".asm"),
        reason_kinds=REASON_KINDS)


def write(page: ReportPage, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(page), encoding="utf-8")
    return out
