"""What the page shows of a diff: the verdict, reasons linked to their items, functions, data changes.

From a ``DiffResult`` (with the images, so changed functions get their side-by-side
disassembly) or from a ``hotpatch diff --json`` document alone (then the
functions are listed without disassembly, and the page says so).

Large diffs stay usable in a browser: only changed, added and removed functions
are listed (unchanged ones are counted), each as a closed ``<details>``, and the
rows of a function are built by the page's script from inline JSON when it is
opened. The rows are bounded per function and in total; the page says where
rows were left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..diff.result import DiffResult
from ..verdict.rules import REASON_KINDS, Verdict, diff_document
from .disasm import Disassembler, Row
from .highlight import tokens

__all__ = ["DiffPage", "diff_page", "diff_page_from_json"]

#: rows shown per function, and over the whole page (the rest is counted, not drawn)
ROWS_PER_FUNCTION = 300
ROWS_PER_PAGE = 40_000
#: rows of a function looked at (longer functions are cut there), and unchanged rows kept around each change
SCANNED_ROWS = 1200
CONTEXT = 3
_ORDER = {"changed": 0, "added": 1, "removed": 2}


@dataclass
class DiffPage:
    baseline: dict[str, Any]
    patched: dict[str, Any]
    summary: dict[str, int]
    verdict: dict[str, Any]
    reasons: list[dict[str, Any]]
    overridden: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    data: list[dict[str, Any]]
    #: anchor id -> {"rows": [...], "total": n} for the page's script
    details: dict[str, Any] = field(default_factory=dict)
    has_disassembly: bool = True
    rows_left_out: int = 0


def _side(function: Any) -> dict[str, Any] | None:
    return None if function is None else {"name": function.label, "rva": function.rva, "size": function.size}


def _reason_rows(reasons: list[dict[str, Any]], anchors: dict[str, str]) -> list[dict[str, Any]]:
    return [{**r, "anchor": anchors.get(r["subject"]), "about": REASON_KINDS.get(r["kind"], "")} for r in reasons]


def _data_rows(data: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Data changes with their anchors, and the reason subjects that name each one."""
    rows, anchors = [], {}
    for index, change in enumerate(data):
        anchor = f"data-{index}"
        rows.append({**change, "anchor": anchor})
        rva = change["baseline_rva"] if change["baseline_rva"] is not None else change["patched_rva"]
        where = f"{change['section']}:" if change["section"] else ""
        anchors.setdefault(f"{where}{rva:#x}" if rva is not None else change["kind"], anchor)
        anchors.setdefault(change["detail"], anchor)  # export changes are named by their detail
    return rows, anchors


def diff_page(result: DiffResult, verdict: Verdict, rows_per_function: int = ROWS_PER_FUNCTION,
              rows_per_page: int = ROWS_PER_PAGE) -> DiffPage:
    document = diff_document(result, verdict)
    entries = [e for e in result.functions if e.status != "unchanged"]
    page = _page(document, entries_json=[_entry_json(e) for e in entries])
    disassembler = Disassembler(result)
    function_anchors = {}
    for row, entry in zip(page.functions, entries):
        for side in (entry.baseline, entry.patched):
            if side is not None:
                function_anchors.setdefault(str(side.rva), row["anchor"])
    # a call to a patched function is named by the patched rva; link it to the same row
    for baseline_rva, patched_rva in result.function_map.items():
        if str(baseline_rva) in function_anchors:
            function_anchors.setdefault(str(patched_rva), function_anchors[str(baseline_rva)])
    links = {key: f"#{anchor}" for key, anchor in function_anchors.items()}
    budget = rows_per_page
    for row, entry in sorted(zip(page.functions, entries), key=lambda pair: pair[0]["rank"]):
        if budget <= 0:
            page.rows_left_out += 1
            row["left_out"] = True
            continue
        rows, total = disassembler.rows(entry, SCANNED_ROWS)
        row["changed_rows"] = sum(r.state != "same" for r in rows)
        shown = _fold_unchanged(rows)[:min(rows_per_function, budget)]
        budget -= len(shown)
        page.details[row["anchor"]] = {
            "rows": [[r, 0, 0] if isinstance(r, int) else [r.state, _cell(r.left, links), _cell(r.right, links)]
                     for r in shown],
            "total": total, "shown": sum(r if isinstance(r, int) else 1 for r in shown)}
    page.functions.sort(key=lambda f: f["rank"])
    return page


def _fold_unchanged(rows: list[Row]) -> list[Row | int]:
    """Rows with each long run of unchanged ones cut down to its context: an int stands for the rows left out."""
    out: list[Row | int] = []
    run: list[Row] = []

    def flush(last: bool) -> None:
        head = run[:CONTEXT] if out else []
        tail = run[-CONTEXT:] if not last else []
        if len(run) > len(head) + len(tail) + 1:
            out.extend(head)
            out.append(len(run) - len(head) - len(tail))
            out.extend(tail)
        else:
            out.extend(run)
        run.clear()

    for row in rows:
        if row.state == "same":
            run.append(row)
        else:
            flush(False)
            out.append(row)
    flush(True)
    return out


def _cell(cell: Any, links: dict[str, str]) -> list[Any] | None:
    if cell is None:
        return None
    offset, segments = cell
    return [f"+{offset:x}", tokens(segments, links)]


def _entry_json(entry: Any) -> dict[str, Any]:
    return {"status": entry.status, "baseline": _side(entry.baseline), "patched": _side(entry.patched),
            "match": entry.match, "similarity": entry.similarity, "changes": list(entry.changes)}


def diff_page_from_json(document: dict[str, Any]) -> DiffPage:
    """The page of a ``hotpatch diff --json`` document when the images are not at hand."""
    page = _page(document, [f for f in document["functions"] if f["status"] != "unchanged"])
    page.has_disassembly = False
    page.functions.sort(key=lambda f: f["rank"])
    return page


def _page(document: dict[str, Any], entries_json: list[dict[str, Any]]) -> DiffPage:
    verdict = document["verdict"]
    subjects = {r["subject"] for r in verdict["reasons"] + verdict.get("overridden", [])}
    functions, anchors = [], {}
    for index, entry in enumerate(entries_json):
        anchor = f"fn-{index}"
        names = {side["name"] for side in (entry["baseline"], entry["patched"]) if side}
        for name in names:
            anchors.setdefault(name, anchor)
        blocking = bool(names & subjects)
        size = max((side["size"] for side in (entry["baseline"], entry["patched"]) if side), default=0)
        name = (entry["patched"] or entry["baseline"])["name"]
        functions.append({**entry, "name": name, "anchor": anchor, "blocking": blocking,
                          "rank": (not blocking, _ORDER[entry["status"]], -size)})
    data, data_anchors = _data_rows(document["data"])
    for subject, anchor in data_anchors.items():
        anchors.setdefault(subject, anchor)
    return DiffPage(baseline=document["baseline"], patched=document["patched"], summary=document["summary"],
                    verdict=verdict, reasons=_reason_rows(verdict["reasons"], anchors),
                    overridden=_reason_rows(verdict.get("overridden", []), anchors), functions=functions, data=data)
