"""The ``hotpatch`` command line.

Every subcommand prints a human view with rich, or JSON with ``--json``.
Exit codes: 0 success, 2 bad input (any ``HotpatchError`` of that family);
errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .. import __version__
from ..collector import gc_paused
from ..errors import HotpatchError
from ..jsonio import dumps_streamed, print_json, write_json

if TYPE_CHECKING:
    from ..diff.result import DiffResult
    from ..verdict.rules import Verdict

__all__ = ["main"]


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


_print_json = print_json


def cmd_info(args: argparse.Namespace) -> int:
    from ..analysis.functions import discover
    from ..pe.image import Image
    from ..report import image_info

    image = Image.load_fast(args.pe)  # the same model as Image.load, without LIEF's import
    table = discover(image)
    info = image_info(image, table)
    if args.json:
        _print_json(info)
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    identity = info["identity"]
    entry = f"{image.entry_rva:#x}" if image.entry_rva is not None else "-"
    console.print(f"[bold]{escape(image.name)}[/bold]  {identity['machine']}  image base {image.image_base:#x}"
                  f"  entry {entry}")
    console.print(f"TimeDateStamp {identity['timedatestamp']:#x}  SizeOfImage {identity['size_of_image']:#x}"
                  f"  CheckSum {identity['checksum']:#x}")
    console.print(f"code SHA-256 {identity['code_sha256']}")
    sections = Table("section", "rva", "virtual size", "raw size", "perm", title="sections")
    for section in info["sections"]:
        sections.add_row(escape(section["name"]), f"{section['rva']:#x}", f"{section['virtual_size']:#x}",
                         f"{section['raw_size']:#x}", section["permissions"])
    console.print(sections)
    counts = info["counts"]
    console.print(f"functions {counts['functions']} ("
                  + ", ".join(f"{k} {v}" for k, v in counts["functions_by_source"].items()) + ")")
    console.print(f"imports {counts['imports']}  exports {counts['exports']}  relocations {counts['relocations']}"
                  f"  symbols {counts['symbols']}  instructions {counts['instructions']}")
    console.print("coverage " + ", ".join(f"{name} {share:.2%}" for name, share in info["coverage"].items()))
    return 0


def cmd_functions(args: argparse.Namespace) -> int:
    from ..analysis.functions import discover
    from ..pe.image import Image
    from ..report import function_rows

    image = Image.load_fast(args.pe)
    rows = function_rows(discover(image))
    if args.json:
        _print_json({"schema": "hotpatch.functions/1", "path": args.pe, "functions": rows})
        return 0
    from .columns import write_columns

    write_columns(("name", "rva", "size", "sources", "pad before", "pad after", "fingerprint"),
                  [(row["name"] or "-", f"{row['rva']:#x}", str(row["size"]), ",".join(row["sources"]),
                    str(row["pad_before"]), str(row["pad_after"]), row["fingerprint"]) for row in rows])
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..diff.compare import diff
    from ..verdict.rules import decide, diff_document

    console = Console(stderr=True)
    with console.status("diffing...", spinner="dots") if console.is_terminal else _nullcontext():
        result = diff(args.baseline, args.patched)
        verdict = decide(result, allow_layout_change=args.allow_layout_change, strict_exports=args.strict_exports)
    # the functions' entries are encoded a chunk at a time: the whole list (tens of thousands of dicts) and
    # its text are never in memory at once
    document = diff_document(result, verdict, functions=False)
    if args.out:
        write_json(args.out, document, dumps_streamed(document, "functions", result.function_entries()))
    if args.json:
        _print_json(document, pieces=dumps_streamed(document, "functions", result.function_entries()))
        return 0
    _print_diff(result, verdict)
    return 0


def _print_diff(result: DiffResult, verdict: Verdict) -> None:
    from rich.console import Console
    from rich.markup import escape

    from .columns import write_columns

    console = Console()
    summary = result.summary()
    names = escape(result.baseline.image.name), escape(result.patched.image.name)
    console.print(f"[bold]{names[0]}[/bold] -> [bold]{names[1]}[/bold]: "
                  + ", ".join(f"{v} {k}" for k, v in summary.items()))
    rows = [(entry.status, entry.name, f"{entry.baseline.rva:#x}" if entry.baseline else "-",
             f"{entry.patched.rva:#x}" if entry.patched else "-",
             (entry.match or "-") + (f" {entry.similarity:.2f}" if entry.similarity else ""), ",".join(entry.changes))
            for entry in result.functions if entry.status != "unchanged"]
    if rows:
        console.file.flush()
        write_columns(("status", "function", "baseline rva", "patched rva", "match", "why"), rows)
    for change in result.data:
        console.print(f"data: {change.kind} {escape(str(change.detail))}")
    colour = "green" if verdict.hotpatchable else "red"
    console.print(f"verdict: [bold {colour}]{verdict.status}[/bold {colour}]")
    for reason in verdict.reasons:
        console.print(f"  - {reason.kind}: {escape(reason.message)}")
    for reason in verdict.overridden:
        console.print(f"  - overridden {reason.kind}: {escape(reason.message)}")
    for note in verdict.notes:
        console.print(f"  - note {note.kind}: {escape(note.message)}")


def cmd_build(args: argparse.Namespace) -> int:
    from ..diff.compare import diff
    from ..errors import NotHotpatchableError
    from ..package.builder import build_package
    from ..package.format import dumps, loads, package_id_of
    from ..package.report import package_json
    from ..package.signing import load_private_key
    from ..verdict.rules import decide

    sign_key = load_private_key(args.sign_key) if args.sign_key else None
    result = diff(args.baseline, args.patched)
    verdict = decide(result, allow_layout_change=args.allow_layout_change, strict_exports=args.strict_exports)
    try:
        package = build_package(result, verdict=verdict, sequence=args.sequence, description=args.description or "",
                                cve_ids=args.cve or (), baseline_id=args.baseline_id)
    except NotHotpatchableError as exc:
        if args.json:
            _print_json({"schema": "hotpatch.build/1", "written": None, "verdict": verdict.to_json(),
                         "reasons": [r.to_json() for r in exc.reasons]})
        else:
            print(f"hotpatch: {exc}; nothing written", file=sys.stderr)
            for reason in exc.reasons:
                print(f"  - {reason.kind}: {reason.message}", file=sys.stderr)
        return exc.exit_code
    data = dumps(package, sign_key)
    with open(args.output, "wb") as handle:
        handle.write(data)
    if args.json:

        _print_json({"schema": "hotpatch.build/1", "written": args.output, "bytes": len(data),
                     "verdict": verdict.to_json(), "package": package_json(loads(data))})
    else:
        print(f"wrote {args.output}: {len(package.sites)} sites, {len(package.blobs)} blobs, "
              f"{len(package.fixups)} fixups, {len(data)} bytes, package {package_id_of(package)}"
              + (" (signed)" if sign_key else " (unsigned)"))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from ..package.signing import write_keypair

    public = write_keypair(args.private, args.public)
    if args.json:
        _print_json({"private": args.private, "public": args.public, "public_key": public})
    else:
        print(f"wrote {args.private} (keep it secret) and {args.public}: public key {public}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..package.format import load
    from ..package.report import disassemble_blob, package_json
    from ..package.trust import TrustStore, signer_json

    package = load(args.package)
    document = package_json(package, with_fixups=args.fixups)
    document["signature"].update(signer_json(package, TrustStore.default()))
    if args.json:
        _print_json(document)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    target = document["target"]
    console.print(f"[bold]package {document['package_id']}[/bold] for {target['module']} "
                  f"(TimeDateStamp {target['timedatestamp']:#x}, SizeOfImage {target['size_of_image']:#x}, "
                  f"CheckSum {target['checksum']:#x})")
    signature = document["signature"]
    signer = (f", key {signature['key_id']} ({'trusted' if signature['trusted'] else 'NOT trusted'})"
              if signature["key_id"] else "")
    console.print(f"baseline {document['baseline_id']} sequence {document['sequence']}; "
                  f"signature {signature['state']}{signer}")
    meta = document["metadata"]
    if meta["description"] or meta["cve_ids"]:
        console.print(f"{meta['description']} {' '.join(meta['cve_ids'])}".strip())
    sites = Table("function", "rva", "strategy", "fallbacks", "blob", title="patch sites")
    for site in document["sites"]:
        sites.add_row(site["function"], f"{site['rva']:#x}", site["strategy"], ",".join(site["fallbacks"]),
                      str(site["target_blob"]))
    console.print(sites)
    console.print("blobs: " + ", ".join(f"#{b['index']} {b['kind']} {b['size']}" for b in document["blobs"]))
    console.print("fixups: " + ", ".join(f"{k} {v}" for k, v in document["fixups_by_kind"].items()))
    if document["imports"]:
        console.print("imports: " + ", ".join(document["imports"]))
    for site in document["sites"]:
        console.print(f"[bold]{site['function']}[/bold] new code (blob {site['target_blob']}):")
        for line in disassemble_blob(package, site["target_blob"], limit=args.lines):
            console.print(f"  {line}", markup=False, highlight=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..errors import EmulationError, VerifyError
    from ..package.format import load
    from ..verify.calls import load_inputs
    from ..verify.check import verify

    package = load(args.package)
    calls = load_inputs(args.inputs) if args.inputs else None
    try:
        report = verify(package, args.baseline, args.patched, calls, companions=args.companions)
    except EmulationError as exc:
        raise VerifyError(f"the emulator could not run the calls: {exc}") from None
    if args.json:
        _print_json(report.to_json())
    else:
        for spec, mine, theirs in zip(report.calls, report.patched_results, report.expected_results):
            mark = "ok  " if mine.value == theirs.value else "DIFF"
            print(f"{mark} {spec}: baseline + package {mine.value}, patched {theirs.value}")
        if report.agrees:
            print(f"package {report.package_id}: all {len(report.calls)} calls agree "
                  f"(baseline mapped at {report.baseline_base:#x}, not its preferred base)")
        else:
            print(f"package {report.package_id}: {report.difference}")
    return 0 if report.agrees else 1


# commands defined in this module: running one (or --version) needs none of the command modules below
_OWN_COMMANDS = frozenset({"info", "functions", "diff", "build", "keygen", "inspect", "verify"})


def _add_verdict_policy(parser: argparse.ArgumentParser) -> None:
    """The options that change what decide() blocks on (diff and build take the same)."""
    parser.add_argument("--allow-layout-change", action="store_true",
                        help="do not block on data-layout evidence (the override is recorded in the verdict)")
    parser.add_argument("--strict-exports", action="store_true",
                        help="a new export blocks too (by default it is a note: no loaded code can use it)")


def build_parser(*, own_only: bool = False) -> argparse.ArgumentParser:
    """The full parser; with ``own_only``, only this module's commands (no apply, rollout, ... imports)."""
    parser = argparse.ArgumentParser(prog="hotpatch", description="Rebootless updates for x64 Windows PE images.")
    parser.add_argument("--version", action="version", version=f"hotpatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="identity, sections, counts and coverage of a PE image")
    info.add_argument("pe")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    functions = commands.add_parser("functions", help="every discovered function with its fingerprint")
    functions.add_argument("pe")
    functions.add_argument("--json", action="store_true")
    functions.set_defaults(run=cmd_functions)

    diff = commands.add_parser("diff", help="function-by-function diff and the hotpatch verdict")
    diff.add_argument("baseline")
    diff.add_argument("patched")
    diff.add_argument("--json", action="store_true")
    diff.add_argument("--out", help="also write the JSON document to this file")
    _add_verdict_policy(diff)
    diff.set_defaults(run=cmd_diff)

    build = commands.add_parser("build", help="build a patch package (exit 3 when the update needs a new baseline)")
    build.add_argument("baseline")
    build.add_argument("patched")
    build.add_argument("-o", "--output", required=True)
    build.add_argument("--sequence", type=int, default=1)
    build.add_argument("--baseline-id", help="identifier of the baseline (default: from its code hash)")
    build.add_argument("--description")
    build.add_argument("--cve", action="append", metavar="ID")
    build.add_argument("--sign-key", metavar="KEY", help="Ed25519 private key (PEM) to sign with")
    _add_verdict_policy(build)
    build.add_argument("--json", action="store_true")
    build.set_defaults(run=cmd_build)

    keygen = commands.add_parser("keygen", help="write an Ed25519 key pair for signing packages")
    keygen.add_argument("private")
    keygen.add_argument("public")
    keygen.add_argument("--json", action="store_true")
    keygen.set_defaults(run=cmd_keygen)

    inspect = commands.add_parser("inspect", help="show what a package holds")
    inspect.add_argument("package")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--fixups", action="store_true", help="list every fixup (JSON)")
    inspect.add_argument("--lines", type=int, default=24, help="instructions shown per new function")
    inspect.set_defaults(run=cmd_inspect)

    verify = commands.add_parser("verify", help="check in the emulator that baseline + package == patched")
    verify.add_argument("package")
    verify.add_argument("--baseline", required=True)
    verify.add_argument("--patched", required=True)
    verify.add_argument("--inputs", help="JSON file of the calls to make (docs/VERIFY.md)")
    verify.add_argument("--with", dest="companions", action="append", default=[], metavar="DLL",
                        help="another DLL of the process, in both runs (repeatable; the DLLs beside the "
                             "baseline that it imports are always mapped)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=cmd_verify)
    if own_only:
        return parser

    from ..apply.cli import add_apply_commands
    from ..package.trust_cli import add_trust_commands

    add_apply_commands(commands)
    add_trust_commands(commands)
    from ..train.cli import add_train_command

    add_train_command(commands)
    from ..batch.cli import add_batch_command

    add_batch_command(commands)
    from ..report.cli import add_report_command

    add_report_command(commands)
    from ..rollout.cli import add_rollout_commands

    add_rollout_commands(commands)
    return parser


def _leave(code: int) -> None:
    """End a one-shot command's process once its output is flushed, without the interpreter's teardown: it
    would free both images' tables object by object (about 0.07 s of CPU after a duckdb diff). Every file
    the command wrote is closed by then; only the standard streams are still open."""
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # the other command modules import Dask, numpy and LIEF at load time: seconds of CPU that --version,
    # info or functions never use, so they are registered only when the command (or --help) may need them
    own_only = bool(argv) and (argv[0] in _OWN_COMMANDS or argv[0] == "--version")
    args = build_parser(own_only=own_only).parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        if own_only:
            # one-shot analysis commands: the verdict, the documents and their JSON allocate millions of
            # objects and no cycles worth collecting, while every full collection walks both images' tables
            # (a second of the duckdb diff); what they leave is freed when the process exits
            with gc_paused():
                code = run(args)
            if from_command_line:
                _leave(code)
            return code
        return run(args)
    except HotpatchError as exc:
        print(f"hotpatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
