"""Models of kernel32's and ntdll's memory functions: the heap through the Win32 API, and virtual memory.

Heap blocks come from the C heap (``crt``); VirtualAlloc reserves and
commits in the emulated address space at allocation granularity, as Windows
does, and VirtualProtect/VirtualQuery answer from its pages.
"""

from __future__ import annotations

import struct

from ..errors import Win32Error
from ..process.win32mem import MEM_PRIVATE, PAGE_READWRITE
from ..x86 import MASK64
from .crt import allocate, reallocate, release
from .machine import ModelCall
from .models import model
from .space import GRANULE, align_down
from .win32 import ERROR_INVALID_PARAMETER, K32

__all__: list[str] = []

ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_BAD_LENGTH = 24
HEAP_ZERO_MEMORY = 0x8
MEM_RELEASE = 0x8000


# ── the heap through the Win32 API ────────────────────────────────────────


@model("GetProcessHeap", families=K32)
def _get_process_heap(c: ModelCall) -> int:
    return c.machine.heap.base


@model("HeapCreate", families=K32)
def _heap_create(c: ModelCall) -> int:
    return c.machine.heap.base  # one heap serves every handle


@model("HeapDestroy", families=K32)
def _heap_destroy(c: ModelCall) -> int:
    return 1


@model("HeapAlloc", families=K32)
@model("RtlAllocateHeap", families=("ntdll",))
def _heap_alloc(c: ModelCall) -> int:
    va = allocate(c, c.arg(2), zero=bool(c.arg32(1) & HEAP_ZERO_MEMORY))
    if not va:
        c.machine.set_last_error(ERROR_NOT_ENOUGH_MEMORY)
    return va


@model("HeapFree", families=K32)
@model("RtlFreeHeap", families=("ntdll",))
def _heap_free(c: ModelCall) -> int:
    release(c, c.arg(2))
    return 1


@model("HeapReAlloc", families=K32)
@model("RtlReAllocateHeap", families=("ntdll",))
def _heap_realloc(c: ModelCall) -> int:
    return reallocate(c, c.arg(2), c.arg(3))


@model("HeapSize", families=K32)
@model("RtlSizeHeap", families=("ntdll",))
def _heap_size(c: ModelCall) -> int:
    size = c.machine.heap.block_size(c.arg(2))
    return MASK64 if size is None else size


@model("LocalAlloc", "GlobalAlloc", families=K32)
def _local_alloc(c: ModelCall) -> int:
    return allocate(c, c.arg(1), zero=bool(c.arg32(0) & 0x40))  # LMEM_ZEROINIT


@model("LocalFree", "GlobalFree", families=K32)
def _local_free(c: ModelCall) -> int:
    release(c, c.arg(0))
    return 0


# ── virtual memory ────────────────────────────────────────────────────────


@model("VirtualQuery", families=K32)
def _virtual_query(c: ModelCall) -> int:
    if c.arg(2) < 48:
        c.machine.set_last_error(ERROR_BAD_LENGTH)
        return 0
    try:
        region = c.machine.space.query(c.arg(0), "VirtualQuery")
    except Win32Error as exc:
        c.machine.set_last_error(exc.code)
        return 0
    info = struct.pack("<QQIHHQIIII", region.base_va, region.allocation_base_va, region.allocation_protect, 0, 0,
                       region.size, region.state, region.protect, region.type, 0)
    c.machine.write(c.arg(1), info, c.label)
    return 48


@model("VirtualProtect", families=K32)
def _virtual_protect(c: ModelCall) -> int:
    try:
        old = c.machine.space.set_protection(c.arg(0), c.arg(1), c.arg32(2), "VirtualProtect")
    except Win32Error as exc:
        c.machine.set_last_error(exc.code)
        return 0
    c.machine.uc.ctl_remove_cache(c.arg(0), c.arg(0) + c.arg(1))
    if c.arg(3):
        c.machine.put_u32(c.arg(3), old, c.label)
    return 1


@model("VirtualAlloc", families=K32)
def _virtual_alloc(c: ModelCall) -> int:
    wanted, size, protect = c.arg(0), c.arg(1), c.arg32(3)
    space = c.machine.space
    if wanted and space.committed(wanted, size):
        return wanted  # committing what is already committed
    base = align_down(wanted, GRANULE) if wanted else space.find_anywhere(size)
    if base is None or not size or not space.is_free(base, size):
        c.machine.set_last_error(ERROR_NOT_ENOUGH_MEMORY if not wanted else 487)
        return 0
    try:
        space.map(base, size, protect or PAGE_READWRITE, MEM_PRIVATE, "VirtualAlloc")
    except Win32Error as exc:
        c.machine.set_last_error(exc.code)
        return 0
    return base


@model("VirtualFree", families=K32)
def _virtual_free(c: ModelCall) -> int:
    allocation = c.machine.space.allocation_at(c.arg(0))
    if (allocation is None or allocation.base != c.arg(0) or allocation.label != "VirtualAlloc"
            or not c.arg32(2) & MEM_RELEASE):
        c.machine.set_last_error(ERROR_INVALID_PARAMETER)
        return 0
    c.machine.space.unmap(allocation.base)
    return 1


@model("FlushInstructionCache", families=K32)
def _flush_instruction_cache(c: ModelCall) -> int:
    c.machine.uc.ctl_remove_cache(c.arg(1), c.arg(1) + c.arg(2))
    return 1
