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

Every other handler (``__CxxFrameHandler3/4``, ``__GSHandlerCheck_EH4``...)
keeps the function out of a package.
"""

from __future__ import annotations

import re
import struct

__all__ = [
    "C_SPECIFIC_HANDLER",
    "GCC_PERSONALITIES",
    "GS_HANDLER_CHECK",
    "gs_handler_data_size",
    "is_gs_handler_check",
]

#: personality routines whose language-specific data is one RVA of a GCC LSDA
GCC_PERSONALITIES = frozenset({"__gxx_personality_seh0", "__gcc_personality_seh0", "_GCC_specific_handler"})
C_SPECIFIC_HANDLER = "__C_specific_handler"
GS_HANDLER_CHECK = "__GSHandlerCheck"

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


def gs_handler_data_size(memory: bytes, rva: int) -> int:
    """Bytes of the GS_HANDLER_DATA at ``rva``: the cookie offset, plus base offset and alignment if flagged."""
    (cookie_offset,) = struct.unpack_from("<I", memory, rva)
    return 12 if cookie_offset & _HAS_ALIGNMENT else 4
