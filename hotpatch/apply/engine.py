"""The apply transaction: putting packages into one running process, and taking them out.

    with Engine(backend, Journal()).transaction() as tx:
        result = tx.apply(package)          # or tx.rollback(package_id)

State lives on the transaction (Detours-style): every step that changes the
process pushes its undo; the first error sticks, undoes everything the
transaction did (newest first) and is raised as a ``StepFailedError`` naming
the step, with the cause attached. Freeing code a commit made unreachable is
deferred to the end of the transaction, so that until then every operation
can still be undone.

An apply, step by step (docs/APPLY.md has the details):

 1. signature   the package's signature against the engine's policy
 2. module      find the module by name and check its identity in memory
 3. journal     the packages already applied: stacking, or a refusal
 4. sites       every site holds its original bytes (or our older redirect)
 5. code hash   the module's code is the baseline's (see status.code_sha256)
 6. imports     resolve dll!name in the target, loading a DLL if needed
 7. allocate    one region near the image for code, rodata, data, bss
 8. write       blobs with their fixups resolved, relay thunks, function table
 9. protect     code RX, rodata R, data RW: never writable and executable
10. unwind      RtlAddFunctionTable in the target
    plan        each site's strategy from where the code landed; the commit's writes
11. commit      every redirect in one backend commit (threads checked there)

The journal gets an intent before steps 6-11 change anything and the result
after, so ``Engine.recover`` can finish or undo an apply that was cut short.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import (
    BackendError,
    BusyError,
    BytesMismatchError,
    FixupError,
    HotpatchError,
    IdentityMismatchError,
    JournalError,
    OtherBaselineError,
    ProcessGoneError,
    RefusedError,
    SequenceError,
    SiteMismatchError,
    StepFailedError,
)
from ..package.format import content_sha256_of, package_id_of
from ..package.model import (
    BaselineRVA,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    ImportTarget,
    Package,
)
from ..package.signing import normalize_public_keys
from ..package.trust import TrustStore, check_trust
from ..process.win32mem import PAGE_EXECUTE_READ, PAGE_READONLY, PAGE_READWRITE
from .backend import REL32_REACH, CommitReport, CommitWrite, ProcessBackend, call_function
from .imports import ImportResolver, ResolvedImport, free_library, normalise_dll, system_function
from .journal import (
    ALLOCATED,
    APPLIED,
    APPLYING,
    DELETED,
    DONE,
    FAILED,
    FREED,
    INTENT,
    LOADED,
    PENDING,
    REGISTERED,
    REPLACED,
    RETAINED,
    ROLLED_BACK,
    ROLLING_BACK,
    UNDONE,
    AllocationRecord,
    CommitRecord,
    Journal,
    LibraryRecord,
    PackageRecord,
    ProcessJournal,
    TableRecord,
)
from .provenance import MARKER_SIZE, check_allocation, check_libraries, derive_sites, region_marker
from .redirects import SiteRedirect, fits_rel32, plan_site, relay_thunk, transition_writes
from .region import Layout, Part
from .status import (
    OURS,
    CodeHash,
    LoadedImage,
    ProcessStatus,
    check_identity,
    code_sha256,
    process_status,
    read_image,
    site_state,
)

__all__ = [
    "ApplyResult",
    "Engine",
    "Layout",
    "RecoveryReport",
    "RollbackResult",
    "Transaction",
    "plan_layout",
]

PAGE = 0x1000
THUNK_SIZE = 16
RUNTIME_FUNCTION_SIZE = 12


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


# --------------------------------------------------------------------------
# Layout of the one allocation
# --------------------------------------------------------------------------


def plan_layout(package: Package, thunks: list[str]) -> Layout:
    offsets = [0] * len(package.blobs)
    offset = 0
    parts = []

    def place(kinds: tuple[BlobKind, ...]) -> None:
        nonlocal offset
        for blob in package.blobs:
            if blob.kind in kinds:
                offset = _align(offset, blob.alignment)
                offsets[blob.index] = offset
                offset += blob.size

    def close(name: str, start: int, protect: int) -> int:
        nonlocal offset
        if offset > start:
            parts.append(Part(name, start, _align(offset, PAGE) - start, protect))
        offset = _align(offset, PAGE)
        return offset

    place((BlobKind.CODE,))
    thunk_offsets = {}
    for key in thunks:
        offset = _align(offset, THUNK_SIZE)
        thunk_offsets[key] = offset
        offset += THUNK_SIZE
    start = close("code", 0, PAGE_EXECUTE_READ)
    marker_offset = offset
    offset += MARKER_SIZE
    place((BlobKind.RODATA,))
    offset = _align(offset, 4)
    table_offset = offset
    offset += RUNTIME_FUNCTION_SIZE * len(package.unwind)
    start = close("rodata", start, PAGE_READONLY)
    place((BlobKind.DATA,))
    place((BlobKind.BSS,))
    close("data", start, PAGE_READWRITE)
    return Layout(
        max(offset, PAGE), tuple(offsets), thunk_offsets, table_offset, len(package.unwind), tuple(parts), marker_offset
    )


def _import_key(target: ImportTarget) -> tuple[str, str]:
    return normalise_dll(target.dll), target.name


def _thunk_key(fixup: Fixup) -> str | None:
    """The relay thunk a fixup may need: a REL32 to an import (often more than 2 GiB away), an
    ALLOC_REL32 to code outside the allocation (a handler RVA in unwind info must be above its base)."""
    target = fixup.target
    if isinstance(target, ImportTarget) and fixup.kind in (FixupKind.REL32, FixupKind.ALLOC_REL32):
        return "{}!{}".format(*_import_key(target))
    if isinstance(target, BaselineRVA) and fixup.kind is FixupKind.ALLOC_REL32 and fixup.addend == 0:
        return f"rva:{target.rva:#x}"
    return None


def build_parts(
    package: Package,
    layout: Layout,
    base_va: int,
    module_base: int,
    imports: dict[tuple[str, str], ResolvedImport],
    marker: bytes = b"",
) -> dict[str, bytes]:
    """The bytes of each part (bss left out: fresh pages are zero), fixups resolved, the region's marker."""
    memory = bytearray(layout.size)
    memory[layout.marker_offset : layout.marker_offset + len(marker)] = marker
    for blob in package.blobs:
        if blob.kind is not BlobKind.BSS:
            memory[layout.blob_offsets[blob.index] : layout.blob_offsets[blob.index] + blob.size] = blob.data
    thunk_targets = {}
    for fixup in package.fixups:
        key = _thunk_key(fixup)
        if key is not None and isinstance(fixup.target, ImportTarget):
            thunk_targets[key] = imports[_import_key(fixup.target)].va
        elif key is not None and isinstance(fixup.target, BaselineRVA):
            thunk_targets[key] = module_base + fixup.target.rva
    for key, offset in layout.thunk_offsets.items():
        memory[offset : offset + 14] = relay_thunk(thunk_targets[key])
    for fixup in package.fixups:
        field_va = base_va + layout.blob_offsets[fixup.blob] + fixup.offset
        what = f"fixup at blob {fixup.blob} offset {fixup.offset:#x}"
        target = fixup.target
        if isinstance(target, BaselineRVA):
            s = module_base + target.rva
        elif isinstance(target, BlobTarget):
            s = base_va + layout.blob_offsets[target.blob] + target.offset
        else:
            s = imports[_import_key(target)].va
        key = _thunk_key(fixup)
        if key is not None and key in layout.thunk_offsets:
            if fixup.kind is FixupKind.REL32:
                far = not fits_rel32(s + fixup.addend - field_va)
            else:
                far = not 0 <= s + fixup.addend - base_va < 1 << 32
            if far:
                s = base_va + layout.thunk_offsets[key]  # through the relay thunk
        if fixup.kind is FixupKind.REL32:
            value = s + fixup.addend - field_va
            if not fits_rel32(value):
                raise FixupError(f"{what}: {s:#x} is out of rel32 reach of {field_va:#x}")
            data = struct.pack("<i", value)
        elif fixup.kind is FixupKind.ABS64:
            value = s + fixup.addend
            if not 0 <= value < 1 << 64:
                raise FixupError(f"{what}: {value:#x} is not a 64-bit address")
            data = struct.pack("<Q", value)
        elif fixup.kind is FixupKind.IMAGE_REL32:
            value = s + fixup.addend - module_base
            if not 0 <= value < 1 << 32:
                raise FixupError(f"{what}: {s:#x} is not within 4 GiB above the module base {module_base:#x}")
            data = struct.pack("<I", value)
        else:  # ALLOC_REL32: relative to the allocation, the base the function table is registered with
            value = s + fixup.addend - base_va
            if not 0 <= value < 1 << 32:
                raise FixupError(f"{what}: {s:#x} is not within 4 GiB above the allocation base {base_va:#x}")
            data = struct.pack("<I", value)
        offset = field_va - base_va
        memory[offset : offset + len(data)] = data
    entries = sorted(
        (
            layout.blob_offsets[u.code_blob] + u.begin,
            layout.blob_offsets[u.code_blob] + u.end,
            layout.blob_offsets[u.unwind_blob] + u.unwind_offset,
        )
        for u in package.unwind
    )
    for i, entry in enumerate(entries):
        struct.pack_into("<III", memory, layout.table_offset + RUNTIME_FUNCTION_SIZE * i, *entry)
    parts = {}
    for part in layout.parts:
        end = part.offset + part.size
        if part.name == "data":  # only up to the last initialised byte
            initialised = [
                layout.blob_offsets[b.index] + b.size for b in package.blobs if b.kind is BlobKind.DATA
            ]
            end = max(initialised, default=part.offset)
        if end > part.offset:
            parts[part.name] = bytes(memory[part.offset : end])
    return parts


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def _report_json(report: CommitReport | None) -> dict[str, Any] | None:
    return asdict(report) if report is not None else None


@dataclass
class ApplyResult:
    pid: int
    package_id: str
    module: str
    module_base: int
    status: str  # applied | dry-run
    sequence: int = 0
    serial: int = 0
    allocation_va: int = 0
    allocation_size: int = 0
    function_table_va: int = 0
    sites: list[SiteRedirect] = field(default_factory=list)
    imports: list[ResolvedImport] = field(default_factory=list)
    code_hash: CodeHash | None = None
    commit: CommitReport | None = None
    replaced: str | None = None
    replaced_released: bool | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)
    #: where each blob of the package was placed in the target
    blob_vas: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "package_id": self.package_id,
            "status": self.status,
            "module": self.module,
            "module_base": self.module_base,
            "sequence": self.sequence,
            "allocation": {"va": self.allocation_va, "size": self.allocation_size},
            "function_table": self.function_table_va,
            "sites": [
                {"rva": s.rva, "function": s.function, "strategy": s.strategy.name, "target": s.target_va}
                for s in self.sites
            ],
            "imports": [i.to_json() for i in self.imports],
            "code_hash": self.code_hash.to_json() if self.code_hash else None,
            "commit": _report_json(self.commit),
            "replaced": self.replaced,
            "replaced_released": self.replaced_released,
            "durations_ms": self.durations_ms,
        }


@dataclass
class RollbackResult:
    pid: int
    package_id: str
    serial: int
    commit: CommitReport | None = None
    released: bool | None = None  # None until the transaction ends; False: the code is retained

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "package_id": self.package_id,
            "status": "rolled_back",
            "commit": _report_json(self.commit),
            "code": {None: "pending", True: "freed", False: "retained"}[self.released],
        }


@dataclass
class RecoveryReport:
    pid: int
    actions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not any(a["outcome"] == "inconsistent" for a in self.actions)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "consistent": self.consistent, "actions": self.actions}


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------


class Engine:
    """Live patching of one process through a ``ProcessBackend``, journaled on the host.

    ``allow_unsigned``/``trusted_keys`` are the signature policy
    (``check_trust``): a signed package only if a trusted key signed it,
    an unsigned one only with ``allow_unsigned``; ``trusted_keys=None`` reads
    the trust store. ``max_attempts`` and
    ``retry_sleep_ms`` go to every commit. Code is freed only when no thread
    runs it or returns into it; ``release_attempts`` snapshots
    ``release_wait`` seconds apart are tried before it is retained.
    ``on_step(name)`` is called before each step, and with "apply:sent",
    "replace:sent" or "rollback:sent" between a commit and its journaling
    (progress reports, and fault injection in the tests).
    """

    def __init__(
        self,
        backend: ProcessBackend,
        journal: Journal | None = None,
        *,
        allow_unsigned: bool = False,
        trusted_keys: Iterable[bytes] | None = None,
        max_attempts: int = 50,
        retry_sleep_ms: int = 2,
        release_attempts: int = 20,
        release_wait: float = 0.01,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.pid = backend.pid
        self.start_time = backend.process_start_time()
        self.journal = journal if journal is not None else Journal()
        self.process_journal: ProcessJournal = self.journal.process(self.pid, self.start_time)
        self.allow_unsigned = allow_unsigned
        # None: the trust store of this machine and user (hotpatch/package/trust.py)
        self.trusted_keys = (
            TrustStore.default().raw_keys() if trusted_keys is None else normalize_public_keys(list(trusted_keys))
        )
        self.max_attempts = max_attempts
        self.retry_sleep_ms = retry_sleep_ms
        self.release_attempts = release_attempts
        self.release_wait = release_wait
        self.on_step = on_step
        self._verified: list[PackageRecord] = []  # records that passed verify_record (held, so ids stay unique)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction holding the process's journal lock; undone entirely if anything in it fails."""
        with self.process_journal.locked():
            tx = Transaction(self)
            try:
                yield tx
            except BaseException:
                tx.abort()
                raise
            tx.finish()

    # -- shared pieces -----------------------------------------------------------

    def check_signature(self, package: Package) -> None:
        check_trust(package, self.trusted_keys, self.allow_unsigned)

    def find_module(self, package: Package) -> LoadedImage:
        name = package.target.module_name.lower()
        candidates = [m for m in self.backend.modules() if m.name.lower() == name]
        if not candidates:
            raise RefusedError(f"{package.target.module_name} is not loaded in process {self.pid}")
        mismatches = []
        for module in candidates:
            image = read_image(self.backend, module)
            try:
                check_identity(image, package.target)
                return image
            except IdentityMismatchError as exc:
                mismatches.append(str(exc))
        raise IdentityMismatchError("; ".join(mismatches) + f" (the package is for baseline {package.baseline_id}: "
                                    "a restart onto that baseline is needed)")

    def allocate(self, image: LoadedImage, size: int) -> int:
        """A region within rel32 reach of the whole image, above it when possible.

        Above the image every IMAGE_REL32 value (new code, relative to the
        module base) stays positive; below it is the fallback.
        """
        soi = image.size_of_image
        try:
            center = image.base_va + (soi + REL32_REACH) // 2
            return self.backend.allocate_near(center, size, PAGE_READWRITE, (REL32_REACH - soi) // 2)
        except ProcessGoneError:
            raise
        except BackendError:
            return self.backend.allocate_near(image.base_va + soi // 2, size, PAGE_READWRITE, REL32_REACH - soi // 2)

    def read_byte(self, va: int) -> int:
        return self.backend.read(va, 1)[0]

    def code_unused(self, va: int, size: int) -> bool:
        """No thread runs [va, va+size) or has a stack slot pointing into it, in one of a few snapshots."""
        for attempt in range(self.release_attempts):
            snapshot = self.backend.thread_contexts(va, size)
            if not any(va <= t.rip < va + size or t.stack_hits for t in snapshot.threads):
                return True
            if attempt + 1 < self.release_attempts:
                time.sleep(self.release_wait)
        return False

    def verify_record(self, record: PackageRecord, sites: bool = True) -> list[SiteRedirect]:
        """Check a record read from the journal against its kept package and the target's memory
        (provenance.py); returns the sites derived again from the package. ``JournalError`` if not."""
        package = self.process_journal.kept_package(record)
        layout = plan_layout(package, _thunk_keys(package))
        allocation = record.allocation
        if allocation is not None and allocation.state in (ALLOCATED, RETAINED):
            check_allocation(self.backend, record, package, layout, self.start_time)
        elif record.function_table is not None and record.function_table.state in (INTENT, REGISTERED):
            raise JournalError(f"journal record of package {record.package_id} refused: a function table "
                               "without a live allocation; nothing was changed")
        check_libraries(self.backend, record, package)
        derived = derive_sites(self.backend, record, package, layout) if sites else []
        self._verified.append(record)  # the same object, later in this engine's life: no second round of reads
        return derived

    def release(self, record: PackageRecord, check_threads: bool = True, verify: bool = True) -> bool:
        """Delete the function table, free the region and the libraries of a package no longer reachable.

        Returns False, with the allocation marked "retained", when a thread
        still runs the code or returns into it; a later release retries.
        ``verify`` (a record read from the journal, not one this engine just
        made) checks first that the region, table and libraries are ours.
        """
        journal = self.process_journal
        allocation = record.allocation
        live = allocation is not None and allocation.state in (ALLOCATED, RETAINED)
        if verify and not any(r is record for r in self._verified):
            self.verify_record(record, sites=False)
        if live and check_threads and not self.code_unused(allocation.va, allocation.size):
            if allocation.state != RETAINED:
                allocation.state = RETAINED
                journal.event(record, "release", "retained", va=allocation.va)
            return False
        table = record.function_table
        if table is not None and table.state in (INTENT, REGISTERED):
            deleted = call_function(self.backend, system_function(self.backend, "RtlDeleteFunctionTable"), table.va)
            if table.state == REGISTERED and not deleted & 0xFF:
                raise BackendError(f"RtlDeleteFunctionTable({table.va:#x}) returned FALSE")
            table.state = DELETED
            journal.event(record, "unwind", "deleted", va=table.va)
        if live:
            self.backend.free(allocation.va)
            allocation.state = FREED
            journal.event(record, "release", "freed", va=allocation.va)
        for library in record.libraries:
            if library.state == LOADED:
                free_library(self.backend, library.hmodule)
                library.state = FREED
                journal.event(record, "library", "freed", dll=library.dll)
        return True

    def process_exited(self) -> bool:
        """Whether the process this engine was opened on has exited (its pid gone or reused)."""
        try:
            return self.backend.process_start_time() != self.start_time
        except ProcessGoneError:
            return True
        except HotpatchError:
            return False

    def commit_outcome(self, writes: list[CommitWrite]) -> str:
        """"new" if memory holds every write's new bytes, "expected" if none landed, else "mixed"."""
        found = [self.backend.read(w.va, len(w.new)) for w in writes]
        if all(f == w.new for f, w in zip(found, writes)):
            return "new"
        if all(f == w.expected for f, w in zip(found, writes)):
            return "expected"
        return "mixed"

    # -- status and recovery -----------------------------------------------------

    def status(self) -> ProcessStatus:
        """Every package the journal knows to be in the process, read back from memory."""
        self.process_journal.load()
        return process_status(self.backend, self.process_journal)

    def recover(self) -> RecoveryReport:
        """Bring every journaled operation that was cut short to an end, as memory says it stands."""
        report = RecoveryReport(self.pid)
        with self.process_journal.locked() as journal:
            for record in list(journal.records):
                before = record.phase
                try:
                    outcome, note = self._recover_record(record)
                except JournalError as exc:  # the journal does not match the package or the target's memory
                    outcome, note = "inconsistent", str(exc)
                if outcome:
                    report.actions.append(
                        {
                            "serial": record.serial,
                            "package_id": record.package_id,
                            "before": before,
                            "after": record.phase,
                            "outcome": outcome,
                            "allocation": record.allocation.state if record.allocation else None,
                            "note": note,
                        }
                    )
            journal.save()
        return report

    def _recover_record(self, record: PackageRecord) -> tuple[str, str]:
        journal = self.process_journal
        commit = record.commit
        if record.phase in (APPLYING, ROLLING_BACK):
            pending = commit is not None and commit.state == PENDING
            outcome = self.commit_outcome(commit.writes) if pending and commit else "expected"
            if outcome == "mixed":
                return "inconsistent", "memory holds part of a commit: foreign changes; left as it is"
            if record.phase == APPLYING:
                if outcome == "new":
                    self.mark_applied(record)
                    if record.replaces is not None:
                        self.release(journal.record(record.replaces))
                    return "completed", "the commit had happened: the package is applied"
                if commit is not None:
                    commit.state = FAILED
                record.phase = UNDONE
                journal.event(record, "recover", "undo")
                lost = record.allocation is not None and record.allocation.state == INTENT
                self.release(record, check_threads=False)
                note = "the commit had not happened: allocation, function table and libraries removed"
                if lost:
                    note += "; an allocation was requested but its address was never journaled: it may have leaked"
                return "undone", note
            if outcome == "new":
                self.mark_rolled_back(record)
                released = self.release(record)
                return "completed", "the rollback's commit had happened" + ("" if released else "; code retained")
            if commit is not None:
                commit.state = FAILED
            record.phase = APPLIED
            journal.event(record, "recover", "still applied")
            return "kept", "the rollback's commit had not happened: the package is still applied"
        if record.allocation is not None and record.allocation.state in (ALLOCATED, RETAINED) and not record.live:
            released = self.release(record)
            return ("released" if released else "retained"), "code of a package no longer applied"
        if record.phase == APPLIED:
            try:
                states = {site_state(self.backend, site).state for site in record.sites}
            except ProcessGoneError:
                raise
            except BackendError as exc:
                return "inconsistent", f"sites cannot be read: {exc}"
            if states == {OURS}:
                return "verified", "every site holds our redirect"
            return "inconsistent", f"sites found {', '.join(sorted(states))}"
        return "", ""

    def mark_applied(self, record: PackageRecord) -> None:
        journal = self.process_journal
        record.phase = APPLIED
        if record.commit is not None:
            record.commit.state = DONE
        if record.replaces is not None:
            old = journal.record(record.replaces)
            old.phase = REPLACED
            old.replaced_by = record.serial
        journal.event(record, "commit", "done")

    def mark_rolled_back(self, record: PackageRecord) -> None:
        record.phase = ROLLED_BACK
        if record.commit is not None:
            record.commit.state = DONE
        self.process_journal.event(record, "commit", "done")


# --------------------------------------------------------------------------
# The transaction
# --------------------------------------------------------------------------


class Transaction:
    """Operations on one process; the first failure undoes all of them (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.results: list[ApplyResult | RollbackResult] = []
        self.error: StepFailedError | None = None
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._finalize: list[Callable[[], None]] = []
        self._unsafe = False
        self._durations: dict[str, float] = {}

    # -- bookkeeping -------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str, what: str) -> Iterator[None]:
        if self.error is not None:
            raise self.error
        if self.engine.on_step is not None:
            self.engine.on_step(name)
        started = time.perf_counter()
        try:
            yield
        except HotpatchError as exc:
            self._fail(name, what, exc)
        self._durations[name] = round((time.perf_counter() - started) * 1000, 3)

    def _fail(self, step: str, what: str, cause: HotpatchError) -> None:
        engine = self.engine
        if isinstance(cause, ProcessGoneError) or engine.process_exited():
            # Whatever the call that failed says (a read "failed with error 5"), the process is gone and
            # took every change with it: nothing to undo or recover, and its journal is closed.
            self._undo.clear()
            self._finalize.clear()
            engine.process_journal.close()
            gone = cause if isinstance(cause, ProcessGoneError) else ProcessGoneError(str(cause), engine.pid)
            self.error = StepFailedError(
                f"{what}: step {step}: process {engine.pid} exited; nothing is left to undo, its journal is closed",
                step, gone, undone=True,
            )
            raise self.error from cause
        touched = bool(self._undo)
        if self._unsafe:
            problems = ["the commit's outcome is unknown, so nothing was undone"]
        else:
            problems = self._run_undo()
        undone = not problems
        message = f"{what}: step {step} failed: {cause}"
        if undone:
            message += "; everything done was undone" if touched else "; nothing was changed"
        else:
            message += f"; undo failed ({'; '.join(problems)}): run `hotpatch recover --pid {self.engine.pid}`"
        self.error = StepFailedError(message, step, cause, undone)
        raise self.error from cause

    def _run_undo(self) -> list[str]:
        problems = []
        while self._undo:
            name, undo = self._undo.pop()
            try:
                undo()
            except ProcessGoneError:
                self._undo.clear()  # the process took everything with it: nothing is left to undo
            except HotpatchError as exc:
                problems.append(f"{name}: {exc}")
        self._finalize.clear()
        return problems

    def abort(self) -> None:
        """Undo everything (the transaction's block raised)."""
        if self.error is None and not self._unsafe:
            self._run_undo()

    def finish(self) -> None:
        """End of a successful transaction: free what the commits made unreachable."""
        self._undo.clear()
        for action in self._finalize:
            try:
                action()
            except HotpatchError:
                pass  # the allocation stays recorded as allocated/retained; recover frees it later
        self._finalize.clear()

    def _sweep_retained(self) -> None:
        """Retry freeing code retained by earlier operations (their threads have usually moved on)."""
        for record in self.engine.process_journal.records:
            if not record.live and record.allocation is not None and record.allocation.state == RETAINED:
                with contextlib.suppress(ProcessGoneError, BackendError, JournalError):
                    self.engine.release(record)  # a record that fails its checks is left to recover

    # -- apply --------------------------------------------------------------------

    def apply(self, package: Package, dry_run: bool = False) -> ApplyResult:
        """Apply ``package`` (replacing an older one of its baseline); with ``dry_run`` only check."""
        engine = self.engine
        backend = engine.backend
        journal = engine.process_journal
        what = f"apply {package_id_of(package)} to process {engine.pid}"
        self._durations = {}
        with self._step("signature", what):
            engine.check_signature(package)
        with self._step("module", what):
            image = engine.find_module(package)
        with self._step("journal", what):
            live = journal.live(image.module.name)
            predecessor = self._predecessor(package, live)
            if predecessor is not None:  # its redirects and original bytes are what the commit restores
                predecessor.sites = engine.verify_record(predecessor)
        with self._step("sites", what):
            self._check_sites(package, image, predecessor)
        with self._step("code hash", what):
            ours = [patch for record in live for patch in record.patches]
            code_hash = code_sha256(backend, image, package.target.code_sha256, ours)
            if code_hash.state == "mismatch":
                raise IdentityMismatchError(
                    f"{image.module.name}: code SHA-256 {code_hash.sha256} is not the baseline's "
                    f"{package.target.code_sha256.hex()} ({code_hash.note})"
                )
        result = ApplyResult(
            engine.pid, package_id_of(package), image.module.name, image.base_va, "dry-run", package.sequence,
            code_hash=code_hash, replaced=predecessor.package_id if predecessor else None,
        )
        if dry_run:
            with self._step("imports", what):
                resolver = ImportResolver(backend, load_missing=False)
                result.imports = [resolver.resolve(t) for t in _imports(package)]
            result.allocation_size = plan_layout(package, _thunk_keys(package)).size
            result.durations_ms = dict(self._durations)
            self.results.append(result)
            return result

        self._sweep_retained()
        record = journal.new_record(
            package_sha256=journal.keep_package(package),
            package_id=package_id_of(package),
            baseline_id=package.baseline_id,
            sequence=package.sequence,
            module_name=image.module.name,
            module_base=image.base_va,
            description=package.metadata.description,
        )
        journal.event(record, "begin", INTENT, save=False)  # saved with the first resource
        self._undo.append(("journal", lambda: self._set_phase(record, UNDONE)))
        self._undo.append(("release", lambda: self._release_now(record)))
        with self._step("imports", what):
            resolver = ImportResolver(backend, on_load=lambda dll, state, h: self._library(record, dll, state, h))
            imports = {_import_key(t): resolver.resolve(t) for t in _imports(package)}
            result.imports = list(imports.values())
        with self._step("allocate", what):
            layout = plan_layout(package, _thunk_keys(package))
            record.allocation = AllocationRecord(size=layout.size)
            journal.event(record, "allocate", INTENT, size=layout.size)
            base_va = engine.allocate(image, layout.size)
            record.allocation.va = base_va
            record.allocation.state = ALLOCATED
            record.allocation.parts = [
                {"name": p.name, "va": base_va + p.offset, "size": p.size, "protect": p.protect} for p in layout.parts
            ]
            journal.event(record, "allocate", DONE, va=base_va)
        with self._step("write", what):
            marker = region_marker(content_sha256_of(package), base_va, engine.start_time)
            parts = build_parts(package, layout, base_va, image.base_va, imports, marker)
            offsets = {p.name: p.offset for p in layout.parts}
            for name, data in parts.items():
                backend.write(base_va + offsets[name], data)
            journal.event(record, "write", DONE, save=False, bytes=sum(len(d) for d in parts.values()))
        with self._step("protect", what):
            for part in layout.parts:
                if part.protect != PAGE_READWRITE:
                    backend.protect(base_va + part.offset, part.size, part.protect)
            code = next((p for p in layout.parts if p.name == "code"), None)
            if code is not None:
                backend.flush(base_va, code.size)
        if package.unwind:
            with self._step("unwind", what):
                self._register_unwind(record, base_va + layout.table_offset, layout.table_count, base_va)
        with self._step("plan", what):
            record.sites = [
                plan_site(site, image.base_va, base_va + layout.blob_offsets[site.target_blob] + site.target_offset)
                for site in package.sites
            ]
            old = predecessor.patches if predecessor is not None else []
            writes = transition_writes(old, record.patches, engine.read_byte)
        with self._step("commit", what):
            report = self._commit(record, writes, "replace" if predecessor else "apply", predecessor)
        result.status = "applied"
        result.serial = record.serial
        result.allocation_va, result.allocation_size = base_va, layout.size
        result.blob_vas = {index: base_va + offset for index, offset in enumerate(layout.blob_offsets)}
        result.function_table_va = record.function_table.va if record.function_table else 0
        result.sites = list(record.sites)
        result.commit = report
        if predecessor is not None:
            self._finalize.append(lambda: self._release_replaced(predecessor, result))
        result.durations_ms = dict(self._durations)
        self.results.append(result)
        return result

    def _predecessor(self, package: Package, live: list[PackageRecord]) -> PackageRecord | None:
        predecessor = None
        for record in live:
            if record.baseline_id != package.baseline_id:
                # a process runs one baseline of a module: packages of another need it restarted
                raise OtherBaselineError(
                    f"package {package_id_of(package)} is for baseline {package.baseline_id}, but process "
                    f"{self.engine.pid} runs baseline {record.baseline_id} of {record.module_name} (package "
                    f"{record.package_id}): a restart onto baseline {package.baseline_id} is needed"
                )
            if record.phase != APPLIED:
                raise RefusedError(
                    f"package {record.package_id} is in the middle of an operation ({record.phase}); "
                    f"run `hotpatch recover --pid {self.engine.pid}` first"
                )
            if record.package_id == package_id_of(package):
                raise SequenceError(f"package {package_id_of(package)} is already applied")
            if package.sequence <= record.sequence:
                raise SequenceError(
                    f"package {package_id_of(package)} has sequence {package.sequence}, but {record.package_id} "
                    f"with sequence {record.sequence} of baseline {record.baseline_id} is already applied"
                )
            predecessor = record
        return predecessor

    def _check_sites(self, package: Package, image: LoadedImage, predecessor: PackageRecord | None) -> None:
        backend = self.engine.backend
        live = self.engine.process_journal.live(image.module.name)
        ours = {}  # va -> redirect byte of every live package of this module
        replaced = {}  # va -> byte the predecessor put there
        for record in live:
            for patch in record.patches:
                for i, byte in enumerate(patch.redirect):
                    ours[patch.va + i] = byte
                    if record is predecessor:
                        replaced[patch.va + i] = byte
        for site in package.sites:
            ranges = [(site.rva, site.expected)]
            if site.padding_rva is not None:
                ranges.append((site.padding_rva, site.padding_expected))
            for rva, expected in ranges:
                va = image.base_va + rva
                found = backend.read(va, len(expected))
                wanted = bytes(replaced.get(va + i, expected[i]) for i in range(len(expected)))
                if found == wanted:
                    continue
                where = f"site {site.function} ({va:#x}{', padding' if rva != site.rva else ''})"
                if any(va + i in ours and va + i not in replaced for i in range(len(expected))):
                    raise SiteMismatchError(f"{where} is redirected by another applied package", va, found)
                raise SiteMismatchError(
                    f"foreign bytes at {where}: expected {wanted.hex()}, found {found.hex()}", va, found
                )
        if predecessor is not None:
            for site in predecessor.sites:
                state = site_state(backend, site)
                if state.state != OURS:
                    raise SiteMismatchError(
                        f"foreign bytes at site {site.function} of package {predecessor.package_id}: "
                        f"found {state.found}, our redirect is {' '.join(p.redirect.hex() for p in site.patches)}",
                        site.patches[0].va,
                    )

    def _library(self, record: PackageRecord, dll: str, state: str, hmodule: int) -> None:
        journal = self.engine.process_journal
        if state == INTENT:
            record.libraries.append(LibraryRecord(dll))
        else:
            library = next(lib for lib in reversed(record.libraries) if lib.dll == dll and lib.state == INTENT)
            library.hmodule, library.state = hmodule, LOADED
        journal.event(record, "library", state, dll=dll, hmodule=hmodule)

    def _register_unwind(self, record: PackageRecord, table_va: int, count: int, base_va: int) -> None:
        backend = self.engine.backend
        journal = self.engine.process_journal
        add = system_function(backend, "RtlAddFunctionTable", ("ntdll.dll", "kernel32.dll"))
        record.function_table = TableRecord(table_va, count, base_va)
        journal.event(record, "unwind", INTENT, va=table_va, count=count)
        if not call_function(backend, add, table_va, count, base_va) & 0xFF:
            raise BackendError(f"RtlAddFunctionTable({table_va:#x}, {count}, {base_va:#x}) returned FALSE")
        record.function_table.state = REGISTERED
        journal.event(record, "unwind", REGISTERED, va=table_va)

    def _commit(
        self, record: PackageRecord, writes: list[CommitWrite], kind: str, predecessor: PackageRecord | None = None
    ) -> CommitReport:
        engine = self.engine
        journal = engine.process_journal
        record.commit = CommitRecord(kind, writes)
        if predecessor is not None:
            record.replaces = predecessor.serial
        journal.event(record, "commit", INTENT, kind=kind, writes=len(writes))
        if not writes:  # a package without sites (new code nothing jumps to yet): nothing to stop threads for
            report = CommitReport(0.0, 0.0, 0, False, 0)
            self._after_commit(record, kind, predecessor, report)
            return report
        try:
            report = engine.backend.commit(writes, engine.max_attempts, engine.retry_sleep_ms)
        except (BusyError, BytesMismatchError):
            self._commit_failed(record, kind)  # the agent wrote nothing
            raise
        except ProcessGoneError:
            raise
        except BackendError:
            outcome = self._outcome_after_error(writes)
            if outcome == "new":  # it happened after all: treat as done, then let the undo revert it
                self._after_commit(record, kind, predecessor, None)
            elif outcome == "expected":
                self._commit_failed(record, kind)
            else:
                self._unsafe = True
            raise
        if engine.on_step is not None:
            engine.on_step(f"{kind}:sent")  # written, not yet journaled: where a crash leaves recover the most to do
        self._after_commit(record, kind, predecessor, report)
        return report

    def _commit_failed(self, record: PackageRecord, kind: str) -> None:
        assert record.commit is not None
        record.commit.state = FAILED
        if kind == "rollback":
            record.phase = APPLIED  # nothing was written: still applied
        self.engine.process_journal.event(record, "commit", FAILED)

    def _outcome_after_error(self, writes: list[CommitWrite]) -> str:
        try:
            return self.engine.commit_outcome(writes)
        except HotpatchError:
            return "unknown"

    def _after_commit(
        self, record: PackageRecord, kind: str, predecessor: PackageRecord | None, report: CommitReport | None
    ) -> None:
        engine = self.engine
        assert record.commit is not None
        record.commit.report = asdict(report) if report else None
        if kind == "rollback":
            engine.mark_rolled_back(record)
            self._undo.append(("commit", lambda: self._reapply(record)))
        else:
            engine.mark_applied(record)
            self._undo.append(("commit", lambda: self._unapply(record, predecessor)))

    def _unapply(self, record: PackageRecord, predecessor: PackageRecord | None) -> None:
        """Undo a commit of this transaction: back to the predecessor's redirects, or to the original bytes."""
        engine = self.engine
        old = predecessor.patches if predecessor is not None else []
        writes = transition_writes(record.patches, old, engine.read_byte)
        if writes:
            engine.backend.commit(writes, engine.max_attempts, engine.retry_sleep_ms)
        if predecessor is not None:
            predecessor.phase = APPLIED
            predecessor.replaced_by = None
        record.phase = UNDONE
        engine.process_journal.event(record, "commit", "undone")

    def _reapply(self, record: PackageRecord) -> None:
        engine = self.engine
        writes = transition_writes([], record.patches)
        if writes:
            engine.backend.commit(writes, engine.max_attempts, engine.retry_sleep_ms)
        record.phase = APPLIED
        engine.process_journal.event(record, "rollback", "undone")

    def _release_now(self, record: PackageRecord) -> None:
        committed = record.commit is not None and record.commit.state == DONE
        self.engine.release(record, check_threads=committed, verify=False)  # made by this transaction

    def _set_phase(self, record: PackageRecord, phase: str) -> None:
        record.phase = phase
        self.engine.process_journal.event(record, "phase", phase)

    def _release_replaced(self, predecessor: PackageRecord, result: ApplyResult) -> None:
        result.replaced_released = self.engine.release(predecessor)

    # -- rollback ------------------------------------------------------------------

    def rollback(self, package_id: str | None = None) -> list[RollbackResult]:
        """Take applied packages out (all of them, newest first, or the one named).

        Each site must hold exactly our redirect; the original bytes go back
        in one commit per package. The code is freed at the end of the
        transaction if no thread runs it or returns into it, else retained.
        """
        engine = self.engine
        journal = engine.process_journal
        what = f"rollback{' ' + package_id if package_id else ''} in process {engine.pid}"
        self._durations = {}
        with self._step("journal", what):
            applied = [r for r in journal.records if r.phase == APPLIED]
            busy = [r for r in journal.records if r.phase in (APPLYING, ROLLING_BACK)]
            if busy:
                raise RefusedError(
                    f"package {busy[0].package_id} is in the middle of an operation ({busy[0].phase}); "
                    f"run `hotpatch recover --pid {engine.pid}` first"
                )
            if package_id is not None:
                applied = [r for r in applied if r.package_id == package_id]
                if not applied:
                    raise RefusedError(f"package {package_id} is not applied to process {engine.pid}")
            if not applied:
                raise RefusedError(f"no package is applied to process {engine.pid}")
        results = []
        for record in reversed(applied):
            with self._step("provenance", what):  # the journal alone never decides what is written
                record.sites = engine.verify_record(record)
            with self._step("sites", what):
                for site in record.sites:
                    state = site_state(engine.backend, site)
                    if state.state != OURS:
                        raise SiteMismatchError(
                            f"foreign bytes at site {site.function} ({site.patches[-1].va:#x}) of package "
                            f"{record.package_id}: found {state.found}, our redirect is "
                            f"{' '.join(p.redirect.hex() for p in site.patches)}",
                            site.patches[-1].va,
                        )
            with self._step("commit", what):
                writes = transition_writes(record.patches, [], engine.read_byte)
                record.phase = ROLLING_BACK
                report = self._commit(record, writes, "rollback")
            result = RollbackResult(engine.pid, record.package_id, record.serial, report)
            self._finalize.append(lambda record=record, result=result: self._release_rolled_back(record, result))
            results.append(result)
            self.results.append(result)
        return results

    def _release_rolled_back(self, record: PackageRecord, result: RollbackResult) -> None:
        result.released = self.engine.release(record)


def _imports(package: Package) -> list[ImportTarget]:
    seen: dict[tuple[str, str], ImportTarget] = {}
    for fixup in package.fixups:
        if isinstance(fixup.target, ImportTarget):
            seen.setdefault(_import_key(fixup.target), fixup.target)
    return list(seen.values())


def _thunk_keys(package: Package) -> list[str]:
    keys: dict[str, None] = {}
    for fixup in package.fixups:
        key = _thunk_key(fixup)
        if key is not None:
            keys.setdefault(key)
    return list(keys)

