"""``hotpatch report``: one self-contained HTML page from a diff, build, batch or train, or from two images.

Exit codes: 0 written, 2 bad input (unreadable or unknown document, images that
are not the ones a diff document names).
"""

from __future__ import annotations

import argparse
from typing import Any

from .html import write
from .sources import load_page

__all__ = ["add_report_command"]


def add_report_command(commands: Any) -> None:
    report = commands.add_parser("report", help="a self-contained HTML page of a diff, build, batch or train")
    report.add_argument("source", nargs="?",
                        help="diff --json or build --json output, a .hpk, batch results (folder or .jsonl), "
                             "a train document")
    report.add_argument("--baseline", help="the baseline image (for side-by-side disassembly)")
    report.add_argument("--patched", help="the patched image")
    report.add_argument("--package", help="the package file (every fixup and the new code)")
    report.add_argument("-o", "--output", required=True, help="the HTML file to write")
    report.set_defaults(run=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    page = load_page(args.source, baseline=args.baseline, patched=args.patched, package=args.package)
    path = write(page, args.output)
    print(f"wrote {path}: {page.title}")
    return 0
