"""From what the user has to a ``ReportPage``: a diff or build JSON, a package, a batch, a train, or two images.

The JSON documents the CLI writes hold no disassembly; given the images too
(``--baseline``/``--patched``, or the paths a diff document names when they
still exist), the diff is computed again through ``hotpatch.diff.compare.diff`` and
checked against the document's identities before anything is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from ..errors import HotpatchError, ReportError
from ..package.format import load
from .html import ReportPage

__all__ = ["load_page"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ReportError(f"{path} is not a hotpatch JSON document")
    return document


def load_page(source: str | Path | None, baseline: str | None = None, patched: str | None = None,
              package: str | None = None) -> ReportPage:
    """The page for ``source`` (a file or a batch folder), or for a fresh diff of ``baseline``/``patched``."""
    if source is None:
        if not (baseline and patched):
            raise ReportError("give a document to report on, or --baseline and --patched")
        return _diff_report(baseline, patched, None, package)
    path = Path(source)
    if path.is_dir() or path.suffix == ".jsonl":
        return _batch_report(path)
    if path.suffix == ".hpk":
        return _diff_report(baseline, patched, None, str(path)) if baseline and patched else \
            ReportPage(f"package {path.name}", package=_package_section(str(path), None))
    document = _read_json(path)
    schema = str(document.get("schema", ""))
    if schema.startswith("hotpatch.diff/"):
        return _diff_report(baseline or _existing(document["baseline"]["path"]),
                            patched or _existing(document["patched"]["path"]), document, package)
    if schema.startswith("hotpatch.build/"):
        written = package or (document.get("written") if document.get("written") and
                              os.path.exists(document["written"]) else None)
        if baseline and patched:
            return _diff_report(baseline, patched, None, written)
        return ReportPage(f"build of {written or 'a package'}", package=_package_section(written, document))
    if schema.startswith("hotpatch.batch.summary/"):
        return _batch_report(path.parent)
    if schema.startswith("hotpatch.train/"):
        from .trainpage import train_page

        train = train_page(document, path.parent)
        return ReportPage(f"release train {train['name']}", train=train)
    raise ReportError(f"{path}: not a diff, build, batch or train document (schema {schema or 'missing'})")


def _existing(path: str | None) -> str | None:
    return path if path and os.path.exists(path) else None


def _diff_report(baseline: str | None, patched: str | None, document: dict[str, Any] | None,
                 package: str | None) -> ReportPage:
    from .diffpage import diff_page, diff_page_from_json

    if baseline is None or patched is None:
        assert document is not None
        page = diff_page_from_json(document)
        title = f"{Path(page.baseline['path'] or 'baseline').name} → {Path(page.patched['path'] or 'patched').name}"
        return ReportPage(title, diff=page, package=_package_section(package, None) if package else None)
    from ..diff.compare import diff
    from ..verdict.rules import decide

    allow = bool(document and document["verdict"].get("overridden"))
    result = diff(baseline, patched)
    verdict = decide(result, allow_layout_change=allow)
    if document is not None:
        for side, table in (("baseline", result.baseline), ("patched", result.patched)):
            if document[side]["identity"] != table.image.identity.to_json():
                raise ReportError(f"{side} {table.image.path} is not the image the diff document was made from")
    page = diff_page(result, verdict)
    title = f"{result.baseline.image.name} → {result.patched.image.name}"
    section = _package_section(package, None) if package else None
    if section is not None:
        anchors = {f["name"]: f["anchor"] for f in page.functions}
        for site in section["document"]["sites"]:
            site["anchor"] = anchors.get(site["function"])
    return ReportPage(title, diff=page, package=section)


def _package_section(package: str | None, build: dict[str, Any] | None) -> dict[str, Any]:
    """Sites, strategies, blobs, fixups (every one when the package file is at hand) and the new code."""
    from ..package.report import disassemble_blob, package_json
    from .disasm import Segment
    from .highlight import tokens

    section: dict[str, Any] = {"document": None, "code": [], "bytes": None,
                               "verdict": (build or {}).get("verdict"), "reasons": []}
    if build is not None:
        section["document"] = build.get("package")
        section["bytes"] = build.get("bytes")
        section["reasons"] = [{**r, "anchor": None} for r in build.get("reasons") or build["verdict"]["reasons"]]
    if package is None:
        return section
    try:
        loaded = load(package)
    except HotpatchError as exc:
        raise ReportError(f"cannot report on package {package}: {exc}") from None
    section["document"] = package_json(loaded, with_fixups=True)
    section["bytes"] = os.path.getsize(package)
    for site in section["document"]["sites"]:
        lines = []
        for line in disassemble_blob(loaded, site["target_blob"], limit=200):
            offset, _, text = line.partition("  ")
            segments: list[Segment] = [(text, None)]
            lines.append({"offset": offset, "tokens": tokens(segments, {})})
        section["code"].append({"function": site["function"], "blob": site["target_blob"], "lines": lines})
    return section


def _batch_report(path: Path) -> ReportPage:
    from ..batch.store import read_results
    from .batchpage import batch_page

    results = path / "results.jsonl" if path.is_dir() else path
    summary_path = results.parent / "summary.json"
    run = _read_json(summary_path) if summary_path.exists() else None
    records = read_results(results)
    if not records:
        raise ReportError(f"{results} holds no job records")
    return ReportPage(f"batch of {len(records)} jobs ({results.parent.name})", batch=batch_page(records, run))
