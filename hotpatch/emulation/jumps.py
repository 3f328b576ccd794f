"""Models of the C runtime's non-local jumps: ``_setjmp`` and ``longjmp``, as msvcrt does them on x64.

mingw-w64 compiles ``setjmp(buf)`` to ``_setjmp(buf, __builtin_frame_address(0))``
(MSVC to ``_setjmp(buf, establisher frame)``): the second argument is the
frame of the function that called setjmp. ``_setjmp`` saves the non-volatile
registers, rsp after its return, the return address, MXCSR, the x87 control
word and xmm6-15 in the buffer (``_JUMP_BUFFER``, 256 bytes) and returns 0.

``longjmp(buf, value)`` makes that setjmp return again with ``value`` (1 for 0).
With a frame in the buffer it first unwinds, as msvcrt does through
``RtlUnwind(frame, rip, STATUS_LONGJUMP record, value)``: every frame between
longjmp's caller and the target runs its unwind handler (``__finally`` blocks
of ``__C_specific_handler`` scope tables, GCC cleanups), and the target frame is
the one whose establisher frame is the saved frame. At the end, as ntdll's
RtlRestoreContext does for STATUS_LONGJUMP, the registers come from the buffer,
not from the unwound context (the function may have changed them after setjmp).
Without a frame (NULL), longjmp restores the buffer's registers at once, in
the nesting level of guest calls it runs in (a frameless jump out of a
callback that a model called, such as a constructor run by ``_initterm``, is
not modelled; with a frame the unwind crosses levels as exceptions do).
"""

from __future__ import annotations

import struct

from ..errors import EmulationError
from .machine import ModelCall, Resume
from .models import model
from .seh import make_record, unwind
from .unwind import Context

__all__ = ["JUMP_BUFFER", "JUMP_BUFFER_SIZE", "STATUS_LONGJUMP"]

STATUS_LONGJUMP = 0x80000026
#: _JUMP_BUFFER: Frame, Rbx, Rsp, Rbp, Rsi, Rdi, R12-R15, Rip, then MxCsr (4), FpCsr (2), Spare (2), Xmm6-15
JUMP_BUFFER = struct.Struct("<11QIHH")  # then xmm6-15, 16 bytes each, at XMM_OFFSET
XMM_OFFSET = 0x60
JUMP_BUFFER_SIZE = 0x100
XMM_SAVED = range(6, 16)
# Unwind numbering of the registers the buffer holds, in its order (after Frame).
_SAVED_GPR = (3, 4, 5, 6, 7, 12, 13, 14, 15)  # rbx, rsp, rbp, rsi, rdi, r12-r15
_FPCSR_DEFAULT = 0x27F  # the x87 control word Windows starts threads with


@model("_setjmp", "_setjmpex", "setjmp", "__intrinsic_setjmp", "__intrinsic_setjmpex")
def _setjmp(c: ModelCall) -> int:
    ctx = c.caller_context()  # as the caller sees it once setjmp returns: rsp above the return address
    frame = 0 if c.stub.name == "setjmp" else c.arg(1)
    saved = [ctx.gpr[index] for index in _SAVED_GPR]
    head = JUMP_BUFFER.pack(frame, *saved, ctx.rip, ctx.mxcsr, _FPCSR_DEFAULT, 0)
    xmm = b"".join(ctx.xmm[index].to_bytes(16, "little") for index in XMM_SAVED)
    c.machine.write(c.arg(0), head.ljust(XMM_OFFSET, b"\0") + xmm, c.label)
    return 0


@model("longjmp")
def _longjmp(c: ModelCall) -> None:
    machine, buffer = c.machine, c.arg(0)
    value = c.arg32(1) or 1
    data = machine.read(buffer, JUMP_BUFFER_SIZE, c.label)
    frame, *saved = JUMP_BUFFER.unpack_from(data)
    target_ip = saved[len(_SAVED_GPR)]
    if not frame:
        raise Resume(machine.level, _restored(c.caller_context(), data, value))
    # The STATUS_LONGJUMP record lives on the guest stack below longjmp's own frame (above the unwinder's
    # scratch space), as msvcrt's lives in its stack frame.
    record_va = (c.rsp - 0x100) & ~0xF
    machine.poke(record_va, make_record(STATUS_LONGJUMP, 0, 0, [buffer]))
    try:
        unwind(machine, frame, target_ip, record_va, value, c.caller_context(), c.rsp)
    except Resume as resume:
        resume.context = _restored(resume.context, data, value)
        raise
    raise EmulationError("longjmp: the unwind did not reach its target")  # pragma: no cover - unwind raises


def _restored(ctx: Context, data: bytes, value: int) -> Context:
    """``ctx`` with the registers of the jump buffer ``data`` and rax = ``value``: where setjmp returns again."""
    _, *fields = JUMP_BUFFER.unpack_from(data)
    out = ctx.copy()
    for index, saved in zip(_SAVED_GPR, fields):
        out.gpr[index] = saved
    out.rip = fields[len(_SAVED_GPR)]
    out.mxcsr = fields[len(_SAVED_GPR) + 1]
    for slot, index in enumerate(XMM_SAVED):
        out.xmm[index] = int.from_bytes(data[XMM_OFFSET + 16 * slot : XMM_OFFSET + 16 * slot + 16], "little")
    out.gpr[0] = value
    return out
