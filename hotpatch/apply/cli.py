"""The live-patching subcommands: apply, status, rollback, recover, ps.

``add_apply_commands(subparsers)`` registers them on the ``hotpatch``
parser; each handler returns the exit code:

    0  applied / done
    1  refused, or failed safely: the process is as it was
    2  bad input: unreadable or corrupt package, missing file, bad arguments
    4  failed and could not undo everything: run ``hotpatch recover``
    5  refused by the trust policy: nothing was touched
    6  the pid names another process than the one patched (it exited, its pid was reused): nothing was touched

A package must be signed by a key of the trust store (``hotpatch trust``)
or one ``--trust`` adds for the call; ``--allow-unsigned`` admits unsigned
packages, never one signed by an untrusted key (5). One whose signature does
not verify is corrupt (2). With ``--json`` the result is
one JSON document on stdout; errors are one line on stderr. The agent is
started under Wine on Linux, in ``$HOTPATCH_WINEPREFIX`` (else ``$WINEPREFIX``,
else ``~/.wine``); journals live in ``$HOTPATCH_STATE``.

``python -m hotpatch.apply.cli`` runs these commands on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import (
    BackendError,
    HotpatchError,
    PackageUnsignedError,
    PackageUntrustedError,
    ProcessGoneError,
    StepFailedError,
)
from ..jsonio import print_answer
from ..package import Package
from ..package.format import load, package_id_of, signature_state_of
from ..package.trust import TrustStore, check_trust
from .agent import AgentClient
from .engine import Engine
from .health_cli import add_health_arguments, health_gate
from .journal import Journal
from .status import read_image

__all__ = ["add_apply_commands", "main"]

EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_UNSAFE, EXIT_UNTRUSTED = 0, 1, 2, 4, 5


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: Sequence[str]) -> None:
    print_answer(document, lines, args.json)


def _error(exc: BaseException) -> None:
    print(f"hotpatch: error: {exc}", file=sys.stderr)


def _failure(pid: int, exc: HotpatchError) -> dict[str, Any]:
    status = "refused" if getattr(exc, "undone", True) else "unsafe"
    out: dict[str, Any] = {"pid": pid, "status": status, "error": str(exc), "kind": type(exc).__name__}
    if isinstance(exc, StepFailedError):
        out.update(step=exc.step, cause=type(exc.cause).__name__)
    return out


@contextmanager
def _agent() -> Iterator[AgentClient]:
    client = AgentClient.start()
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------


def _trusted_package(args: argparse.Namespace) -> tuple[Package, frozenset[bytes]]:
    """The package, checked against the trust store plus the keys ``--trust`` adds for this call."""
    keys = TrustStore.default(args.trust).raw_keys()
    package = load(args.package)  # structure, hash, and a signature that verifies (else exit 2)
    check_trust(package, keys, args.allow_unsigned)
    return package, keys


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        package, trusted = _trusted_package(args)
    except (PackageUnsignedError, PackageUntrustedError) as exc:
        _error(f"{args.package}: refused: {exc}")
        if args.json:
            _emit(args, {"schema": "hotpatch.apply/1", "package": None, "results": [],
                         "error": str(exc), "kind": type(exc).__name__}, [])
        return EXIT_UNTRUSTED  # its own code, so scripts can tell the trust policy from other refusals
    results: list[dict[str, Any]] = []
    lines = []
    code = EXIT_OK
    with _agent() as client:
        pids = client.pids_with_module(package.target.module_name) if args.all else args.pid
        for pid in pids:
            try:
                with client.open(pid) as backend:
                    engine = Engine(backend, Journal(), allow_unsigned=args.allow_unsigned, trusted_keys=trusted)
                    with engine.transaction() as tx:
                        result = tx.apply(package, dry_run=args.dry_run)
                results.append(result.to_json())
                lines.append(_apply_line(result.to_json()))
            except HotpatchError as exc:
                code = max(code, getattr(exc, "exit_code", EXIT_REFUSED))
                results.append(_failure(pid, exc))
                _error(f"pid {pid}: {exc}")
        code = max(code, health_gate(args, client, package_id_of(package), results, lines))
    if args.all and not pids:
        lines.append(f"no process has {package.target.module_name} loaded")
    document = {
        "schema": "hotpatch.apply/1",
        "package": {
            "id": package_id_of(package),
            "module": package.target.module_name,
            "baseline_id": package.baseline_id,
            "sequence": package.sequence,
            "signature": signature_state_of(package),
        },
        "dry_run": args.dry_run,
        "results": results,
    }
    _emit(args, document, lines)
    return code


def _apply_line(result: dict[str, Any]) -> str:
    sites = ", ".join(f"{s['function']} {s['strategy']}" for s in result["sites"]) or "-"
    head = f"pid {result['pid']}: {result['status']} {result['package_id']} on {result['module']}"
    if result["status"] == "dry-run":
        return f"{head} at {result['module_base']:#x}: every check passed, nothing written"
    commit = result["commit"]
    pause = f"pause {commit['pause_us'] / 1000:.2f} ms" if commit["suspended"] else "no thread suspended"
    replaced = f", replacing {result['replaced']}" if result["replaced"] else ""
    return f"{head} at {result['module_base']:#x}: {sites}; {pause}{replaced}"


# --------------------------------------------------------------------------
# status, rollback, recover
# --------------------------------------------------------------------------


def _status_lines(status: dict[str, Any]) -> list[str]:
    lines = [f"pid {status['pid']}: {len(status['packages'])} package(s)"]
    for package in status["packages"]:
        lines.append(
            f"  {package['package_id']} {package['baseline_id']}#{package['sequence']} on {package['module']}: "
            f"{package['phase']}, {package['state']}"
        )
        for site in package["sites"]:
            lines.append(f"    {site['function']:<24} {site['strategy']:<18} {site['state']}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    journal = Journal()
    processes = []
    with _agent() as client:
        if args.all:
            pids = []
            for pid, start in journal.known():
                try:
                    if client.process_info(pid).start_time == start:
                        pids.append(pid)
                except ProcessGoneError:
                    continue
        else:
            pids = [args.pid]
        for pid in pids:
            try:
                with client.open(pid) as backend:
                    processes.append(Engine(backend, journal).status().to_json())
            except ProcessGoneError:
                if args.all:
                    continue  # exited meanwhile
                raise
    document = {"schema": "hotpatch.status/1", "processes": processes}
    _emit(args, document, [line for p in processes for line in _status_lines(p)] or ["no journaled process"])
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    with _agent() as client, client.open(args.pid) as backend:
        engine = Engine(backend, Journal())
        try:
            with engine.transaction() as tx:
                results = tx.rollback(args.package)
        except HotpatchError as exc:
            failure = _failure(args.pid, exc)
            if args.json:
                _emit(args, {"schema": "hotpatch.rollback/1", "pid": args.pid, "results": [failure]}, [])
            _error(exc)
            return getattr(exc, "exit_code", EXIT_REFUSED)
    lines = []
    for result in results:
        code_state = {True: "freed", False: "retained (a thread still runs it)", None: "pending"}[result.released]
        pause = f"pause {result.commit.pause_us / 1000:.2f} ms" if result.commit else ""
        lines.append(f"pid {args.pid}: rolled back {result.package_id}; {pause}; new code {code_state}")
    _emit(args, {"schema": "hotpatch.rollback/1", "pid": args.pid, "results": [r.to_json() for r in results]}, lines)
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    with _agent() as client:
        try:
            backend = client.open(args.pid)
        except ProcessGoneError as exc:  # it took every change with it: its journals describe nothing now
            closed = Journal().close_exited(args.pid)
            raise ProcessGoneError(f"{exc}; nothing to recover ({closed} journal(s) of it closed)", args.pid) from None
        with backend:
            report = Engine(backend, Journal()).recover()
    lines = [f"pid {args.pid}: {'consistent' if report.consistent else 'INCONSISTENT'}"]
    for action in report.actions:
        lines.append(f"  {action['package_id']}: {action['before']} -> {action['after']} ({action['outcome']}): "
                     f"{action['note']}")
    _emit(args, {"schema": "hotpatch.recover/1", **report.to_json()}, lines)
    return EXIT_OK if report.consistent else EXIT_REFUSED


# --------------------------------------------------------------------------
# ps
# --------------------------------------------------------------------------


def cmd_ps(args: argparse.Namespace) -> int:
    journal = Journal()
    known = dict(journal.known())
    processes = []
    lines = []
    with _agent() as client:
        for entry, shown in client.processes(args.module):
            item: dict[str, Any] = {"pid": entry.pid, "name": entry.name, "threads": entry.threads,
                                    "modules": [], "packages": []}
            try:
                with client.open(entry.pid) as backend:
                    for module in shown:
                        row: dict[str, Any] = {"name": module.name, "path": module.path, "base": module.base_va,
                                               "size": module.size}
                        try:
                            row.update(read_image(backend, module).identity_json())
                        except BackendError as exc:
                            row["error"] = str(exc)
                        item["modules"].append(row)
                    start = backend.process_start_time()
                    item["start_time"] = start
                    if known.get(entry.pid) == start:
                        item["packages"] = Engine(backend, journal).status().to_json()["packages"]
            except BackendError as exc:
                item["error"] = str(exc)
            processes.append(item)
            lines.append(f"{entry.pid:>6} {entry.name} ({entry.threads} threads)")
            for row in item["modules"]:
                ident = (f" ts {row['timedatestamp']:#x} size {row['size_of_image']:#x} sum {row['checksum']:#x}"
                         if "timedatestamp" in row else "")
                lines.append(f"         {row['base']:#014x} {row['name']}{ident}")
            for package in item["packages"]:
                lines.append(f"         package {package['package_id']} {package['baseline_id']}#{package['sequence']}"
                             f" on {package['module']}: {package['phase']}, {package['state']}")
    _emit(args, {"schema": "hotpatch.ps/1", "processes": processes}, lines)
    return EXIT_OK


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


def add_apply_commands(subparsers: Any) -> None:
    """Register apply, status, rollback, recover and ps; each sets ``run`` to its handler."""
    apply = subparsers.add_parser("apply", help="apply a package to running processes")
    apply.add_argument("package", help="the .hpk file")
    where = apply.add_mutually_exclusive_group(required=True)
    where.add_argument("--pid", type=int, nargs="+", action="extend", metavar="PID", help="processes to patch")
    where.add_argument("--all", action="store_true", help="every process that has the target module loaded")
    apply.add_argument("--dry-run", action="store_true", help="check everything, allocate and write nothing")
    apply.add_argument("--allow-unsigned", action="store_true",
                       help="also accept a package without a signature (never one signed by an untrusted key)")
    apply.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                       help="trust this key for this call too (64 hex digits or a key file); repeatable")
    apply.add_argument("--json", action="store_true")
    add_health_arguments(apply)
    apply.set_defaults(run=cmd_apply)

    status = subparsers.add_parser("status", help="the packages in a process, read back from its memory")
    which = status.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=int)
    which.add_argument("--all", action="store_true", help="every live process with a journal")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)

    rollback = subparsers.add_parser("rollback", help="take packages out of a process")
    rollback.add_argument("--pid", type=int, required=True)
    rollback.add_argument("--package", metavar="ID", help="only this package (default: all, newest first)")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(run=cmd_rollback)

    recover = subparsers.add_parser("recover", help="finish or undo operations cut short in a process")
    recover.add_argument("--pid", type=int, required=True)
    recover.add_argument("--json", action="store_true")
    recover.set_defaults(run=cmd_recover)

    ps = subparsers.add_parser("ps", help="processes, their modules with identity, and their packages")
    ps.add_argument("--module", metavar="NAME", help="only processes with this module, and only it")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(run=cmd_ps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotpatch", description="Live patching of running processes.")
    add_apply_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except HotpatchError as exc:
        _error(exc)
        return exc.exit_code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
