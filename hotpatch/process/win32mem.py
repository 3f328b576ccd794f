"""Win32 memory constants (winnt.h) and the VirtualQuery answer, shared by every process backend.

The live backends (``apply``) and the emulated process (``emulation``) both
speak them; neither owns them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MEM_COMMIT",
    "MEM_FREE",
    "MEM_IMAGE",
    "MEM_MAPPED",
    "MEM_PRIVATE",
    "MEM_RESERVE",
    "PAGE_EXECUTE",
    "PAGE_EXECUTE_READ",
    "PAGE_EXECUTE_READWRITE",
    "PAGE_EXECUTE_WRITECOPY",
    "PAGE_GUARD",
    "PAGE_NOACCESS",
    "PAGE_SIZE",
    "PAGE_READONLY",
    "PAGE_READWRITE",
    "PAGE_WRITECOPY",
    "Region",
    "is_executable",
    "is_writable",
]

# Page protections (winnt.h).
#: the x64 page: protection and commit granularity (allocations are 64 KiB apart: GRANULE in emulation)
PAGE_SIZE = 0x1000

PAGE_NOACCESS = 0x01
PAGE_READONLY = 0x02
PAGE_READWRITE = 0x04
PAGE_WRITECOPY = 0x08
PAGE_EXECUTE = 0x10
PAGE_EXECUTE_READ = 0x20
PAGE_EXECUTE_READWRITE = 0x40
PAGE_EXECUTE_WRITECOPY = 0x80
PAGE_GUARD = 0x100

# Region states and types (VirtualQueryEx).
MEM_COMMIT = 0x1000
MEM_RESERVE = 0x2000
MEM_FREE = 0x10000
MEM_PRIVATE = 0x20000
MEM_MAPPED = 0x40000
MEM_IMAGE = 0x1000000

_WRITABLE = PAGE_READWRITE | PAGE_WRITECOPY | PAGE_EXECUTE_READWRITE | PAGE_EXECUTE_WRITECOPY
_EXECUTABLE = PAGE_EXECUTE | PAGE_EXECUTE_READ | PAGE_EXECUTE_READWRITE | PAGE_EXECUTE_WRITECOPY


def is_writable(protect: int) -> bool:
    return bool(protect & _WRITABLE)


def is_executable(protect: int) -> bool:
    return bool(protect & _EXECUTABLE)


@dataclass(frozen=True)
class Region:
    """One VirtualQueryEx answer: a run of pages with the same state and protection."""

    base_va: int
    allocation_base_va: int
    size: int
    allocation_protect: int
    state: int
    protect: int
    type: int

    @property
    def is_free(self) -> bool:
        return self.state == MEM_FREE

    @property
    def is_committed(self) -> bool:
        return self.state == MEM_COMMIT
