"""The process backend interface, its model, and helpers every backend gets for free.

A backend is one target process seen through the operations a live patch
needs: its modules, memory (read, write, query, allocate near, free,
protect), the instruction cache, a call into the target, and the commit: the
stop-the-world step that checks no thread is inside the bytes to change and
writes them. ``AgentProcessBackend`` (hotpatch.apply.agent) implements it for
real Windows processes through hotpatch-agent.exe; an emulator backend
implements the same interface.

Built on the interface, not on a backend: ``find_export`` (an export's VA read
from the target's own memory) and ``call_function`` (a call with up to four
integer arguments and a 64-bit result, through a keystone-assembled stub).
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..errors import BackendError, ImageError, RemoteTimeoutError
from ..pe.headers import DIRECTORY_EXPORT, first_page, read_headers
from ..win32mem import (
    PAGE_EXECUTE_READ,
    PAGE_READWRITE,
    Region,
)

__all__ = [
    "CALL_STUB_ASM",
    "REL32_REACH",
    "CommitReport",
    "CommitWrite",
    "Module",
    "ProcessBackend",
    "ThreadState",
    "ThreadSnapshot",
    "call_function",
    "call_stub",
    "find_export",
]

#: Default reach of allocate_near: every byte within 2 GiB minus one 64 KiB granule.
REL32_REACH = 0x7FFF0000

@dataclass(frozen=True)
class Module:
    """A module loaded in the target: where it is mapped, and from which file."""

    name: str
    path: str
    base_va: int
    size: int
    #: the image's preferred base when the backend knows it from the file it mapped (the emulator, which
    #: rewrites the header's ImageBase as Windows does); None: only the header in memory tells
    preferred_base: int | None = None

    def contains(self, va: int) -> bool:
        return self.base_va <= va < self.base_va + self.size


@dataclass(frozen=True)
class CommitWrite:
    """One write of a commit: ``new`` replaces ``expected`` at ``va``.

    ``no_suspend`` marks a write that is atomic on its own (the aligned 2-byte
    short jump into padding): a commit made only of such writes does not
    suspend the target's threads. The writes are done in the order given.
    """

    va: int
    expected: bytes
    new: bytes
    no_suspend: bool = False

    def __post_init__(self) -> None:
        if len(self.expected) != len(self.new) or not self.new:
            raise ValueError(f"write at {self.va:#x}: expected and new bytes must have the same non-zero length")


@dataclass(frozen=True)
class CommitReport:
    """What a commit (or the suspend/resume floor) cost."""

    pause_us: float  # first suspend to last resume; 0 when nothing was suspended
    total_us: float  # the whole request inside the backend
    attempts: int  # freezes needed before no thread was inside the bytes
    suspended: bool  # whether threads were suspended at all
    threads: int  # threads suspended in the final freeze
    per_thread: bool = False  # each thread suspended on its own rather than the whole process at once


@dataclass(frozen=True)
class ThreadState:
    """A thread seen while every thread was suspended."""

    thread_id: int
    rip: int
    rsp: int
    stack_base: int  # 0 when unknown
    stack_hits: int  # stack slots from rsp to stack_base that point into the watched range


@dataclass(frozen=True)
class ThreadSnapshot:
    pause_us: float
    threads: tuple[ThreadState, ...]


class ProcessBackend(abc.ABC):
    """One target process. Addresses are virtual addresses in the target."""

    pid: int

    @abc.abstractmethod
    def modules(self) -> list[Module]:
        """Modules loaded in the target, main executable first."""

    @abc.abstractmethod
    def read(self, va: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, va: int, data: bytes) -> None:
        """Write through page protection (restored afterwards) and flush the instruction cache."""

    @abc.abstractmethod
    def query(self, va: int) -> Region: ...

    @abc.abstractmethod
    def allocate_near(self, va: int, size: int, protect: int, reach: int = REL32_REACH) -> int:
        """Commit ``size`` bytes, every one within ``reach`` of ``va`` (anywhere when ``va`` is 0)."""

    @abc.abstractmethod
    def free(self, va: int) -> None:
        """Release an allocation made by ``allocate_near``."""

    @abc.abstractmethod
    def protect(self, va: int, size: int, protect: int) -> int:
        """Change protection; returns the previous protection of the first page."""

    @abc.abstractmethod
    def flush(self, va: int, size: int) -> None: ...

    @abc.abstractmethod
    def remote_call(self, function_va: int, arg: int, timeout: float = 10.0, wait: bool = True) -> int:
        """Run ``function_va(arg)`` on a new thread of the target; its 32-bit exit code.

        With ``wait=False`` the thread is left running and its thread id is returned.
        """

    @abc.abstractmethod
    def commit(self, writes: Sequence[CommitWrite], max_attempts: int = 50, retry_sleep_ms: int = 2) -> CommitReport:
        """All writes or none, with every thread out of the bytes that change (see CommitWrite)."""

    @abc.abstractmethod
    def suspend_resume_floor(self) -> CommitReport:
        """Suspend and resume every thread once with nothing written: the pause's lower bound."""

    @abc.abstractmethod
    def thread_contexts(self, watch_va: int = 0, watch_size: int = 0) -> ThreadSnapshot:
        """Every thread's RIP and RSP, and stack slots pointing into [watch_va, watch_va + watch_size)."""

    @abc.abstractmethod
    def process_start_time(self) -> int:
        """Creation time (FILETIME, 100 ns since 1601): tells a reused pid apart."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ProcessBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Exports read from the target's memory
# --------------------------------------------------------------------------

_MAX_EXPORTS = 1 << 16


def find_export(backend: ProcessBackend, module: Module, name: str, _depth: int = 0) -> int:
    """The VA of export ``name`` of ``module``, from its export directory in the target.

    Forwarded exports ("OTHER.Name") are followed into the module they name.
    """
    try:
        headers = read_headers(first_page(lambda offset, size: backend.read(module.base_va + offset, size)),
                               f"{module.name} at {module.base_va:#x}")
    except ImageError as exc:
        raise BackendError(f"{module.name}: no PE header in memory ({exc})") from None
    export_rva, export_size = headers.directory(DIRECTORY_EXPORT)
    if not export_rva or export_rva + 40 > module.size:
        raise BackendError(f"{module.name} has no export directory")
    directory = backend.read(module.base_va + export_rva, 40)
    count_functions, count_names, functions_rva, names_rva, ordinals_rva = struct.unpack_from("<IIIII", directory, 20)
    if count_names > _MAX_EXPORTS or count_functions > _MAX_EXPORTS:
        raise BackendError(f"{module.name}: implausible export directory")
    if not count_names:
        raise BackendError(f"{module.name} exports no function named {name}")
    name_rvas = struct.unpack(f"<{count_names}I", backend.read(module.base_va + names_rva, 4 * count_names))
    ordinals = struct.unpack(f"<{count_names}H", backend.read(module.base_va + ordinals_rva, 2 * count_names))
    wanted = name.encode()
    for name_rva, ordinal in zip(name_rvas, ordinals):
        if backend.read(module.base_va + name_rva, len(wanted) + 1) != wanted + b"\0":
            continue
        if ordinal >= count_functions:
            raise BackendError(f"{module.name}!{name}: ordinal {ordinal} out of range")
        (function_rva,) = struct.unpack("<I", backend.read(module.base_va + functions_rva + 4 * ordinal, 4))
        if export_rva <= function_rva < export_rva + export_size:
            forward = backend.read(module.base_va + function_rva, 256).split(b"\0", 1)[0].decode()
            return _follow_forwarder(backend, module, name, forward, _depth)
        return module.base_va + function_rva
    raise BackendError(f"{module.name} exports no function named {name}")


def _follow_forwarder(backend: ProcessBackend, module: Module, name: str, forward: str, depth: int) -> int:
    target_dll, _, target_name = forward.rpartition(".")
    if depth > 8 or not target_dll or target_name.startswith("#"):
        raise BackendError(f"{module.name}!{name} forwards to {forward}, which cannot be followed")
    wanted = target_dll.lower() + ".dll"
    for candidate in backend.modules():
        if candidate.name.lower() == wanted:
            return find_export(backend, candidate, target_name, depth + 1)
    raise BackendError(f"{module.name}!{name} forwards to {forward}, which is not loaded")


# --------------------------------------------------------------------------
# Calls with several arguments
# --------------------------------------------------------------------------

#: The thread entry for call_function. Its argument (rcx) points at a block
#: {function, arg1, arg2, arg3, arg4, result}; the stub calls function with
#: the four arguments and stores rax in result. At thread entry rsp is 8 mod
#: 16: the push realigns it, and 32 bytes of shadow space follow the ABI.
CALL_STUB_ASM = """
    push rbx
    sub rsp, 0x20
    mov rbx, rcx
    mov rcx, qword ptr [rbx + 0x08]
    mov rdx, qword ptr [rbx + 0x10]
    mov r8, qword ptr [rbx + 0x18]
    mov r9, qword ptr [rbx + 0x20]
    call qword ptr [rbx]
    mov qword ptr [rbx + 0x28], rax
    add rsp, 0x20
    pop rbx
    ret
"""

_PAGE = 0x1000


@lru_cache(maxsize=1)
def call_stub() -> bytes:
    """CALL_STUB_ASM assembled with keystone."""
    import keystone

    encoding, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64).asm(CALL_STUB_ASM, 0)
    return bytes(encoding)


def call_function(backend: ProcessBackend, function_va: int, *args: int, timeout: float = 10.0) -> int:
    """Call ``function_va(*args)`` (up to four integers) in the target; its 64-bit result.

    The stub goes on an executable page and the argument block on a
    read-write page of one allocation (never writable and executable), freed
    afterwards.
    """
    if len(args) > 4:
        raise ValueError("call_function takes at most four arguments")
    words = [function_va, *(a & 0xFFFFFFFFFFFFFFFF for a in args)]
    words += [0] * (6 - len(words))
    base = backend.allocate_near(0, 2 * _PAGE, PAGE_READWRITE)
    block = base + _PAGE
    try:
        backend.write(base, call_stub())
        backend.protect(base, _PAGE, PAGE_EXECUTE_READ)
        backend.write(block, struct.pack("<6Q", *words))
        backend.remote_call(base, block, timeout=timeout)
    except RemoteTimeoutError:
        raise  # the thread may still run the stub: leaking it beats freeing it under the thread
    except BaseException:
        backend.free(base)
        raise
    try:
        (result,) = struct.unpack("<Q", backend.read(block + 40, 8))
        return result
    finally:
        backend.free(base)
