"""The one statement of how an x64 UNWIND_INFO is laid out: its flags and where each part of it ends.

    UBYTE version:3, flags:5; UBYTE prolog size; UBYTE code count; UBYTE frame register:4, offset:4
    USHORT codes[count], padded to an even count
    then a handler RVA (+ its data) if EHANDLER/UHANDLER, or a RUNTIME_FUNCTION (12 bytes) if CHAININFO

Read by the builder (from the patched file), the package checks (from a
blob) and the emulator's unwinder (from emulated memory).
"""

from __future__ import annotations

__all__ = [
    "UNW_FLAG_CHAININFO",
    "UNW_FLAG_EHANDLER",
    "UNW_FLAG_NHANDLER",
    "UNW_FLAG_UHANDLER",
    "RUNTIME_FUNCTION_SIZE",
    "fixed_size",
    "tail_offset",
]

UNW_FLAG_NHANDLER = 0
UNW_FLAG_EHANDLER = 1
UNW_FLAG_UHANDLER = 2
UNW_FLAG_CHAININFO = 4
RUNTIME_FUNCTION_SIZE = 12


def tail_offset(code_count: int) -> int:
    """Offset, from the UNWIND_INFO's start, of what follows its code slots: handler RVA or chained entry."""
    return 4 + 2 * (code_count + (code_count & 1))


def fixed_size(flags: int, code_count: int) -> int:
    """Bytes the OS reads: header, slots, and the handler RVA or chained RUNTIME_FUNCTION (not handler data)."""
    size = tail_offset(code_count)
    if flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER):
        return size + 4
    if flags & UNW_FLAG_CHAININFO:
        return size + RUNTIME_FUNCTION_SIZE
    return size
