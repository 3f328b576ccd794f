"""Where the emulated process keeps things: its fixed addresses, TEB/PEB offsets, register numbering, and
the function that lays a new process out.

Chosen like a Windows process lays itself out: stack and heap low, system DLLs high.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import Uc
from unicorn import x86_const as x86

from ..process.win32mem import MEM_PRIVATE, PAGE_EXECUTE_READ, PAGE_READONLY, PAGE_READWRITE
from .heap import Heap
from .space import GRANULE, PAGE, AddressSpace

__all__ = [
    "ARGUMENT_REGISTERS", "CRT_DATA_OFFSET", "DEFAULT_INSTRUCTION_LIMIT", "GPR", "GUEST_FILETIME",
    "GUEST_PROCESS_ID", "GUEST_THREAD_ID", "HEAP_BASE", "HEAP_SIZE", "KUSER_SHARED_DATA", "LDR_OFFSET",
    "MAX_NESTING", "MODEL_DLL_BASE", "PEB_OFFSET", "PROCESS_DATA_BASE", "PROCESS_DATA_SIZE", "SENTINEL_BASE",
    "STACK_BASE", "STACK_SIZE", "TEB_LAST_ERROR", "TEB_OFFSET", "TEB_TLS_SLOTS", "TLS_ARRAY_OFFSET", "XMM",
    "ProcessLayout", "lay_out",
]

DEFAULT_INSTRUCTION_LIMIT = 50_000_000
STACK_SIZE = 0x100000
HEAP_SIZE = 0x4000000
MAX_NESTING = 64

STACK_BASE = 0x100000
HEAP_BASE = 0x10000000
PROCESS_DATA_BASE = 0x7FFD00000000
SENTINEL_BASE = 0x7FFD00100000
MODEL_DLL_BASE = 0x7FFB00000000
KUSER_SHARED_DATA = 0x7FFE0000

# Inside the process-data allocation.
TEB_OFFSET = 0x0000
PEB_OFFSET = 0x2000
LDR_OFFSET = 0x2800
TLS_ARRAY_OFFSET = 0x3000
CRT_DATA_OFFSET = 0x4000  # errno, FILE objects, ... (see models.crt)
PROCESS_DATA_SIZE = 0x10000
TEB_TLS_SLOTS = 0x1480
TEB_LAST_ERROR = 0x68

#: Unicorn register ids in unwind numbering (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15).
GPR = (
    x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RBX,
    x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBP, x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI,
    x86.UC_X86_REG_R8, x86.UC_X86_REG_R9, x86.UC_X86_REG_R10, x86.UC_X86_REG_R11,
    x86.UC_X86_REG_R12, x86.UC_X86_REG_R13, x86.UC_X86_REG_R14, x86.UC_X86_REG_R15,
)  # fmt: skip
XMM = tuple(getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16))
ARGUMENT_REGISTERS = (x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_R8, x86.UC_X86_REG_R9)


GUEST_PROCESS_ID = 0x1F00
GUEST_THREAD_ID = 0x1F04
GUEST_FILETIME = 133485408000000000  # 2024-01-01 00:00 UTC


@dataclass(frozen=True)
class ProcessLayout:
    """Where lay_out put the stack, the heap, the TEB, the PEB and the CRT's data of a new process."""

    stack_limit: int
    stack_base: int
    heap: Heap
    teb: int
    peb: int
    crt_data: int


def lay_out(uc: Uc, space: AddressSpace, guest_pid: int, thread_id: int) -> ProcessLayout:
    """Map the stack, the heap, TEB/PEB/loader data and the sentinel page of a new process; GS points at the TEB."""
    space.map(KUSER_SHARED_DATA, PAGE, PAGE_READONLY, MEM_PRIVATE, "KUSER_SHARED_DATA")
    space.map(STACK_BASE, STACK_SIZE, PAGE_READWRITE, MEM_PRIVATE, "stack")
    stack_limit, stack_base = STACK_BASE, STACK_BASE + STACK_SIZE
    space.map(HEAP_BASE, HEAP_SIZE, PAGE_READWRITE, MEM_PRIVATE, "heap")
    space.map(PROCESS_DATA_BASE, PROCESS_DATA_SIZE, PAGE_READWRITE, MEM_PRIVATE, "TEB/PEB")
    teb_va = PROCESS_DATA_BASE + TEB_OFFSET
    peb_va = PROCESS_DATA_BASE + PEB_OFFSET
    ldr = PROCESS_DATA_BASE + LDR_OFFSET
    tls_array = PROCESS_DATA_BASE + TLS_ARRAY_OFFSET
    teb = bytearray(0x2000)
    struct.pack_into("<QQQ", teb, 0x00, 0, stack_base, stack_limit)
    struct.pack_into("<Q", teb, 0x30, teb_va)
    struct.pack_into("<QQ", teb, 0x40, guest_pid, thread_id)
    struct.pack_into("<QQ", teb, 0x58, tls_array, peb_va)
    uc.mem_write(teb_va, bytes(teb))
    peb = bytearray(0x800)
    struct.pack_into("<QQ", peb, 0x10, 0, ldr)
    struct.pack_into("<Q", peb, 0x30, HEAP_BASE)  # ProcessHeap
    uc.mem_write(peb_va, bytes(peb))
    # PEB_LDR_DATA with its three module lists empty (each head points at itself)
    lists = b"".join(struct.pack("<QQ", ldr + off, ldr + off) for off in (0x10, 0x20, 0x30))
    uc.mem_write(ldr, struct.pack("<IB3xQ", 0x58, 1, 0) + lists)
    space.map(SENTINEL_BASE, GRANULE, PAGE_EXECUTE_READ, MEM_PRIVATE, "emulator return addresses")
    uc.mem_write(SENTINEL_BASE, b"\xf4" * GRANULE)  # hlt: never executed, emulation stops first
    uc.reg_write(x86.UC_X86_REG_GS_BASE, teb_va)
    return ProcessLayout(stack_limit, stack_base, Heap(HEAP_BASE, HEAP_SIZE), teb_va, peb_va,
                         PROCESS_DATA_BASE + CRT_DATA_OFFSET)
