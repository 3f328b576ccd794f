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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

from ..errors import (
    BackendError,
    BusyError,
    BytesMismatchError,
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
from ..package.model import Package
from ..process.win32mem import PAGE_READWRITE
from .allocation import build_parts, import_key, package_imports, plan_layout, thunk_keys
from .backend import CommitReport, CommitWrite, call_function
from .enginetypes import EngineView
from .imports import ImportResolver, system_function
from .journal import (
    ALLOCATED,
    APPLIED,
    APPLYING,
    DONE,
    FAILED,
    INTENT,
    LOADED,
    REGISTERED,
    RETAINED,
    ROLLING_BACK,
    UNDONE,
    AllocationRecord,
    CommitRecord,
    LibraryRecord,
    PackageRecord,
    TableRecord,
)
from .provenance import region_marker
from .redirects import plan_site, transition_writes
from .results import ApplyResult, RollbackResult
from .status import OURS, LoadedImage, code_sha256, site_state

__all__ = ["Transaction"]


class Transaction:
    """Operations on one process; the first failure undoes all of them (see the module docstring)."""

    def __init__(self, engine: EngineView) -> None:
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
                result.imports = [resolver.resolve(t) for t in package_imports(package)]
            result.allocation_size = plan_layout(package, thunk_keys(package)).size
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
            imports = {import_key(t): resolver.resolve(t) for t in package_imports(package)}
            result.imports = list(imports.values())
        with self._step("allocate", what):
            layout = plan_layout(package, thunk_keys(package))
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
                engine.refuse_reused_pid(package_id)  # the package went into an earlier process at this pid
                raise RefusedError(f"package {package_id} is not applied to process {engine.pid}" if package_id
                                   else f"no package is applied to process {engine.pid}")
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
