"""The apply engine: one process, its journal, the signature policy, and the pieces its transactions share.

    with Engine(backend, Journal()).transaction() as tx:
        result = tx.apply(package)          # or tx.rollback(package_id)

The transaction (transaction.py) does the steps; the allocation's layout is
allocation.py's, the result records results.py's, recovery recovery.py's.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterable, Iterator

from ..errors import (
    BackendError,
    HotpatchError,
    IdentityMismatchError,
    JournalError,
    PidReusedError,
    ProcessGoneError,
    RefusedError,
)
from ..package.model import Package
from ..package.signing import normalize_public_keys
from ..package.trust import TrustStore, check_trust
from ..process.win32mem import PAGE_READWRITE
from .allocation import build_parts, plan_layout, thunk_keys
from .backend import REL32_REACH, CommitWrite, ProcessBackend, call_function
from .imports import free_library, system_function
from .journal import (
    ALLOCATED,
    APPLIED,
    DELETED,
    DONE,
    FREED,
    INTENT,
    LOADED,
    REGISTERED,
    REPLACED,
    RETAINED,
    ROLLED_BACK,
    Journal,
    PackageRecord,
    ProcessJournal,
)
from .provenance import check_allocation, check_libraries, derive_sites
from .recovery import recover
from .redirects import SiteRedirect
from .region import Layout
from .results import ApplyResult, RecoveryReport, RollbackResult
from .status import LoadedImage, ProcessStatus, check_identity, process_status, read_image
from .transaction import Transaction

__all__ = [
    "ApplyResult",
    "Engine",
    "Layout",
    "RecoveryReport",
    "RollbackResult",
    "Transaction",
    "build_parts",
    "plan_layout",
]


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
        layout = plan_layout(package, thunk_keys(package))
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

    def refuse_reused_pid(self, package_id: str | None = None) -> None:
        """Raise ``PidReusedError`` when the journal holds ``package_id`` (or any package) as live in an earlier
        process at this pid: Windows and Wine reuse pids, and a journal of this pid with another start time
        belongs to a process that has exited, never to this one, whatever modules it has loaded."""
        for pid, start in self.journal.known():
            if pid != self.pid or start == self.start_time:
                continue
            with contextlib.suppress(JournalError):  # an unreadable journal names nothing here
                live = [r.package_id for r in self.journal.process(pid, start).live()]
                if live and (package_id is None or package_id in live):
                    raise PidReusedError(
                        f"process {pid} started {_filetime_text(self.start_time)} is not the process "
                        f"{package_id or ', '.join(live)} went into (pid {pid}, started {_filetime_text(start)}): "
                        "that one has exited and its pid was reused")

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
        """Bring every journaled operation that was cut short to an end, as memory says it stands; then remove
        the kept packages no record needs (a crash may have left some)."""
        report = recover(self)
        with contextlib.suppress(JournalError, OSError):  # a package left over harms nothing
            self.journal.prune_packages()
        return report

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


def _filetime_text(filetime: int) -> str:
    """A process start time (FILETIME: 100 ns units since 1601) as UTC, to the second."""
    moment = datetime.datetime(1601, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(microseconds=filetime // 10)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
