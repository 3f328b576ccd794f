"""Exception handlers a moved function's unwind info may name, and the shape of their data.

UNWIND_INFO ends with a handler RVA followed by language-specific data that
only the handler reads. The builder must copy that data with every RVA in it
rebased, so it carries a handler's data only when it knows the layout:

- GCC's personalities (mingw-w64): one RVA of an LSDA;
- ``__C_specific_handler``: a scope table of (begin, end, handler, target) RVAs;
- MSVC's ``__GSHandlerCheck``: a GS_HANDLER_DATA, no RVA at all (a frame
  offset of the stack cookie, and an alignment when bit 2 says so). Linked
  statically into each image and usually nameless there, it is known by its
  body: it hands ``DispatcherContext->HandlerData`` to ``__GSHandlerCheckCommon``
  and returns ExceptionContinueSearch.

- MSVC's ``__CxxFrameHandler4`` (C++ exceptions): the RVA of a compressed
  FuncInfo4, whose maps hold more RVAs (``fh4_blocks`` walks them as
  vcruntime's ehdata4 reads them);
- ``__GSHandlerCheck_EH4``: that RVA, then a GS_HANDLER_DATA. Nameless like
  ``__GSHandlerCheck``, it is known by its body: the GS check on the data after
  the RVA, then a call to the ``__CxxFrameHandler4`` import.

Every other handler (``__CxxFrameHandler3``, ``__GSHandlerCheck_SEH``...)
keeps the function out of a package.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "CXX_FRAME_HANDLER4",
    "C_SPECIFIC_HANDLER",
    "GCC_PERSONALITIES",
    "GS_HANDLER_CHECK",
    "GS_HANDLER_CHECK_EH4",
    "Fh4Block",
    "Fh4Error",
    "fh4_blocks",
    "gs_handler_data_size",
    "is_gs_handler_check",
    "is_gs_handler_check_eh4",
]

#: personality routines whose language-specific data is one RVA of a GCC LSDA
GCC_PERSONALITIES = frozenset({"__gxx_personality_seh0", "__gcc_personality_seh0", "_GCC_specific_handler"})
C_SPECIFIC_HANDLER = "__C_specific_handler"
GS_HANDLER_CHECK = "__GSHandlerCheck"
CXX_FRAME_HANDLER4 = "__CxxFrameHandler4"
GS_HANDLER_CHECK_EH4 = "__GSHandlerCheck_EH4"

# sub rsp,28h; mov r8,[r9+38h]; mov rcx,rdx; mov rdx,r9; call common; mov eax,1; add rsp,28h; ret
_GS_HANDLER_CHECK_BODY = re.compile(
    rb"\x48\x83\xec\x28\x4d\x8b\x41\x38\x48\x8b\xca\x49\x8b\xd1\xe8(.{4})\xb8\x01\x00\x00\x00\x48\x83\xc4\x28\xc3",
    re.DOTALL,
)
_CALL_END = 19  # offset of the instruction after the call, in the body above
# __GSHandlerCheckCommon tests HandlerData's "has alignment" bit: test byte ptr [r8], 4
_TESTS_ALIGNMENT_BIT = b"\x41\xf6\x00\x04"
_HAS_ALIGNMENT = 4


def is_gs_handler_check(memory: bytes, rva: int) -> bool:
    """Whether the code at ``rva`` is MSVC's __GSHandlerCheck (its body, and a callee that reads GS data)."""
    match = _GS_HANDLER_CHECK_BODY.fullmatch(memory, rva, rva + _CALL_END + 10)
    if match is None:
        return False
    common = rva + _CALL_END + struct.unpack("<i", match[1])[0]
    return 0 <= common < len(memory) and _TESTS_ALIGNMENT_BIT in memory[common:common + 24]


# mov rbx,[r9+38h]; mov rsi,rdx; mov r14,r8; mov rbp,rcx; mov rdx,r9; mov rcx,rsi; mov rdi,r9;
# lea r8,[rbx+4]; call __GSHandlerCheckCommon ... mov r9,rdi; mov r8,r14; mov rdx,rsi; mov rcx,rbp; call FH4
_GS_EH4_CHECK = re.compile(rb"\x49\x8b\x59\x38\x48\x8b\xf2\x4d\x8b\xf0\x48\x8b\xe9\x49\x8b\xd1\x48\x8b\xce"
                           rb"\x49\x8b\xf9\x4c\x8d\x43\x04\xe8(.{4})", re.DOTALL)
_GS_EH4_CALL = re.compile(rb"\x4c\x8b\xcf\x4d\x8b\xc6\x48\x8b\xd6\x48\x8b\xcd\xe8(.{4})", re.DOTALL)
_GS_EH4_REACH = 0x80


def is_gs_handler_check_eh4(memory: bytes, rva: int, calls_fh4: Callable[[int], bool]) -> bool:
    """Whether the code at ``rva`` is MSVC's __GSHandlerCheck_EH4: the GS check on ``HandlerData + 4`` (a
    callee that reads GS data), then ``calls_fh4(target)`` holds for what it hands the exception to."""
    check = _GS_EH4_CHECK.search(memory, rva, rva + _GS_EH4_REACH)
    if check is None:
        return False
    common = check.end() + struct.unpack("<i", check[1])[0]
    if not (0 <= common < len(memory) and _TESTS_ALIGNMENT_BIT in memory[common:common + 24]):
        return False
    call = _GS_EH4_CALL.search(memory, check.end(), rva + _GS_EH4_REACH)
    return call is not None and calls_fh4(call.end() + struct.unpack("<i", call[1])[0])


def gs_handler_data_size(memory: bytes, rva: int) -> int:
    """Bytes of the GS_HANDLER_DATA at ``rva``: the cookie offset, plus base offset and alignment if flagged."""
    (cookie_offset,) = struct.unpack_from("<I", memory, rva)
    return 12 if cookie_offset & _HAS_ALIGNMENT else 4


# ── __CxxFrameHandler4's compressed metadata (vcruntime's ehdata4_export.h) ──

#: bytes of a compressed unsigned, by the low nibble of its first byte
_FH4_LENGTH = (1, 2, 1, 3, 1, 2, 1, 4, 1, 2, 1, 3, 1, 2, 1, 5)
# FuncInfoHeader bits
_IS_CATCH, _IS_SEPARATED, _BBT, _UNWIND_MAP, _TRY_BLOCK_MAP = 0x01, 0x02, 0x04, 0x08, 0x10
# HandlerTypeHeader bits and fields
_ADJECTIVES, _DISP_TYPE, _DISP_CATCH_OBJ, _CONT_IS_RVA = 0x01, 0x02, 0x04, 0x08
_UW_DTOR_OBJ, _UW_DTOR_PTR, _UW_RVA = 1, 2, 3
#: a bound on entry counts: real maps hold tens
_FH4_MAX_ENTRIES = 4096


class Fh4Error(ValueError):
    """Metadata that does not read as FH4: the function stays out of a package."""


@dataclass
class Fh4Block:
    """One compressed FH4 structure: ``[rva, end)`` in the image and the int32 RVAs inside it.

    ``rvas`` holds (offset in the block, RVA stored there, what it designates): ``"block"`` another
    FH4 structure (in ``fh4_blocks``' answer), ``"code"`` a funclet or continuation, ``"data"`` a C++
    type descriptor.
    """

    rva: int
    end: int = 0
    rvas: list[tuple[int, int, str]] = field(default_factory=list)


class _Reader:
    def __init__(self, memory: bytes, block: Fh4Block) -> None:
        self.memory, self.block, self.at = memory, block, block.rva

    def byte(self) -> int:
        self._need(1)
        self.at += 1
        return self.memory[self.at - 1]

    def unsigned(self) -> int:
        self._need(1)
        length = _FH4_LENGTH[self.memory[self.at] & 0x0F]
        self._need(length)
        raw = self.memory[self.at:self.at + length]
        self.at += length
        return int.from_bytes(raw[1:], "little") if length == 5 else int.from_bytes(raw, "little") >> length

    def rva(self, what: str) -> int:
        self._need(4)
        (value,) = struct.unpack_from("<i", self.memory, self.at)
        if value <= 0 or value >= len(self.memory):
            raise Fh4Error(f"FH4 metadata at {self.block.rva:#x}: RVA {value:#x} outside the image")
        self.block.rvas.append((self.at - self.block.rva, value, what))
        self.at += 4
        return value

    def count(self) -> int:
        value = self.unsigned()
        if value > _FH4_MAX_ENTRIES:
            raise Fh4Error(f"FH4 metadata at {self.block.rva:#x}: {value} entries")
        return value

    def done(self) -> Fh4Block:
        self.block.end = self.at
        return self.block

    def _need(self, size: int) -> None:
        if self.at + size > len(self.memory):
            raise Fh4Error(f"FH4 metadata at {self.block.rva:#x} runs past the image")


def fh4_blocks(memory: bytes, func_info: int) -> dict[int, Fh4Block]:
    """Every structure reached from the FuncInfo4 at ``func_info``, by RVA (raises Fh4Error)."""
    blocks: dict[int, Fh4Block] = {}
    pending = [(func_info, _func_info)]
    while pending:
        rva, read = pending.pop()
        if rva in blocks:
            continue
        reader = _Reader(memory, Fh4Block(rva))
        pending += read(reader)
        blocks[rva] = reader.done()
    return blocks


_Next = list[tuple[int, object]]


def _func_info(r: _Reader) -> _Next:
    header = r.byte()
    out: _Next = []
    if header & _BBT:
        r.unsigned()
    if header & _UNWIND_MAP:
        out.append((r.rva("block"), _unwind_map))
    if header & _TRY_BLOCK_MAP:
        out.append((r.rva("block"), _try_block_map))
    out.append((r.rva("block"), _separated_map if header & _IS_SEPARATED else _ip_to_state_map))
    if header & _IS_CATCH:
        r.unsigned()  # dispFrame
    return out


def _unwind_map(r: _Reader) -> _Next:
    for _ in range(r.count()):
        kind = r.unsigned() & 3  # nextOffset << 2 | type
        if kind in (_UW_DTOR_OBJ, _UW_DTOR_PTR):
            r.rva("code")
            r.unsigned()  # the object's frame offset
        elif kind == _UW_RVA:
            r.rva("code")
    return []


def _try_block_map(r: _Reader) -> _Next:
    out: _Next = []
    for _ in range(r.count()):
        r.unsigned(), r.unsigned(), r.unsigned()  # tryLow, tryHigh, catchHigh
        out.append((r.rva("block"), _handler_map))
    return out


def _handler_map(r: _Reader) -> _Next:
    for _ in range(r.count()):
        header = r.byte()
        if header & _ADJECTIVES:
            r.unsigned()
        if header & _DISP_TYPE:
            r.rva("data")
        if header & _DISP_CATCH_OBJ:
            r.unsigned()
        r.rva("code")  # the catch funclet
        continuations = (header >> 4) & 3
        if continuations == 3:
            raise Fh4Error(f"FH4 handler map at {r.block.rva:#x}: reserved continuation count")
        for _ in range(continuations):  # continuation addresses
            if header & _CONT_IS_RVA:
                r.rva("code")
            else:
                r.unsigned()  # function-relative: moves with the function
    return []


def _ip_to_state_map(r: _Reader) -> _Next:
    for _ in range(r.count()):
        r.unsigned(), r.unsigned()  # IP offset from the function start, state + 1
    return []


def _separated_map(r: _Reader) -> _Next:
    out: _Next = []
    for _ in range(r.count()):
        r.rva("code")  # the segment's start
        out.append((r.rva("block"), _ip_to_state_map))
    return out
