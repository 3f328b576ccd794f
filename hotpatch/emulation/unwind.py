"""x64 unwinding: the CONTEXT record and RtlVirtualUnwind over emulator memory.

``virtual_unwind`` follows the Windows x64 exception-handling spec (and
Wine's implementation of it): unwind codes of the primary and chained
UNWIND_INFO, the epilog check (a frame stopped inside an epilog is unwound
by interpreting the epilog, and has no handler), machine frames, and the
handler returned only when the flags ask for it and the PC is past the
prolog. Memory is read through a callback, so this module knows nothing of
Unicorn.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..pe.unwindinfo import UNW_FLAG_CHAININFO, UNW_FLAG_EHANDLER, UNW_FLAG_NHANDLER, UNW_FLAG_UHANDLER, tail_offset
from ..x86 import MASK64

__all__ = [
    "CONTEXT_SIZE",
    "UNW_FLAG_CHAININFO",
    "UNW_FLAG_EHANDLER",
    "UNW_FLAG_NHANDLER",
    "UNW_FLAG_UHANDLER",
    "Context",
    "UnwindError",
    "UnwindResult",
    "virtual_unwind",
]

Reader = Callable[[int, int], bytes]


UWOP_PUSH_NONVOL = 0
UWOP_ALLOC_LARGE = 1
UWOP_ALLOC_SMALL = 2
UWOP_SET_FPREG = 3
UWOP_SAVE_NONVOL = 4
UWOP_SAVE_NONVOL_FAR = 5
UWOP_EPILOG = 6
UWOP_SAVE_XMM128 = 8
UWOP_SAVE_XMM128_FAR = 9
UWOP_PUSH_MACHFRAME = 10

RSP = 4

# CONTEXT (winnt.h, AMD64): offsets of the fields the emulator fills.
CONTEXT_SIZE = 0x4D0
CONTEXT_FULL = 0x10000B  # CONTEXT_AMD64 | CONTROL | INTEGER | FLOATING_POINT
_FLAGS_OFFSET = 0x30
_MXCSR_OFFSET = 0x34
_SEGMENTS_OFFSET = 0x38
_EFLAGS_OFFSET = 0x44
_GPR_OFFSET = 0x78  # Rax, Rcx, Rdx, Rbx, Rsp, Rbp, Rsi, Rdi, R8..R15: the unwind register numbering
_RIP_OFFSET = 0xF8
_FLTSAVE_MXCSR_OFFSET = 0x100 + 24
_XMM_OFFSET = 0x1A0


class UnwindError(Exception):
    """Unwind information that cannot be followed (unknown version, unreadable data)."""


@dataclass
class Context:
    """The registers a frame is unwound through: 16 GPRs in unwind numbering, RIP, XMM0-15."""

    gpr: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0
    eflags: int = 0x202
    mxcsr: int = 0x1F80
    xmm: list[int] = field(default_factory=lambda: [0] * 16)

    @property
    def rsp(self) -> int:
        return self.gpr[RSP]

    @rsp.setter
    def rsp(self, value: int) -> None:
        self.gpr[RSP] = value & MASK64

    def copy(self) -> Context:
        return Context(list(self.gpr), self.rip, self.eflags, self.mxcsr, list(self.xmm))

    def pack(self) -> bytes:
        """A CONTEXT record (0x4D0 bytes) holding these registers."""
        data = bytearray(CONTEXT_SIZE)
        struct.pack_into("<II", data, _FLAGS_OFFSET, CONTEXT_FULL, self.mxcsr)
        struct.pack_into("<HHHHHHI", data, _SEGMENTS_OFFSET, 0x33, 0x2B, 0x2B, 0x53, 0x2B, 0x2B, self.eflags)
        struct.pack_into("<16Q", data, _GPR_OFFSET, *(g & MASK64 for g in self.gpr))
        struct.pack_into("<Q", data, _RIP_OFFSET, self.rip & MASK64)
        struct.pack_into("<I", data, _FLTSAVE_MXCSR_OFFSET, self.mxcsr)
        for index, value in enumerate(self.xmm):
            data[_XMM_OFFSET + 16 * index : _XMM_OFFSET + 16 * index + 16] = value.to_bytes(16, "little")
        return bytes(data)

    @classmethod
    def unpack(cls, data: bytes) -> Context:
        gpr = list(struct.unpack_from("<16Q", data, _GPR_OFFSET))
        (rip,) = struct.unpack_from("<Q", data, _RIP_OFFSET)
        (eflags,) = struct.unpack_from("<I", data, _EFLAGS_OFFSET)
        (mxcsr,) = struct.unpack_from("<I", data, _MXCSR_OFFSET)
        xmm = [int.from_bytes(data[_XMM_OFFSET + 16 * i : _XMM_OFFSET + 16 * i + 16], "little") for i in range(16)]
        return cls(gpr, rip, eflags, mxcsr, xmm)


@dataclass(frozen=True)
class UnwindResult:
    """What RtlVirtualUnwind returns besides the updated context."""

    handler: int | None  # VA of the language handler, when one applies
    handler_data: int  # VA of its data (right after the handler RVA)
    establisher_frame: int


@dataclass(frozen=True)
class _UnwindInfo:
    version: int
    flags: int
    prolog_size: int
    frame_register: int
    frame_offset: int
    codes: tuple[int, ...]  # raw 16-bit slots
    tail_va: int  # VA after the (even-padded) code slots: handler RVA or chained RUNTIME_FUNCTION


def _read_info(read: Reader, va: int) -> _UnwindInfo:
    head = read(va, 4)
    version, flags = head[0] & 7, head[0] >> 3
    if version not in (1, 2):
        raise UnwindError(f"unwind info at {va:#x} has unknown version {version}")
    count = head[2]
    codes = struct.unpack(f"<{count}H", read(va + 4, 2 * count)) if count else ()
    tail = va + tail_offset(count)
    return _UnwindInfo(version, flags, head[1], head[3] & 15, head[3] >> 4, codes, tail)


def _slots(code: int, op_info: int) -> int:
    """How many 16-bit slots an unwind code takes."""
    if code == UWOP_ALLOC_LARGE:
        return 3 if op_info else 2
    if code in (UWOP_SAVE_NONVOL, UWOP_SAVE_XMM128, UWOP_EPILOG):
        return 2
    if code in (UWOP_SAVE_NONVOL_FAR, UWOP_SAVE_XMM128_FAR):
        return 3
    return 1


def _u64(read: Reader, va: int) -> int:
    return int.from_bytes(read(va, 8), "little")


def virtual_unwind(
    read: Reader, handler_type: int, image_base: int, control_pc: int, function_va: int, ctx: Context
) -> UnwindResult:
    """Unwind ``ctx`` out of the function whose RUNTIME_FUNCTION is at ``function_va``.

    ``ctx`` becomes the caller's context. The handler is returned when the
    function's unwind info has one of the ``handler_type`` flags and the PC
    is neither in the prolog nor in an epilog.
    """
    begin_rva, end_rva, unwind_rva = struct.unpack("<III", read(function_va, 12))
    info = _read_info(read, image_base + unwind_rva)
    frame = (ctx.gpr[info.frame_register] - 16 * info.frame_offset) if info.frame_register else ctx.rsp
    establisher = frame & MASK64
    in_prolog = image_base + begin_rva <= control_pc < image_base + begin_rva + info.prolog_size
    if not in_prolog and not info.flags & UNW_FLAG_CHAININFO:
        if _inside_epilog(read, control_pc, image_base, begin_rva, end_rva):
            _interpret_epilog(read, control_pc, ctx)
            return UnwindResult(None, 0, establisher)
    machine_frame = False
    depth = 0
    while True:
        frame = (ctx.gpr[info.frame_register] - 16 * info.frame_offset) if info.frame_register else ctx.rsp
        in_prolog = image_base + begin_rva <= control_pc < image_base + begin_rva + info.prolog_size
        prolog_offset = control_pc - image_base - begin_rva if in_prolog else None
        index = 0
        codes = info.codes
        while index < len(codes):
            slot = codes[index]
            offset, code, op_info = slot & 0xFF, (slot >> 8) & 15, slot >> 12
            size = _slots(code, op_info)
            if index + size > len(codes):
                raise UnwindError(f"truncated unwind code at {control_pc:#x}")
            if prolog_offset is not None and prolog_offset < offset and code != UWOP_EPILOG:
                index += size
                continue
            if code == UWOP_PUSH_NONVOL:
                ctx.gpr[op_info] = _u64(read, ctx.rsp)
                ctx.rsp += 8
            elif code == UWOP_ALLOC_LARGE:
                if op_info:
                    ctx.rsp += codes[index + 1] | codes[index + 2] << 16
                else:
                    ctx.rsp += 8 * codes[index + 1]
            elif code == UWOP_ALLOC_SMALL:
                ctx.rsp += 8 * (op_info + 1)
            elif code == UWOP_SET_FPREG:
                ctx.rsp = frame
            elif code == UWOP_SAVE_NONVOL:
                ctx.gpr[op_info] = _u64(read, frame + 8 * codes[index + 1])
            elif code == UWOP_SAVE_NONVOL_FAR:
                ctx.gpr[op_info] = _u64(read, frame + (codes[index + 1] | codes[index + 2] << 16))
            elif code == UWOP_SAVE_XMM128:
                ctx.xmm[op_info] = int.from_bytes(read(frame + 16 * codes[index + 1], 16), "little")
            elif code == UWOP_SAVE_XMM128_FAR:
                ctx.xmm[op_info] = int.from_bytes(read(frame + (codes[index + 1] | codes[index + 2] << 16), 16),
                                                  "little")
            elif code == UWOP_PUSH_MACHFRAME:
                if op_info:
                    ctx.rsp += 8
                ctx.rip = _u64(read, ctx.rsp)
                ctx.rsp = _u64(read, ctx.rsp + 24)
                machine_frame = True
            elif code == UWOP_EPILOG:
                pass  # version 2 epilog descriptions: nothing to undo
            else:
                raise UnwindError(f"unknown unwind code {code} at {control_pc:#x}")
            index += size
        if not info.flags & UNW_FLAG_CHAININFO:
            break
        depth += 1
        if depth > 32:
            raise UnwindError(f"unwind info chain too long at {control_pc:#x}")
        begin_rva, _, chained_unwind_rva = struct.unpack("<III", read(info.tail_va, 12))
        info = _read_info(read, image_base + chained_unwind_rva)
    if not machine_frame:
        ctx.rip = _u64(read, ctx.rsp)
        ctx.rsp += 8
    # as on Windows, a chained fragment gets the handler of the function at the end of its chain
    if not info.flags & handler_type or in_prolog:
        return UnwindResult(None, 0, establisher)
    (handler_rva,) = struct.unpack("<I", read(info.tail_va, 4))
    return UnwindResult(image_base + handler_rva, info.tail_va + 4, establisher)


def _sign8(value: int) -> int:
    return value - 0x100 if value & 0x80 else value


def _sign32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def _inside_epilog(read: Reader, pc: int, image_base: int, begin_rva: int, end_rva: int) -> bool:
    """Whether the code at ``pc`` is an epilog: [add rsp / lea rsp], pops, then ret or a jmp out."""
    code = read(pc, 16)
    if code[0] & 0xF8 == 0x48:
        if code[1] == 0x81 and code[0] == 0x48 and code[2] == 0xC4:
            pc += 7
        elif code[1] == 0x83 and code[0] == 0x48 and code[2] == 0xC4:
            pc += 4
        elif code[1] == 0x8D:
            modrm = code[2]
            if code[0] & 0x06 or (modrm >> 3) & 7 != 4 or modrm & 7 == 4:
                return False
            if modrm >> 6 == 1:
                pc += 4
            elif modrm >> 6 == 2:
                pc += 7
            else:
                return False
    for _ in range(64):
        code = read(pc, 8)
        at = 1 if code[0] & 0xF0 == 0x40 else 0
        opcode = code[at]
        if 0x58 <= opcode <= 0x5F:
            pc += at + 1
            continue
        if opcode in (0xC2, 0xC3):
            return True
        if opcode == 0xF3:
            return code[at + 1] == 0xC3
        if opcode in (0xE9, 0xEB):
            if opcode == 0xE9:
                target = pc + at + 5 + _sign32(int.from_bytes(code[at + 1 : at + 5], "little"))
            else:
                target = pc + at + 2 + _sign8(code[at + 1])
            # a jump inside the function is not an epilog's tail call
            if image_base + begin_rva <= target < image_base + end_rva:
                pc = target
                continue
            return False
        return False
    return False


def _interpret_epilog(read: Reader, pc: int, ctx: Context) -> None:
    for _ in range(64):
        code = read(pc, 8)
        rex = 0
        if code[0] & 0xF0 == 0x40:
            rex = code[0] & 15
            code = code[1:]
            pc += 1
        opcode = code[0]
        if 0x58 <= opcode <= 0x5F:
            ctx.gpr[opcode - 0x58 + 8 * (rex & 1)] = _u64(read, ctx.rsp)
            ctx.rsp += 8
            pc += 1
        elif opcode == 0x81:
            ctx.rsp += _sign32(int.from_bytes(code[2:6], "little"))
            pc += 6
        elif opcode == 0x83:
            ctx.rsp += _sign8(code[2])
            pc += 3
        elif opcode == 0x8D:
            base = ctx.gpr[(code[1] & 7) + 8 * (rex & 1)]
            if code[1] >> 6 == 1:
                ctx.rsp = base + _sign8(code[2])
                pc += 3
            else:
                ctx.rsp = base + _sign32(int.from_bytes(code[2:6], "little"))
                pc += 6
        elif opcode in (0xC2, 0xC3, 0xF3):
            ctx.rip = _u64(read, ctx.rsp)
            ctx.rsp += 8 + (int.from_bytes(code[1:3], "little") if opcode == 0xC2 else 0)
            return
        elif opcode == 0xE9:
            pc += 5 + _sign32(int.from_bytes(code[1:5], "little"))
        elif opcode == 0xEB:
            pc += 2 + _sign8(code[1])
        else:
            return
