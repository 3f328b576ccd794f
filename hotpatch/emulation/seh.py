"""Windows x64 exceptions in the emulator: dispatch, unwinding, and the function tables behind them.

Modelled the way ntdll does it (and Wine, whose implementation this follows):

- ``RaiseException`` builds an EXCEPTION_RECORD and the CONTEXT of its caller
  on the guest stack and walks the frames: each function is looked up in its
  image's .pdata, or in the tables registered with ``RtlAddFunctionTable``
  (new code a hotpatch brought), unwound with its UNWIND_INFO, and its
  exception handler, if any, is called with a DISPATCHER_CONTEXT;
- ``RtlUnwindEx`` walks again from its caller to the target frame calling
  termination handlers, then continues at the target;
- ``__C_specific_handler`` (MSVC's and mingw's __try/__except scope tables)
  runs filters and __finally blocks and unwinds to the __except block.

GCC's C++ exceptions need nothing more: libgcc's _GCC_specific_handler is
guest code that calls RtlUnwindEx. Vectored handlers run before the frames
are searched. CPU faults (access violation, division by zero, int3, invalid
instruction) are dispatched like RaiseException. MSVC's C++ handler
(__CxxFrameHandler3/4, which unwinds with STATUS_UNWIND_CONSOLIDATE), nested
and collided exceptions are not modelled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import EmulationError, EmulationFaultError, GuestExceptionError
from ..pe.headers import DIRECTORY_EXCEPTION, read_headers
from .machine import Machine, ModelCall, Resume
from .models import model
from .unwind import CONTEXT_SIZE, UNW_FLAG_EHANDLER, UNW_FLAG_UHANDLER, Context, virtual_unwind

__all__ = ["dispatch", "lookup_function", "make_record", "unwind"]

KERNEL = ("kernel32", "ntdll")

EXCEPTION_NONCONTINUABLE = 0x01
EXCEPTION_UNWINDING = 0x02
EXCEPTION_EXIT_UNWIND = 0x04
EXCEPTION_TARGET_UNWIND = 0x20
EXCEPTION_COLLIDED_UNWIND = 0x40
EXCEPTION_MAXIMUM_PARAMETERS = 15

CONTINUE_EXECUTION = 0
CONTINUE_SEARCH = 1
EXCEPTION_EXECUTE_HANDLER = 1
FILTER_CONTINUE_EXECUTION = 0xFFFFFFFF

STATUS_UNWIND = 0xC0000027
STATUS_UNWIND_CONSOLIDATE = 0x80000029

RECORD_SIZE = 0x98
DISPATCHER_SIZE = 0x50
# Scratch space on the guest stack for one dispatch or unwind: two CONTEXTs, a record, a
# DISPATCHER_CONTEXT, EXCEPTION_POINTERS and an (unused, zeroed) UNWIND_HISTORY_TABLE.
_CONTEXT_A, _CONTEXT_B = 0x000, 0x500
_RECORD, _DISPATCHER, _POINTERS, _HISTORY = 0xA00, 0xAA0, 0xB00, 0xB20
SCRATCH_SIZE = 0xC00
RAX = 0


def _scratch(rsp: int) -> int:
    return (rsp - 0x200 - SCRATCH_SIZE) & ~0x3F


# ── function tables ───────────────────────────────────────────────────────


def lookup_function(machine: Machine, pc: int) -> tuple[int, int] | None:
    """(VA of the RUNTIME_FUNCTION covering ``pc``, its image base), from .pdata or a registered table."""
    module = machine.module_at(pc)
    if module is not None:
        if module.image is None:
            return None  # a model DLL stub: a leaf
        header = bytes(machine.uc.mem_read(module.base, 0x1000))
        headers = read_headers(lambda offset, size: header[offset:offset + size], module.name)
        directory_rva, directory_size = headers.directory(DIRECTORY_EXCEPTION)
        count = directory_size // 12
        rva = pc - module.base
        lo, hi = 0, count - 1
        while lo <= hi:
            middle = (lo + hi) // 2
            entry_va = module.base + directory_rva + 12 * middle
            begin, end = struct.unpack("<II", machine.read(entry_va, 8, "unwinding"))
            if rva < begin:
                hi = middle - 1
            elif rva >= end:
                lo = middle + 1
            else:
                return entry_va, module.base
        return None
    for table_va, (count, base) in machine.function_tables.items():
        data = machine.read(table_va, 12 * count, "unwinding") if count else b""
        for index in range(count):
            begin, end, _ = struct.unpack_from("<III", data, 12 * index)
            if base + begin <= pc < base + end:
                return table_va + 12 * index, base
    return None


@dataclass(frozen=True)
class _Frame:
    control_pc: int
    image_base: int
    function_va: int  # 0 for a leaf
    handler: int | None
    handler_data: int
    establisher: int


def _cross(machine: Machine, ctx: Context, level: int) -> int | None:
    """Leave a nesting level through its return address: continue with the context it was called for."""
    while True:
        owner = machine.sentinel_level(ctx.rip)
        if owner is None:
            return level
        boundary = machine.boundary(owner)
        if boundary is None:
            return None
        outer, level = boundary
        ctx.gpr[:], ctx.rip, ctx.eflags, ctx.xmm[:] = outer.gpr, outer.rip, outer.eflags, outer.xmm


def _step(machine: Machine, ctx: Context, level: int, handler_type: int) -> tuple[_Frame, int | None]:
    """Unwind ``ctx`` out of its frame: the frame, and the level of the caller (None past the stack's end)."""
    pc = ctx.rip
    found = lookup_function(machine, pc)
    if found is None:
        frame = _Frame(pc, 0, 0, None, 0, ctx.rsp)
        ctx.rip = machine.u64(ctx.rsp, "unwinding")
        ctx.rsp += 8
    else:
        function_va, base = found
        result = virtual_unwind(lambda va, n: machine.read(va, n, "unwinding"), handler_type, base, pc,
                                function_va, ctx)
        frame = _Frame(pc, base, function_va, result.handler, result.handler_data, result.establisher_frame)
    if not ctx.rip or not machine.stack_limit <= ctx.rsp <= machine.stack_base:
        return frame, None
    return frame, _cross(machine, ctx, level)


def _valid_frame(machine: Machine, establisher: int) -> bool:
    return establisher % 8 == 0 and machine.stack_limit <= establisher <= machine.stack_base


def _write_dispatcher(machine: Machine, va: int, frame: _Frame, target_ip: int, context_va: int,
                      history_va: int) -> None:
    machine.poke(va, struct.pack("<QQQQQQQQQII", frame.control_pc, frame.image_base, frame.function_va,
                                 frame.establisher, target_ip, context_va, frame.handler or 0, frame.handler_data,
                                 history_va, 0, 0))


def make_record(code: int, flags: int, address: int, parameters: list[int]) -> bytes:
    parameters = parameters[:EXCEPTION_MAXIMUM_PARAMETERS]
    padded = parameters + [0] * (EXCEPTION_MAXIMUM_PARAMETERS - len(parameters))
    return struct.pack("<IIQQI4x15Q", code, flags, 0, address, len(parameters), *padded)


def _code_and_address(machine: Machine, record_va: int) -> tuple[int, int]:
    code, _ = struct.unpack("<II", machine.read(record_va, 8, "exception record"))
    return code, machine.u64(record_va + 0x10, "exception record")


def _call_handler(machine: Machine, frame: _Frame, kind: str, args: list[int], stack_top: int,
                  boundary: tuple[Context, int]) -> int:
    """Call a frame's language handler; a fault inside it names the handler and whose unwind info gave it."""
    assert frame.handler is not None
    try:
        return machine.call(frame.handler, args, stack_top=stack_top, boundary=boundary) & 0xFFFFFFFF
    except EmulationFaultError as exc:
        error = EmulationFaultError(
            f"the {kind} handler at {machine.describe(frame.handler)} named by the unwind info of the code at "
            f"{machine.describe(frame.control_pc)} faulted: {exc}", rip=exc.rip, va=exc.va,
            instruction=exc.instruction)
        machine.replace_error(exc, error)
        raise error from None


# ── dispatch ──────────────────────────────────────────────────────────────


def dispatch_fault(machine: Machine, status: int, address: int, parameters: list[int], context: Context) -> None:
    """Dispatch a CPU exception (``Machine.dispatch_exception``): raises Resume, or GuestExceptionError."""
    dispatch(machine, make_record(status, 0, address, parameters), context, context.rsp)


def dispatch(machine: Machine, record: bytes, context: Context, rsp: int) -> None:
    """Find the handler of an exception raised with ``context`` by the code at this nesting level.

    Never returns normally: raises Resume (a handler took it, or asked to
    continue) or GuestExceptionError (nobody did).
    """
    level = machine.level
    area = _scratch(rsp)
    original_va, work_va = area + _CONTEXT_A, area + _CONTEXT_B
    record_va, dispatcher_va, history_va = area + _RECORD, area + _DISPATCHER, area + _HISTORY
    machine.poke(area, bytes(SCRATCH_SIZE))
    machine.poke(original_va, context.pack())
    machine.poke(record_va, record)
    pointers_va = area + _POINTERS
    machine.poke(pointers_va, struct.pack("<QQ", record_va, original_va))
    for _, handler in list(_vectored(machine)):
        verdict = machine.call(handler, [pointers_va], stack_top=area, boundary=(context, level)) & 0xFFFFFFFF
        if verdict == FILTER_CONTINUE_EXECUTION:
            raise Resume(level, Context.unpack(machine.read(original_va, CONTEXT_SIZE)))
    ctx = context.copy()
    current: int | None = level
    while current is not None:
        frame, caller_level = _step(machine, ctx, current, UNW_FLAG_EHANDLER)
        if not _valid_frame(machine, frame.establisher):
            break
        if frame.handler is not None:
            machine.poke(work_va, ctx.pack())
            _write_dispatcher(machine, dispatcher_va, frame, 0, work_va, history_va)
            disposition = _call_handler(machine, frame, "exception", [record_va, frame.establisher, original_va,
                                                                      dispatcher_va], area, (context, level))
            if disposition == CONTINUE_EXECUTION:
                _, flags = struct.unpack("<II", machine.read(record_va, 8))
                if flags & EXCEPTION_NONCONTINUABLE:
                    code, address = _code_and_address(machine, record_va)
                    raise GuestExceptionError(
                        f"handler {machine.describe(frame.handler)} continued the non-continuable exception "
                        f"{code:#010x}", code, address)
                raise Resume(level, Context.unpack(machine.read(original_va, CONTEXT_SIZE)))
            if disposition != CONTINUE_SEARCH:
                raise EmulationError(f"exception handler {machine.describe(frame.handler)} returned disposition "
                                     f"{disposition} (nested or collided exceptions are not modelled)")
        current = caller_level
    code, address = _code_and_address(machine, record_va)
    raise GuestExceptionError(f"exception {code:#010x} raised at {machine.describe(address)} was not handled "
                              "(the process would have ended here)", code, address)


# ── unwinding ─────────────────────────────────────────────────────────────


def unwind(machine: Machine, end_frame: int, target_ip: int, record_va: int, return_value: int, start: Context,
           rsp: int) -> None:
    """RtlUnwindEx from the frame ``start`` describes to ``end_frame``, then continue at ``target_ip``.

    Never returns normally: raises Resume for the level that owns the target frame.
    """
    area = _scratch(rsp)
    context_va, dispatcher_va, history_va = area + _CONTEXT_A, area + _DISPATCHER, area + _HISTORY
    machine.poke(area, bytes(SCRATCH_SIZE))
    if not record_va:
        record_va = area + _RECORD
        machine.poke(record_va, make_record(STATUS_UNWIND, 0, start.rip, []))
    (flags,) = struct.unpack("<I", machine.read(record_va + 4, 4, "exception record"))
    flags |= EXCEPTION_UNWINDING | (0 if end_frame else EXCEPTION_EXIT_UNWIND)
    context = start.copy()
    current = _cross(machine, context, machine.level)
    while current is not None:
        new = context.copy()
        frame, caller_level = _step(machine, new, current, UNW_FLAG_UHANDLER)
        if not _valid_frame(machine, frame.establisher):
            raise GuestExceptionError(f"unwinding reached an invalid frame {frame.establisher:#x} "
                                      f"at {machine.describe(frame.control_pc)}")
        if end_frame and frame.establisher > end_frame:
            raise GuestExceptionError(f"unwinding passed its target frame {end_frame:#x} "
                                      f"(at {machine.describe(frame.control_pc)})")
        if frame.establisher == end_frame:
            flags |= EXCEPTION_TARGET_UNWIND
        machine.poke(record_va + 4, struct.pack("<I", flags))
        if frame.handler is not None:
            machine.poke(context_va, context.pack())
            _write_dispatcher(machine, dispatcher_va, frame, target_ip, context_va, history_va)
            disposition = _call_handler(machine, frame, "unwind", [record_va, frame.establisher, context_va,
                                                                   dispatcher_va], area, (context, current))
            context = Context.unpack(machine.read(context_va, CONTEXT_SIZE))  # the handler may set registers
            if disposition != CONTINUE_SEARCH:
                raise EmulationError(f"unwind handler {machine.describe(frame.handler)} returned disposition "
                                     f"{disposition} (collided unwinds are not modelled)")
            flags &= ~EXCEPTION_COLLIDED_UNWIND
        if frame.establisher == end_frame:
            context.gpr[RAX] = return_value
            context.rip = target_ip
            raise Resume(current, context)
        context, current = new, caller_level
    if end_frame:
        raise GuestExceptionError(f"unwinding to frame {end_frame:#x} reached the end of the stack")
    raise GuestExceptionError("exit unwind reached the end of the stack (the thread would have ended)")


# ── models ────────────────────────────────────────────────────────────────


def _vectored(machine: Machine) -> list[tuple[int, int]]:
    handlers = machine.state.setdefault("vectored", [])
    assert isinstance(handlers, list)
    return handlers


@model("AddVectoredExceptionHandler", families=("kernel32",))
@model("RtlAddVectoredExceptionHandler", families=("ntdll",))
def _add_vectored_exception_handler(c: ModelCall) -> int:
    handlers = _vectored(c.machine)
    handle = c.machine.new_handle()
    entry = (handle, c.arg(1))
    handlers.insert(0, entry) if c.arg32(0) else handlers.append(entry)
    return handle


@model("RemoveVectoredExceptionHandler", families=("kernel32",))
@model("RtlRemoveVectoredExceptionHandler", families=("ntdll",))
def _remove_vectored_exception_handler(c: ModelCall) -> int:
    handlers = _vectored(c.machine)
    for entry in handlers:
        if entry[0] == c.arg(0):
            handlers.remove(entry)
            return 1
    return 0


@model("RaiseException", families=("kernel32",))
def _raise_exception(c: ModelCall) -> None:
    code, flags, count, parameters = c.arg32(0), c.arg32(1), c.arg32(2), c.arg(3)
    count = min(count, EXCEPTION_MAXIMUM_PARAMETERS)
    values = [c.machine.u64(parameters + 8 * i, c.label) for i in range(count)] if parameters else []
    context = c.caller_context()
    dispatch(c.machine, make_record(code, flags & EXCEPTION_NONCONTINUABLE, context.rip, values), context, c.rsp)


@model("RtlRaiseException", families=("ntdll",))
def _rtl_raise_exception(c: ModelCall) -> None:
    record = bytearray(c.machine.read(c.arg(0), RECORD_SIZE, c.label))
    context = c.caller_context()
    struct.pack_into("<Q", record, 0x10, context.rip)
    dispatch(c.machine, bytes(record), context, c.rsp)


@model("RtlUnwindEx", families=KERNEL)
def _rtl_unwind_ex(c: ModelCall) -> None:
    unwind(c.machine, c.arg(0), c.arg(1), c.arg(2), c.arg(3), c.caller_context(), c.rsp)


@model("RtlUnwind", families=KERNEL)
def _rtl_unwind(c: ModelCall) -> None:
    unwind(c.machine, c.arg(0), c.arg(1), c.arg(2), c.arg(3), c.caller_context(), c.rsp)


@model("RtlCaptureContext", families=KERNEL)
def _rtl_capture_context(c: ModelCall) -> None:
    c.machine.write(c.arg(0), c.caller_context().pack(), c.label)


@model("RtlRestoreContext", families=KERNEL)
def _rtl_restore_context(c: ModelCall) -> None:
    if c.arg(1):
        code, _ = struct.unpack("<II", c.machine.read(c.arg(1), 8, c.label))
        if code == STATUS_UNWIND_CONSOLIDATE:
            raise EmulationError("RtlRestoreContext with STATUS_UNWIND_CONSOLIDATE (MSVC C++ exceptions) "
                                 "is not modelled")
    raise Resume(c.machine.level, Context.unpack(c.machine.read(c.arg(0), CONTEXT_SIZE, c.label)))


@model("RtlLookupFunctionEntry", families=KERNEL)
def _rtl_lookup_function_entry(c: ModelCall) -> int:
    found = lookup_function(c.machine, c.arg(0))
    if found is None:
        return 0
    if c.arg(1):
        c.machine.put_u64(c.arg(1), found[1], c.label)
    return found[0]


@model("RtlVirtualUnwind", families=KERNEL)
def _rtl_virtual_unwind(c: ModelCall) -> int:
    handler_type, image_base, control_pc, function_va, context_va = (c.arg32(0), c.arg(1), c.arg(2), c.arg(3),
                                                                     c.arg(4))
    data = bytearray(c.machine.read(context_va, CONTEXT_SIZE, c.label))
    ctx = Context.unpack(bytes(data))
    if function_va:
        result = virtual_unwind(lambda va, n: c.machine.read(va, n, c.label), handler_type, image_base,
                                control_pc, function_va, ctx)
        handler, handler_data, establisher = result.handler, result.handler_data, result.establisher_frame
    else:
        handler, handler_data, establisher = None, 0, ctx.rsp
        ctx.rip = c.machine.u64(ctx.rsp, c.label)
        ctx.rsp += 8
    packed = ctx.pack()
    for start, end in ((0x78, 0x100), (0x1A0, 0x2A0)):  # the GPRs and RIP, XMM0-15: leave the rest as it was
        data[start:end] = packed[start:end]
    c.machine.write(context_va, bytes(data), c.label)
    if c.arg(5):
        c.machine.put_u64(c.arg(5), handler_data, c.label)
    if c.arg(6):
        c.machine.put_u64(c.arg(6), establisher, c.label)
    return handler or 0


@model("RtlAddFunctionTable", families=KERNEL)
def _rtl_add_function_table(c: ModelCall) -> int:
    table, count, base = c.arg(0), c.arg32(1), c.arg(2)
    c.machine.function_tables[table] = (count, base)
    return 1


@model("RtlDeleteFunctionTable", families=KERNEL)
def _rtl_delete_function_table(c: ModelCall) -> int:
    return 1 if c.machine.function_tables.pop(c.arg(0), None) is not None else 0


@model("RtlPcToFileHeader", families=KERNEL)
def _rtl_pc_to_file_header(c: ModelCall) -> int:
    module = c.machine.module_at(c.arg(0))
    base = module.base if module is not None else 0
    c.machine.put_u64(c.arg(1), base, c.label)
    return base


@model("__C_specific_handler", families=("crt", "ntdll"))
def _c_specific_handler(c: ModelCall) -> int:
    machine = c.machine
    record_va, frame, context_va, dispatcher_va = c.arg(0), c.arg(1), c.arg(2), c.arg(3)
    (control_pc, image_base, _, _, target_ip, _, _, handler_data, _, scope_index, _) = struct.unpack(
        "<QQQQQQQQQII", machine.read(dispatcher_va, DISPATCHER_SIZE, c.label))
    code, flags = struct.unpack("<II", machine.read(record_va, 8, c.label))
    (count,) = struct.unpack("<I", machine.read(handler_data, 4, c.label))
    scopes = [struct.unpack("<IIII", machine.read(handler_data + 4 + 16 * i, 16, c.label)) for i in range(count)]
    pc_rva = control_pc - image_base
    stack_top = _scratch(c.rsp)
    if flags & (EXCEPTION_UNWINDING | EXCEPTION_EXIT_UNWIND):
        for index in range(scope_index, count):
            begin, end, handler, jump_target = scopes[index]
            if not begin <= pc_rva < end or jump_target:
                continue
            if flags & EXCEPTION_TARGET_UNWIND and begin <= target_ip - image_base < end:
                break
            machine.poke(dispatcher_va + 0x48, struct.pack("<I", index + 1))
            machine.call(image_base + handler, [1, frame], stack_top=stack_top)  # __finally, abnormally
        return CONTINUE_SEARCH
    for index in range(scope_index, count):
        begin, end, handler, jump_target = scopes[index]
        if not begin <= pc_rva < end or not jump_target:
            continue
        if handler != EXCEPTION_EXECUTE_HANDLER:
            pointers = stack_top + _POINTERS
            machine.poke(pointers, struct.pack("<QQ", record_va, context_va))
            verdict = machine.call(image_base + handler, [pointers, frame], stack_top=stack_top) & 0xFFFFFFFF
            if verdict == FILTER_CONTINUE_EXECUTION:
                return CONTINUE_EXECUTION
            if verdict != EXCEPTION_EXECUTE_HANDLER:
                continue
        unwind(machine, frame, image_base + jump_target, record_va, code, c.caller_context(), c.rsp)
    return CONTINUE_SEARCH
