"""The host-side journal: what the engine did, or was about to do, to each process.

One JSON file per process, named after its pid and its start time (a reused
pid is another file), in the state directory: ``$HOTPATCH_STATE``, else
``~/.local/state/hotpatch`` (``%LOCALAPPDATA%\\hotpatch`` on Windows).

Each package applied to the process has a record. The engine writes an intent
before every step that changes the process (an allocation, a function table,
a library loaded, a commit with its exact writes) and the result after it, so
that ``recover`` can tell after a crash what exists in the target and finish
or undo it. A record's ``phase`` says where the package stands:

    applying -> applied -> rolling_back -> rolled_back
        |          |
        v          +-> replaced (by a newer package of the same baseline)
      undone

The file is replaced atomically (written to an exclusive temporary file that
is never a link, then renamed), so a reader never sees half of it. It is not
fsynced: a crash of the host machine ends the target processes too, so a
journal only has to outlive the applier. A lock file, opened without
following links, serialises the engines working on one process.

The journal is never the only authority (docs/SECURITY.md): each applied
package is kept beside it (``packages/<content sha256>.hpk``) and its record
names that hash, so rollback and recovery derive the bytes to restore from
the package again and check the allocation's marker in the target's memory
(``provenance.py``). A kept package goes once no record needs it any more
(``prune_packages``): only records not yet finished do (rollback, release
and recovery read the package again), so it goes when its records are
rolled back or replaced and their code freed, or dropped with the journal
of an exited process. The file is removed only after the journal write
that stops naming it, so a crash leaves at most a file nobody needs, which
the next prune removes. Keeping a package and journaling the record that
names it happen under a shared lock (``packages.lock``); a prune takes it
exclusively without waiting, and leaves the work to the next prune when it
is busy. The state directory is created 0700 and refused when others can
write to it or it belongs to another user.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import JournalError, PackageError
from ..package.format import content_sha256_of, dumps, loads, package_id_of
from ..package.model import Package
from ..securefs import UnsafePathError, check_private_dir, ensure_private_dir, open_nofollow, write_atomic
from .backend import CommitWrite
from .redirects import Patch, SiteRedirect

__all__ = [
    "SCHEMA",
    "AllocationRecord",
    "CommitRecord",
    "Journal",
    "LibraryRecord",
    "PackageRecord",
    "ProcessJournal",
    "TableRecord",
    "default_state_dir",
    "prune_packages",
]

SCHEMA = "hotpatch.journal/2"

# Record phases.
APPLYING = "applying"
APPLIED = "applied"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"
REPLACED = "replaced"
UNDONE = "undone"
#: phases in which the package's redirects are (or may be) in the process
LIVE_PHASES = (APPLYING, APPLIED, ROLLING_BACK)

# Resource states.
INTENT = "intent"
ALLOCATED = "allocated"
FREED = "freed"
RETAINED = "retained"
REGISTERED = "registered"
DELETED = "deleted"
LOADED = "loaded"
PENDING = "pending"
DONE = "done"
FAILED = "failed"

#: finished records kept per process (older ones are dropped)
KEEP_FINISHED = 16
#: events kept per record, and per finished record
KEEP_EVENTS = 64
KEEP_FINISHED_EVENTS = 4


def default_state_dir() -> Path:
    """$HOTPATCH_STATE, else the user's local state directory."""
    override = os.environ.get("HOTPATCH_STATE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "hotpatch"
    return Path.home() / ".local" / "state" / "hotpatch"


@dataclass
class AllocationRecord:
    """The one region holding a package's code, data and function table."""

    va: int = 0
    size: int = 0
    state: str = INTENT  # intent | allocated | freed | retained
    parts: list[dict[str, int | str]] = field(default_factory=list)  # name, va, size, protect


@dataclass
class TableRecord:
    """A function table registered with RtlAddFunctionTable."""

    va: int
    count: int
    base: int
    state: str = INTENT  # intent | registered | deleted


@dataclass
class LibraryRecord:
    """A DLL the engine loaded into the target for an import (LoadLibraryA), to be freed with the package."""

    dll: str
    hmodule: int = 0
    state: str = INTENT  # intent | loaded | freed


@dataclass
class CommitRecord:
    """A commit's exact writes, journaled before it is sent, and its outcome."""

    kind: str  # apply | replace | rollback
    writes: list[CommitWrite]
    state: str = PENDING  # pending | done | failed
    report: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state,
            "report": self.report,
            "writes": [
                {"va": w.va, "expected": w.expected.hex(), "new": w.new.hex(), "no_suspend": w.no_suspend}
                for w in self.writes
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommitRecord:
        writes = [
            CommitWrite(int(w["va"]), bytes.fromhex(w["expected"]), bytes.fromhex(w["new"]), bool(w["no_suspend"]))
            for w in data["writes"]
        ]
        return cls(str(data["kind"]), writes, str(data["state"]), data.get("report"))


@dataclass
class PackageRecord:
    """Everything the engine did to the process for one package."""

    serial: int
    package_id: str
    baseline_id: str
    sequence: int
    module_name: str
    module_base: int
    package_sha256: str = ""  # content SHA-256 of the package kept beside the journal
    description: str = ""
    phase: str = APPLYING
    sites: list[SiteRedirect] = field(default_factory=list)
    allocation: AllocationRecord | None = None
    function_table: TableRecord | None = None
    libraries: list[LibraryRecord] = field(default_factory=list)
    commit: CommitRecord | None = None
    replaces: int | None = None  # serial of the record this one replaced (stacking)
    replaced_by: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def patches(self) -> list[Patch]:
        return [patch for site in self.sites for patch in site.patches]

    @property
    def live(self) -> bool:
        return self.phase in LIVE_PHASES

    @property
    def finished(self) -> bool:
        """Nothing of it is left in the process (or what is left is no longer tracked)."""
        allocation_gone = self.allocation is None or self.allocation.state in (FREED, INTENT)
        return self.phase in (ROLLED_BACK, REPLACED, UNDONE) and allocation_gone

    @property
    def needs_package(self) -> bool:
        """Whether its kept package may still be read: every step on a record reads it, until it is finished."""
        return bool(self.package_sha256) and not self.finished

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "package_id": self.package_id,
            "baseline_id": self.baseline_id,
            "sequence": self.sequence,
            "module_name": self.module_name,
            "module_base": self.module_base,
            "package_sha256": self.package_sha256,
            "description": self.description,
            "phase": self.phase,
            "sites": [site.to_json() for site in self.sites],
            "allocation": asdict(self.allocation) if self.allocation else None,
            "function_table": asdict(self.function_table) if self.function_table else None,
            "libraries": [asdict(library) for library in self.libraries],
            "commit": self.commit.to_json() if self.commit else None,
            "replaces": self.replaces,
            "replaced_by": self.replaced_by,
            "events": self.events,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackageRecord:
        allocation = data.get("allocation")
        table = data.get("function_table")
        commit = data.get("commit")
        return cls(
            serial=int(data["serial"]),
            package_id=str(data["package_id"]),
            baseline_id=str(data["baseline_id"]),
            sequence=int(data["sequence"]),
            module_name=str(data["module_name"]),
            module_base=int(data["module_base"]),
            package_sha256=str(data["package_sha256"]),
            description=str(data.get("description", "")),
            phase=str(data["phase"]),
            sites=[SiteRedirect.from_json(site) for site in data.get("sites", [])],
            allocation=AllocationRecord(**allocation) if allocation else None,
            function_table=TableRecord(**table) if table else None,
            libraries=[LibraryRecord(**library) for library in data.get("libraries", [])],
            commit=CommitRecord.from_json(commit) if commit else None,
            replaces=data.get("replaces"),
            replaced_by=data.get("replaced_by"),
            events=list(data.get("events", [])),
        )


class ProcessJournal:
    """The journal of one process (pid and start time)."""

    def __init__(self, path: Path, pid: int, start_time: int) -> None:
        self.path = path
        self.pid = pid
        self.start_time = start_time
        self.records: list[PackageRecord] = []
        self._next_serial = 1
        self.closed = False
        self._packages_hold: _PackagesLock | None = None  # from keeping a package to the end of locked()
        self.load()

    # -- file ------------------------------------------------------------------

    def load(self) -> None:
        try:
            _state_dir(self.path.parent, create=False)
            fd = open_nofollow(self.path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as handle:
                text = handle.read()
        except FileNotFoundError:
            self.records = []
            return
        except OSError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
            if data.get("schema") != SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r}")
            if (data["pid"], data["start_time"]) != (self.pid, self.start_time):
                raise ValueError("it belongs to another process")
            self.records = [PackageRecord.from_json(r) for r in data["records"]]
            self._next_serial = int(data.get("next_serial", 1))
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"the journal {self.path} is corrupt: {exc}") from None

    def save(self) -> None:
        self._compact()
        document = {
            "schema": SCHEMA,
            "pid": self.pid,
            "start_time": self.start_time,
            "next_serial": self._next_serial,
            "updated": time.time(),
            "records": [record.to_json() for record in self.records],
        }
        try:
            _state_dir(self.path.parent)
            # compact: json's C encoder is used only without indentation (saved once per step)
            write_atomic(self.path, (json.dumps(document, separators=(",", ":")) + "\n").encode())
        except OSError as exc:
            raise JournalError(f"cannot write the journal {self.path}: {exc.strerror or exc}") from None

    def _compact(self) -> None:
        finished = [r for r in self.records if r.finished]
        drop = {id(r) for r in finished[: max(0, len(finished) - KEEP_FINISHED)]}
        if drop:
            self.records = [r for r in self.records if id(r) not in drop]
        for record in self.records:
            del record.events[: -(KEEP_FINISHED_EVENTS if record.finished else KEEP_EVENTS)]

    @contextlib.contextmanager
    def locked(self) -> Iterator[ProcessJournal]:
        """Hold the process's lock (one engine per process at a time) and read the journal afresh."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            _state_dir(lock_path.parent)
            handle = os.fdopen(open_nofollow(lock_path, os.O_RDWR | os.O_CREAT), "r+b")
        except OSError as exc:
            raise JournalError(f"cannot open the journal lock {lock_path}: {exc.strerror or exc}") from None
        needed: set[str] = set()
        try:
            _lock_file(handle)
            self.load()
            needed = self.needed_packages()
            yield self
        finally:
            if self.closed:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            _unlock_file(handle)
            handle.close()
            if self._packages_hold is not None:
                self._packages_hold.release()
                self._packages_hold = None
            if needed - self.needed_packages():
                # a record stopped needing its package, or the journal closed: after the write that says so
                with contextlib.suppress(OSError, JournalError):
                    prune_packages(self.path.parent)

    def close(self) -> None:
        """The process has exited: its journal describes nothing any more, so it goes (status, --all)."""
        self.closed = True
        self.records = []
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- the packages kept beside the journal ----------------------------------

    def keep_package(self, package: Package) -> str:
        """Keep a copy of the package being applied; its content SHA-256 (hex) goes into the record.

        Called within ``locked()``: until it ends no prune runs, so the copy
        outlives the window before the record naming it is saved.
        """
        digest = content_sha256_of(package).hex()
        path = self._package_path(digest)
        try:
            _state_dir(path.parent)
            if self._packages_hold is None:
                self._packages_hold = _PackagesLock(self.path.parent)
                self._packages_hold.acquire_shared()
            write_atomic(path, dumps(package))
        except OSError as exc:
            raise JournalError(f"cannot keep the package beside the journal: {exc.strerror or exc}") from None
        return digest

    def kept_package(self, record: PackageRecord) -> Package:
        """The package a record says was applied, read back from the copy kept at apply time."""
        path = self._package_path(record.package_sha256)
        try:
            _state_dir(path.parent, create=False)
            with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as handle:
                package = loads(handle.read())
        except FileNotFoundError:
            raise JournalError(f"package {record.package_id} of the journal was not kept ({path.name})") from None
        except (OSError, PackageError) as exc:
            raise JournalError(f"package {record.package_id} kept beside the journal is unusable: {exc}") from None
        if content_sha256_of(package).hex() != record.package_sha256 or package_id_of(package) != record.package_id:
            raise JournalError(f"the package kept as {path.name} is not package {record.package_id}")
        return package

    def needed_packages(self) -> set[str]:
        """The content hashes of the kept packages this journal's records still need."""
        return {r.package_sha256 for r in self.records if r.needs_package}

    def _package_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise JournalError(f"journal of process {self.pid}: {digest!r} is not a package hash")
        return self.path.parent / "packages" / f"{digest}.hpk"

    # -- records ---------------------------------------------------------------

    def new_record(self, **fields: Any) -> PackageRecord:
        record = PackageRecord(serial=self._next_serial, **fields)
        self._next_serial += 1
        self.records.append(record)
        return record

    def record(self, serial: int) -> PackageRecord:
        for record in self.records:
            if record.serial == serial:
                return record
        raise JournalError(f"journal of process {self.pid} has no record {serial}")

    def live(self, module_name: str | None = None) -> list[PackageRecord]:
        """Records whose redirects are (or may be) in the process, oldest first."""
        return [
            r
            for r in self.records
            if r.live and (module_name is None or r.module_name.lower() == module_name.lower())
        ]

    def event(self, record: PackageRecord, step: str, state: str, save: bool = True, **detail: Any) -> None:
        """Note a step's intent or result in the record, and save (unless the next event's save will do)."""
        record.events.append({"time": round(time.time(), 6), "step": step, "state": state, **detail})
        if save:
            self.save()


class Journal:
    """The state directory holding the journals of every process."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()

    def path_for(self, pid: int, start_time: int) -> Path:
        return self.state_dir / f"{pid}-{start_time}.json"

    def process(self, pid: int, start_time: int) -> ProcessJournal:
        return ProcessJournal(self.path_for(pid, start_time), pid, start_time)

    def close_exited(self, pid: int) -> int:
        """Close the journals of a pid whose process is known to have exited; returns how many."""
        closed = 0
        for known_pid, start in self.known():
            if known_pid == pid:
                journal = self.process(pid, start)
                with journal.locked():
                    journal.close()
                closed += 1
        return closed

    def prune_packages(self) -> list[str]:
        """Remove the kept packages no record needs any more (``prune_packages``); their hashes."""
        return prune_packages(self.state_dir)

    def known(self) -> list[tuple[int, int]]:
        """(pid, start time) of every process with a journal."""
        found: list[tuple[int, int]] = []
        if not self.state_dir.is_dir():
            return found
        try:
            _state_dir(self.state_dir, create=False)
        except OSError as exc:
            raise JournalError(f"state directory refused: {exc.strerror or exc}") from None
        for path in sorted(self.state_dir.glob("*-*.json")):
            pid, _, start = path.stem.partition("-")
            if pid.isdigit() and start.isdigit():
                found.append((int(pid), int(start)))
        return found


def prune_packages(state_dir: Path) -> list[str]:
    """Remove the packages kept in ``state_dir`` that no journal record needs any more; their hashes.

    Does nothing when an engine holds the packages lock (it may be between
    keeping a package and journaling the record that names it: the next
    prune does the work) or when a journal cannot be read (it could name
    any package). Temporary files a crash left beside the packages go too.
    """
    state_dir = Path(state_dir)
    packages = state_dir / "packages"
    if not packages.is_dir():
        return []
    _state_dir(state_dir, create=False)
    _state_dir(packages, create=False)
    lock = _PackagesLock(state_dir)
    if not lock.try_exclusive():
        return []
    try:
        needed: set[str] = set()
        for path in state_dir.glob("*-*.json"):
            pid, _, start = path.stem.partition("-")
            if not (pid.isdigit() and start.isdigit()):
                continue
            try:
                needed |= ProcessJournal(path, int(pid), int(start)).needed_packages()
            except JournalError:
                return []
        removed = []
        for path in packages.iterdir():
            digest = path.name.removesuffix(".tmp").removesuffix(".hpk")
            if path.name.endswith((".hpk", ".hpk.tmp")) and digest not in needed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # never follows a link
                    if not path.name.endswith(".tmp"):
                        removed.append(digest)
        return sorted(removed)
    finally:
        lock.release()


def _state_dir(path: Path, create: bool = True) -> None:
    """Create the state directory 0700, or check the one found: ours, and nobody else may write to it."""
    try:
        if create:
            ensure_private_dir(path)
        else:
            check_private_dir(path)
    except UnsafePathError as exc:
        raise JournalError(f"state directory refused: {exc}") from None


class _PackagesLock:
    """The lock between keeping packages (shared, held until the record is journaled) and pruning them
    (exclusive, never waited for). ``packages.lock`` in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / "packages.lock"
        try:
            self._handle = os.fdopen(open_nofollow(path, os.O_RDWR | os.O_CREAT), "r+b")
        except OSError as exc:
            raise JournalError(f"cannot open the packages lock {path}: {exc.strerror or exc}") from None
        self._region: tuple[int, int] | None = None

    def acquire_shared(self) -> None:
        self._region = _lock_shared(self._handle)

    def try_exclusive(self) -> bool:
        self._region = _try_lock_exclusive(self._handle)
        if self._region is None:
            self._handle.close()
        return self._region is not None

    def release(self) -> None:
        if self._region is not None:
            _unlock_region(self._handle, self._region)
            self._region = None
        self._handle.close()


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt
    import random

    # Windows has no shared file locks: a shared holder locks one byte of SLOTS, an exclusive one all of them.
    _SLOTS = 1 << 16

    def _lock_file(handle: Any) -> None:
        handle.seek(0)
        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:
                time.sleep(0.05)

    def _unlock_file(handle: Any) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

    def _lock_region(handle: Any, region: tuple[int, int]) -> bool:
        handle.seek(region[0])
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, region[1])
        except OSError:
            return False
        return True

    def _lock_shared(handle: Any) -> tuple[int, int]:
        while True:
            region = (1 + random.randrange(_SLOTS), 1)
            if _lock_region(handle, region):
                return region
            time.sleep(0.01)

    def _try_lock_exclusive(handle: Any) -> tuple[int, int] | None:
        region = (1, _SLOTS)
        return region if _lock_region(handle, region) else None

    def _unlock_region(handle: Any, region: tuple[int, int]) -> None:
        handle.seek(region[0])
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, region[1])

else:
    import fcntl

    def _lock_file(handle: Any) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)

    def _unlock_file(handle: Any) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _lock_shared(handle: Any) -> tuple[int, int]:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        return (0, 0)

    def _try_lock_exclusive(handle: Any) -> tuple[int, int] | None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return (0, 0)

    def _unlock_region(handle: Any, region: tuple[int, int]) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
