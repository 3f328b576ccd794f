"""``hotpatch train MANIFEST -o OUT``: run a release train; a table for people, JSON for pipelines.

Exit codes: 0 the train ran (unplanned baselines are a result, not a
failure); 2 bad input (the manifest, a module file, the key, the cache
directory), with one line naming what and nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_train_command", "cmd_train"]

_KIND_STYLE = {"planned_baseline": "bold blue", "hotpatch": "green", "unplanned_baseline": "bold red",
               "before_program": "dim"}


def add_train_command(subparsers: Any) -> None:
    train = subparsers.add_parser("train", help="run a release train: baselines, cumulative hotpatches, figures")
    train.add_argument("manifest", help="the train manifest (TOML, docs/TRAIN.md)")
    train.add_argument("-o", "--out", required=True, help="output directory (resumed if it holds a previous run)")
    train.add_argument("--sign-key", metavar="KEY", help="Ed25519 private key (PEM) to sign the packages with")
    train.add_argument("--no-cache", action="store_true", help="analyse every image afresh")
    train.add_argument("--cache-dir", help="analysis cache directory (default: ~/.cache/hotpatch/analysis)")
    train.add_argument("--cache-max-mb", type=int, default=2048, help="size bound of the analysis cache")
    train.add_argument("--calendar", default="calendar.svg",
                       help="file name of the calendar picture in OUT (.svg or .png; default calendar.svg)")
    train.add_argument("--json", action="store_true", help="print train.json instead of the table")
    train.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..cache import AnalysisCache
    from .manifest import load_manifest
    from .run import run_train

    if Path(args.calendar).suffix.lower() not in (".svg", ".png") or Path(args.calendar).name != args.calendar:
        return _bad_argument(f"--calendar {args.calendar!r}: a file name ending in .svg or .png is expected")
    if args.cache_max_mb <= 0:
        return _bad_argument("--cache-max-mb must be positive")
    manifest = load_manifest(args.manifest)
    cache = AnalysisCache(args.cache_dir, max_bytes=args.cache_max_mb << 20, enabled=not args.no_cache)
    from rich.console import Console

    console = Console(stderr=True)
    with _RichProgress(console, len(manifest.releases), enabled=console.is_terminal) as progress:
        result = run_train(manifest, args.out, sign_key=args.sign_key, cache=cache, progress=progress,
                           calendar=args.calendar)
    if args.json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    print_train(result)
    return 0


def _bad_argument(message: str) -> int:
    print(f"hotpatch: error: {message}", file=sys.stderr)
    return 2


def print_train(result: Any) -> None:
    """The train as a rich table, then its figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("release", "date", "kind", "baseline", "seq", "changed", "packages", "reasons",
                  title=f"train {result.manifest.name}")
    for outcome in result.releases:
        changed = [m for m in outcome.modules if m.status in ("changed", "added")]
        packages = [m for m in outcome.modules if m.package]
        reasons = sorted({f"{Path(r['module']).name}: {r['kind']}" for r in outcome.reasons})
        table.add_row(outcome.name, outcome.date.isoformat(),
                      f"[{_KIND_STYLE[outcome.kind]}]{outcome.kind}[/]", outcome.baseline or "-",
                      str(outcome.sequence) if outcome.sequence else "-", str(len(changed)),
                      f"{len(packages)} / {outcome.package_bytes:,} B" if packages else "-",
                      "\n".join(reasons[:4]) + (f"\n(+{len(reasons) - 4} more)" if len(reasons) > 4 else ""))
    console.print(table)
    f = result.figures
    console.print(f"restarts: {f['restarts']} ({f['restarts_planned']} planned, {f['restarts_unplanned']} unplanned) "
                  f"instead of {f['restarts_every_release']}, one per release; {f['hotpatch_months']} hotpatch months")
    console.print(f"days fixes would have waited for a restart without hotpatches: total {f['fix_wait_days_total']}, "
                  f"mean {f['fix_wait_days_mean']}, max {f['fix_wait_days_max']} (with the program: 0)")
    for cycle in f["cycles"]:
        if cycle["hotpatches"]:
            sizes = " -> ".join(f"{b:,}" for b in cycle["package_bytes"])
            console.print(f"cycle {cycle['baseline']}: package bytes {sizes}")
    stats = result.cache
    console.print(f"analyses: {stats['analyses']} fresh, {stats['hits']} from the cache; written to {result.out_dir}")


class _RichProgress:
    """Bars per release and per module of the release (only on a terminal)."""

    def __init__(self, console: Any, releases: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = releases
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self) -> _RichProgress:
        if self.enabled:
            self.bars.start()
            self.releases = self.bars.add_task("releases", total=self.total)
            self.modules = self.bars.add_task("modules", total=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bars.stop()

    def release(self, index: int, release: Any, modules: int, resumed: bool) -> None:
        if self.enabled:
            self.bars.update(self.releases, completed=index,
                             description=f"release {release.name}" + (" (resumed)" if resumed else ""))
            self.bars.reset(self.modules, total=0 if resumed else modules, description="modules")

    def module(self, release: Any, module: str) -> None:
        if self.enabled:
            self.bars.update(self.modules, description=f"  {module}")
            self.bars.advance(self.modules)
