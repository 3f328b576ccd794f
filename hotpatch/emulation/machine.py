"""The emulated process: a Unicorn x86-64 CPU, one thread, model DLLs, calls into guest code.

The process has one thread whose TEB sits at GS base (self pointer at
gs:[0x30], stack base and limit, last error, TLS slots, the PEB with an empty
but well-formed loader list), a 1 MiB stack, and the C heap. Model DLLs
(``modeldll``) are created on demand when an image imports from them;
kernel32.dll and ntdll.dll are always there, as in every Windows process.

Guest calls nest: a model running inside a CPU hook (an exception
dispatcher calling a filter, ``_initterm`` calling constructors) may call
back into guest code. Each nesting level returns to its own sentinel address.
Errors raised inside hooks are kept, the CPU is stopped, and the error is
raised again from the outermost call, so a failure deep inside nested code
surfaces once with its own message. A model that transfers control to a frame
of an outer level (RtlUnwindEx to a handler) raises ``Resume``; each level
passes it down until the level that owns the frame installs the context.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INTR,
    UC_HOOK_MEM_INVALID,
    UC_MODE_64,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from ..errors import (
    EmulationError,
    EmulationFaultError,
    GuestExceptionError,
    InstructionLimitError,
    RemoteTimeoutError,
    UnmodelledImportError,
)
from ..process.win32mem import MEM_IMAGE, PAGE_EXECUTE_READ, PAGE_READONLY
from ..x86 import MASK64, disassembler
from . import models
from .addresses import (
    ARGUMENT_REGISTERS,
    DEFAULT_INSTRUCTION_LIMIT,
    GPR,
    GUEST_FILETIME,
    GUEST_PROCESS_ID,
    GUEST_THREAD_ID,
    MAX_NESTING,
    MODEL_DLL_BASE,
    SENTINEL_BASE,
    TEB_LAST_ERROR,
    XMM,
    lay_out,
)
from .faults import CpuException, cpu_exception, interrupt_exception
from .modeldll import CODE_RVA, CODE_SIZE, EDATA_RVA, ModelDll
from .modules import LoadedModule, Stub
from .recording import WriteRecorder
from .space import PAGE, AddressSpace
from .unwind import Context

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_INSTRUCTION_LIMIT",
    "GPR",
    "ExceptionDispatcher",
    "LoadedModule",
    "Machine",
    "ModelCall",
    "Resume",
    "Stub",
]

_pids = itertools.count(0x1F00, 8)

def _raise(error: BaseException) -> None:
    raise error


@dataclass
class _Level:
    sentinel: int
    #: where unwinding continues when it walks off this level (the exception's own context), if anywhere
    boundary: tuple[Context, int] | None = None


class Resume(Exception):  # noqa: N818 - a control transfer, not an error
    """Continue the guest at ``context`` in nesting level ``level`` (RtlUnwindEx, a handled exception)."""

    def __init__(self, level: int, context: Context) -> None:
        super().__init__(f"resume at {context.rip:#x} in level {level}")
        self.level = level
        self.context = context


#: hands a CPU exception (status, address, parameters, context) to the guest's handlers (``seh.dispatch_fault``):
#: raises Resume when one takes it, GuestExceptionError when none does
ExceptionDispatcher = Callable[["Machine", int, int, list[int], Context], None]


class Machine:
    """One emulated Windows x64 process with a single thread."""

    def __init__(self, registry: models.ModelRegistry, dispatch_exception: ExceptionDispatcher,
                 instruction_limit: int = DEFAULT_INSTRUCTION_LIMIT) -> None:
        # The models and the exception dispatcher (catalog.new_machine passes them) sit above this module.
        self.registry = registry
        self.dispatch_exception = dispatch_exception
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.space = AddressSpace(self.uc)
        self.instruction_limit = instruction_limit
        # The host tells emulated processes apart by pid and start time; the guest sees the same fixed ids
        # and clock in every process, so two processes making the same calls compute the same values.
        self.pid = next(_pids)
        self.start_time = time.time_ns() // 100 + 116444736000000000  # FILETIME
        self.guest_pid = GUEST_PROCESS_ID
        self.thread_id = GUEST_THREAD_ID
        self.guest_time = GUEST_FILETIME
        self.images: list[LoadedModule] = []
        self.model_dlls: list[LoadedModule] = []
        self.function_tables: dict[int, tuple[int, int]] = {}  # table VA -> (entry count, base VA)
        self.output: list[bytes] = []  # what the guest wrote to stdout/stderr/debug output
        self.clock_ms = 0x100000
        self.state: dict[str, object] = {}  # model state (TLS allocation, handles, ...)
        self._stubs: dict[int, Stub] = {}
        self._handles = 0x100
        self._levels: list[_Level] = []
        self._error: BaseException | None = None
        self._resume: Resume | None = None
        self._fault: tuple[int, int, int, int] | None = None
        self._cpu_exception: CpuException | None = None
        #: hand access violations, division by zero, int3... to the guest's exception handlers, as Windows does
        self.dispatch_cpu_exceptions = True
        self.recorder = WriteRecorder(self.uc)
        self._disassembler = disassembler()
        layout = lay_out(self.uc, self.space, self.guest_pid, self.thread_id)
        self.stack_limit, self.stack_base, self.heap = layout.stack_limit, layout.stack_base, layout.heap
        self.teb, self.peb, self.crt_data = layout.teb, layout.peb, layout.crt_data
        self.uc.hook_add(UC_HOOK_MEM_INVALID, self._on_invalid_memory)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        for name in ("ntdll.dll", "kernel32.dll"):
            self.model_dll(name)

    # ── registers and memory ────────────────────────────────────────────

    def reg(self, register: int) -> int:
        return self.uc.reg_read(register)

    def cpu_context(self) -> Context:
        return Context(
            [self.uc.reg_read(r) for r in GPR],
            self.uc.reg_read(x86.UC_X86_REG_RIP),
            self.uc.reg_read(x86.UC_X86_REG_EFLAGS),
            self.uc.reg_read(x86.UC_X86_REG_MXCSR),
            [self.uc.reg_read(r) for r in XMM],
        )

    def set_cpu_context(self, ctx: Context) -> None:
        for register, value in zip(GPR, ctx.gpr):
            self.uc.reg_write(register, value & MASK64)
        for register, value in zip(XMM, ctx.xmm):
            self.uc.reg_write(register, value)
        self.uc.reg_write(x86.UC_X86_REG_EFLAGS, ctx.eflags)
        self.uc.reg_write(x86.UC_X86_REG_RIP, ctx.rip)

    def read(self, va: int, size: int, what: str = "") -> bytes:
        """Guest memory as the guest may read it; a fault names ``what`` read it."""
        if size == 0:
            return b""
        if not self.space.pages_allow(va, size, UC_PROT_READ):
            raise EmulationFaultError(f"{what or 'emulator'}: reading {size} bytes at {va:#x}: "
                                      f"{self._page_state(va, size, UC_PROT_READ)}", va=va)
        return bytes(self.uc.mem_read(va, size))

    def write(self, va: int, data: bytes, what: str = "") -> None:
        """Write guest memory as the guest may write it."""
        if not data:
            return
        if not self.space.pages_allow(va, len(data), UC_PROT_WRITE):
            raise EmulationFaultError(f"{what or 'emulator'}: writing {len(data)} bytes at {va:#x}: "
                                      f"{self._page_state(va, len(data), UC_PROT_WRITE)}", va=va)
        self.recorder.record(va, len(data))
        self.uc.mem_write(va, bytes(data))

    def poke(self, va: int, data: bytes) -> None:
        """Write whatever the page protection (the loader, the debugger-like backend)."""
        self.uc.mem_write(va, bytes(data))
        self.uc.ctl_remove_cache(va, va + len(data))

    def u64(self, va: int, what: str = "") -> int:
        return int.from_bytes(self.read(va, 8, what), "little")

    def u32(self, va: int, what: str = "") -> int:
        return int.from_bytes(self.read(va, 4, what), "little")

    def put_u64(self, va: int, value: int, what: str = "") -> None:
        self.write(va, (value & MASK64).to_bytes(8, "little"), what)

    def put_u32(self, va: int, value: int, what: str = "") -> None:
        self.write(va, (value & 0xFFFFFFFF).to_bytes(4, "little"), what)

    def cstring(self, va: int, what: str = "", limit: int = 1 << 20) -> bytes:
        """The NUL-terminated string at ``va``, without its terminator."""
        out = bytearray()
        while len(out) < limit:
            chunk_size = PAGE - (va + len(out)) % PAGE
            chunk = self.read(va + len(out), chunk_size, what)
            end = chunk.find(b"\0")
            if end >= 0:
                return bytes(out + chunk[:end])
            out += chunk
        raise EmulationError(f"{what}: no string terminator within {limit} bytes of {va:#x}")

    def wstring(self, va: int, what: str = "", limit: int = 1 << 20) -> str:
        out = bytearray()
        while len(out) < 2 * limit:
            unit = self.read(va + len(out), 2, what)
            if unit == b"\0\0":
                return out.decode("utf-16-le", "replace")
            out += unit
        raise EmulationError(f"{what}: no string terminator within {limit} characters of {va:#x}")

    def _page_state(self, va: int, size: int, wanted: int) -> str:
        page = va & ~(PAGE - 1)
        while page < va + size:
            allocation = self.space.allocation_at(page)
            if allocation is None:
                return f"{page:#x} is not mapped"
            if not self.space.pages_allow(page, 1, wanted):
                return f"{page:#x} is protected {allocation.protect_at(page):#x}"
            page += PAGE
        return "not accessible"

    def new_handle(self) -> int:
        """A fresh handle value for a kernel object a model pretends to create."""
        self._handles += 4
        return self._handles

    def last_error(self) -> int:
        return int.from_bytes(self.uc.mem_read(self.teb + TEB_LAST_ERROR, 4), "little")

    def set_last_error(self, code: int) -> None:
        self.uc.mem_write(self.teb + TEB_LAST_ERROR, (code & 0xFFFFFFFF).to_bytes(4, "little"))

    # ── modules ─────────────────────────────────────────────────────────

    def modules(self) -> list[LoadedModule]:
        return [*self.images, *self.model_dlls]

    def module_at(self, va: int) -> LoadedModule | None:
        for module in self.modules():
            if module.contains(va):
                return module
        return None

    def module_named(self, name: str) -> LoadedModule | None:
        wanted = name.lower()
        if "." not in wanted:
            wanted += ".dll"
        for module in self.modules():
            if module.name.lower() == wanted:
                return module
        return None

    def describe(self, va: int) -> str:
        """``va`` as a reader wants it: module+RVA when it is inside a module."""
        module = self.module_at(va)
        if module is not None:
            stub = self._stubs.get(va)
            if stub is not None:
                return f"{stub.dll}!{stub.name}"
            return f"{module.name}+{va - module.base:#x}"
        allocation = self.space.allocation_at(va)
        if allocation is not None:
            return f"{va:#x} ({allocation.label})"
        return f"{va:#x}"

    def model_dll(self, name: str) -> LoadedModule:
        """The model DLL ``name``, mapped the first time it is asked for."""
        existing = self.module_named(name)
        if existing is not None:
            return existing
        base = MODEL_DLL_BASE + len(self.model_dlls) * 0x100000
        dll = ModelDll(name, base)
        family = models.family_of(dll.name)
        for model in self.registry.models_for(family):
            self._add_stub(dll, model.name, model)
        allocation = self.space.map(base, dll.size, PAGE_READONLY, MEM_IMAGE, dll.name)
        allocation.allocation_protect = 0x80  # PAGE_EXECUTE_WRITECOPY, as for every image
        self.space.set_protection(base + CODE_RVA, CODE_SIZE, PAGE_EXECUTE_READ)
        self.poke(base, dll.image())
        self.uc.hook_add(UC_HOOK_CODE, self._on_model_code, begin=base + CODE_RVA, end=base + EDATA_RVA - 1)
        module = LoadedModule(dll.name, "<model>\\" + dll.name, base, dll.size, model=dll)
        self.model_dlls.append(module)
        return module

    def _add_stub(self, dll: ModelDll, name: str, model: models.Model | None) -> int:
        code = model.code if model is not None and model.code else b"\xc3"
        va = dll.add(name, code)
        self._stubs[va] = Stub(dll.name, name, model)
        return va

    def model_export(self, dll_name: str, name: str) -> int:
        """The VA of ``name`` in model DLL ``dll_name``; an unmodelled stub is added when it has none."""
        module = self.model_dll(dll_name)
        assert module.model is not None
        dll = module.model
        if name in dll.exports:
            return dll.base + dll.exports[name]
        va = self._add_stub(dll, name, None)
        headers, edata = dll.directory()
        self.poke(dll.base, headers)
        self.poke(dll.base + EDATA_RVA, edata)
        self.poke(va, dll.stub_code(name))
        return va

    def stub_at(self, va: int) -> Stub | None:
        return self._stubs.get(va)

    # ── hooks ───────────────────────────────────────────────────────────

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run hook code; keep its error and stop the CPU, or pass a Resume down to its level."""
        try:
            action()
        except Resume as resume:
            self._deliver(resume)
        except BaseException as exc:  # noqa: BLE001 - kept and raised again by the outermost call
            if self._error is None:
                self._error = exc
            self.uc.emu_stop()

    def replace_error(self, old: BaseException, new: BaseException) -> None:
        """Let a better description of a kept error be the one the outermost call raises."""
        if self._error is old:
            self._error = new

    def _deliver(self, resume: Resume) -> None:
        level = len(self._levels) - 1
        if resume.level == level:
            self._resume = None
            self.set_cpu_context(resume.context)
        else:  # an outer level owns the frame: end this one, the call that started it raises again
            self._resume = resume
            self.uc.reg_write(x86.UC_X86_REG_RIP, self._levels[-1].sentinel)

    def _on_model_code(self, uc: Uc, address: int, size: int, user_data: object) -> None:
        stub = self._stubs.get(address)
        if stub is not None:
            self._guarded(lambda: self._run_model(stub))

    def _run_model(self, stub: Stub) -> None:
        if stub.model is None:
            caller = self.describe(self.u64(self.reg(x86.UC_X86_REG_RSP)))
            raise UnmodelledImportError(f"call to {stub.dll}!{stub.name} has no model (called from {caller})",
                                        stub.dll, stub.name)
        if stub.model.run is None:
            return  # implemented by the code at the stub
        result = stub.model.run(ModelCall(self, stub))
        if result is not None:
            self.uc.reg_write(x86.UC_X86_REG_RAX, result & MASK64)

    def _on_invalid_memory(self, uc: Uc, access: int, address: int, size: int, value: int, data: object) -> bool:
        self._fault = (access, address, size, uc.reg_read(x86.UC_X86_REG_RIP))
        return False

    def _on_interrupt(self, uc: Uc, number: int, data: object) -> None:
        exception = interrupt_exception(number, uc.reg_read(x86.UC_X86_REG_RIP), self.describe, self.instruction_at)
        if exception.status is None:
            self._guarded(lambda: _raise(exception.error))
            return
        self._cpu_exception = exception
        uc.emu_stop()

    def instruction_at(self, va: int) -> str:
        try:
            code = bytes(self.uc.mem_read(va, 16))
        except UcError:
            return ""
        for insn in self._disassembler.disasm(code, va, 1):
            return f"{insn.mnemonic} {insn.op_str}".strip()
        return f"undecodable bytes {code[:8].hex(' ')}"

    def _cpu_exception_of(self, exc: UcError) -> CpuException:
        """The Windows exception a failed emu_start stands for, with the error to raise if nobody handles it."""
        fault, self._fault = self._fault, None
        return cpu_exception(exc, fault, self.uc.reg_read(x86.UC_X86_REG_RIP), self.describe, self.instruction_at)

    def _dispatch_cpu_exception(self, exception: CpuException) -> Context | None:
        """Hand a CPU exception to the guest's SEH handlers: the context to go on with, None for an outer level.

        Nobody handling it raises the emulator's own description of the fault.
        """
        # A fault inside an exception or unwind handler is not dispatched again: the emulator stops there
        # with the fault described, rather than following Windows into nested-exception recursion.
        in_handler = any(level.boundary is not None for level in self._levels)
        if exception.status is None or not self.dispatch_cpu_exceptions or in_handler:
            raise exception.error
        ctx = self.cpu_context()
        ctx.rip = exception.rip
        try:
            self.dispatch_exception(self, exception.status, exception.rip, exception.parameters, ctx)
        except Resume as resume:
            if resume.level == self.level:
                self._resume = None
                self.set_cpu_context(resume.context)
                return resume.context
            self._resume = resume
            return None
        except GuestExceptionError:
            raise exception.error from None
        raise AssertionError("dispatch returned")  # pragma: no cover - dispatch always raises

    # ── written-memory recording (recording.py) ─────────────────────────

    def watch(self, begin: int, end: int) -> int:
        """Record guest writes to [begin, end) while a recording runs; a handle for ``unwatch``."""
        return self.recorder.watch(begin, end)

    def unwatch(self, handle: int) -> None:
        self.recorder.unwatch(handle)

    def start_recording(self) -> None:
        self.recorder.start()

    def stop_recording(self) -> list[tuple[int, bytes, bytes]]:
        """The runs of bytes written since ``start_recording``: (VA, bytes before, bytes now)."""
        return self.recorder.stop()

    # ── calls into guest code ───────────────────────────────────────────

    @property
    def level(self) -> int:
        """The nesting level of the code running now (0: a call from the host)."""
        return len(self._levels) - 1

    def call(
        self,
        function_va: int,
        args: Sequence[int] = (),
        *,
        timeout: float | None = None,
        boundary: tuple[Context, int] | None = None,
        stack_top: int | None = None,
    ) -> int:
        """Call ``function_va(*args)`` by the Windows x64 convention; its rax.

        From the host this starts the thread afresh at the top of its stack.
        From inside a model, it runs on the stack below the model's caller
        (or below ``stack_top``) and restores every register afterwards.
        """
        nested = bool(self._levels)
        if len(self._levels) >= MAX_NESTING:
            raise EmulationError(f"guest calls nested more than {MAX_NESTING} deep")
        saved = self.uc.context_save() if nested else None
        if nested:
            rsp = (stack_top if stack_top is not None else self.reg(x86.UC_X86_REG_RSP)) - 0x100
        else:
            self._error = None
            self._resume = None
            rsp = self.stack_base - 0x1000
            for register in GPR:
                self.uc.reg_write(register, 0)
            self.uc.reg_write(x86.UC_X86_REG_EFLAGS, 0x202)
        extra = [a & MASK64 for a in args[4:]]
        rsp = (rsp - 0x20 - 8 * len(extra)) & ~0xF
        if rsp - 0x100 < self.stack_limit:
            raise EmulationError("the emulated stack is exhausted (guest calls nested too deep)")
        self.uc.mem_write(rsp + 0x20, b"".join(a.to_bytes(8, "little") for a in extra))
        sentinel = SENTINEL_BASE + 16 * len(self._levels)
        rsp -= 8
        self.uc.mem_write(rsp, sentinel.to_bytes(8, "little"))
        self.uc.reg_write(x86.UC_X86_REG_RSP, rsp)
        for register, value in zip(ARGUMENT_REGISTERS, args):
            self.uc.reg_write(register, value & MASK64)
        self._levels.append(_Level(sentinel, boundary))
        try:
            self._run(function_va, sentinel, timeout)
            result = self.uc.reg_read(x86.UC_X86_REG_RAX)
        finally:
            self._levels.pop()
            if saved is not None:
                self.uc.context_restore(saved)
        if self._resume is not None:
            raise self._resume
        return result

    def _run(self, begin: int, until: int, timeout: float | None) -> None:
        started = time.monotonic()
        timeout_us = int(timeout * 1_000_000) if timeout and len(self._levels) == 1 else 0
        while True:
            self._fault = None
            self._cpu_exception = None
            try:
                self.uc.emu_start(begin, until, timeout=timeout_us, count=self.instruction_limit)
            except UcError as exc:
                if self._error is None:
                    self._cpu_exception = self._cpu_exception_of(exc)
            if self._error is not None:
                error = self._error
                if len(self._levels) == 1:
                    self._error = None
                raise error
            exception, self._cpu_exception = self._cpu_exception, None
            if exception is None:
                break
            resumed = self._dispatch_cpu_exception(exception)
            if resumed is None:
                return
            begin = resumed.rip
        if self._resume is not None:
            return
        rip = self.uc.reg_read(x86.UC_X86_REG_RIP)
        stopped_after_hlt = self.space.pages_allow(rip - 1, 1, UC_PROT_READ) and self.uc.mem_read(rip - 1, 1) == b"\xf4"
        if rip != until and stopped_after_hlt:
            if self.sentinel_level(rip - 1) is not None:
                raise EmulationFaultError(f"guest code returned to the emulator's return address for another call "
                                          f"(stack corrupted?) at {rip - 1:#x}", rip=rip - 1)
            raise EmulationFaultError(f"privileged instruction hlt at {self.describe(rip - 1)}", rip=rip - 1,
                                      instruction="hlt")
        if rip != until:
            where = self.describe(rip)
            if timeout_us and time.monotonic() - started >= timeout:
                raise RemoteTimeoutError(f"emulated call did not return within {timeout:g} s (at {where})",
                                         self.thread_id)
            raise InstructionLimitError(
                f"emulated call ran more than {self.instruction_limit} instructions without returning "
                f"(stopped at {where}: {self.instruction_at(rip)})", rip=rip, limit=self.instruction_limit)

    def boundary(self, level: int) -> tuple[Context, int] | None:
        return self._levels[level].boundary if 0 <= level < len(self._levels) else None

    def sentinel_level(self, va: int) -> int | None:
        """The nesting level whose return address ``va`` is, if it is one."""
        offset = va - SENTINEL_BASE
        if 0 <= offset < 16 * MAX_NESTING and offset % 16 == 0:
            return offset // 16
        return None


class ModelCall:
    """One call of a model: its arguments by the Windows x64 convention, and the machine."""

    def __init__(self, machine: Machine, stub: Stub) -> None:
        self.machine = machine
        self.stub = stub
        self.rsp = machine.reg(x86.UC_X86_REG_RSP)

    def arg(self, index: int) -> int:
        """Argument ``index`` as an unsigned 64-bit value (rcx, rdx, r8, r9, then the stack)."""
        if index < 4:
            return self.machine.reg(ARGUMENT_REGISTERS[index])
        return self.machine.u64(self.rsp + 8 + 8 * index)

    def sarg(self, index: int) -> int:
        value = self.arg(index)
        return value - (1 << 64) if value >> 63 else value

    def arg32(self, index: int) -> int:
        return self.arg(index) & 0xFFFFFFFF

    def sarg32(self, index: int) -> int:
        value = self.arg32(index)
        return value - (1 << 32) if value >> 31 else value

    @property
    def return_address(self) -> int:
        return self.machine.u64(self.rsp)

    def caller_context(self) -> Context:
        """The registers as the caller will see them when this function returns (before rax is set)."""
        ctx = self.machine.cpu_context()
        ctx.rip = self.return_address
        ctx.rsp = self.rsp + 8
        return ctx

    @property
    def label(self) -> str:
        return f"{self.stub.dll}!{self.stub.name}"
