"""The emulated process's address space: allocations, page protections, VirtualQuery.

Every byte the guest can touch belongs to one ``Allocation`` (an image, a
stack, the heap, a block from ``allocate_near``), mapped in Unicorn with the
permissions its Windows page protections imply. The space answers the
questions the Win32 memory API answers (VirtualQueryEx, VirtualProtectEx,
VirtualAllocEx near an address, VirtualFreeEx) with the same errors, so a
backend built on it fails where a real process would.

Every allocation is committed as a whole (no reserve-only ranges), pages are
4 KiB and allocation bases are 64 KiB aligned, as on Windows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from unicorn import UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_NONE, UC_PROT_READ, UC_PROT_WRITE, Uc

from ..errors import BackendError, Win32Error
from ..process.win32mem import (
    MEM_COMMIT,
    MEM_FREE,
    PAGE_EXECUTE,
    PAGE_EXECUTE_READ,
    PAGE_EXECUTE_READWRITE,
    PAGE_EXECUTE_WRITECOPY,
    PAGE_GUARD,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    PAGE_SIZE,
    PAGE_WRITECOPY,
    Region,
)

__all__ = [
    "GRANULE",
    "MAX_ALLOCATION",
    "PAGE",
    "USER_MAX",
    "USER_MIN",
    "AddressSpace",
    "Allocation",
    "align_down",
    "align_up",
    "win32_error",
]

PAGE = PAGE_SIZE
GRANULE = 0x10000
USER_MIN = 0x10000  # lpMinimumApplicationAddress
USER_MAX = 0x7FFFFFFEFFFF  # lpMaximumApplicationAddress: the last usable byte
#: The largest single allocation the emulator agrees to map (guest memory is host memory).
MAX_ALLOCATION = 1 << 28

ERROR_INVALID_PARAMETER = 87
ERROR_PARTIAL_COPY = 299
ERROR_INVALID_ADDRESS = 487
ERROR_NOACCESS = 998
_ERROR_NAMES = {
    ERROR_INVALID_PARAMETER: "ERROR_INVALID_PARAMETER",
    ERROR_PARTIAL_COPY: "ERROR_PARTIAL_COPY",
    ERROR_INVALID_ADDRESS: "ERROR_INVALID_ADDRESS",
    ERROR_NOACCESS: "ERROR_NOACCESS",
}

_BASE_PROTECTIONS = {
    PAGE_NOACCESS: UC_PROT_NONE,
    PAGE_READONLY: UC_PROT_READ,
    PAGE_READWRITE: UC_PROT_READ | UC_PROT_WRITE,
    PAGE_WRITECOPY: UC_PROT_READ | UC_PROT_WRITE,
    # x64 pages cannot be execute-only: Windows lets PAGE_EXECUTE be read
    PAGE_EXECUTE: UC_PROT_READ | UC_PROT_EXEC,
    PAGE_EXECUTE_READ: UC_PROT_READ | UC_PROT_EXEC,
    PAGE_EXECUTE_READWRITE: UC_PROT_ALL,
    PAGE_EXECUTE_WRITECOPY: UC_PROT_ALL,
}
_MODIFIERS = PAGE_GUARD | 0x200 | 0x400  # PAGE_GUARD, PAGE_NOCACHE, PAGE_WRITECOMBINE


def align_down(value: int, alignment: int) -> int:
    return value & ~(alignment - 1)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def win32_error(call: str, code: int, message: str) -> Win32Error:
    """The error the agent reports for a failed Win32 call (see hotpatch.apply.protocol.error_for)."""
    name = _ERROR_NAMES.get(code, "")
    shown = f"{code} ({name})" if name else str(code)
    return Win32Error(f"{call} failed with error {shown}: {message}", call, code)


def unicorn_permissions(protect: int) -> int:
    """Unicorn's permissions for a Windows page protection (guard pages fault on any access)."""
    if protect & PAGE_GUARD:
        return UC_PROT_NONE
    return _BASE_PROTECTIONS[protect & 0xFF]


def check_protection(protect: int, call: str) -> None:
    base = protect & ~_MODIFIERS
    if base not in _BASE_PROTECTIONS or (protect & PAGE_GUARD and base == PAGE_NOACCESS):
        raise win32_error(call, ERROR_INVALID_PARAMETER, f"protection {protect:#x} is not valid")


@dataclass
class Allocation:
    """One VirtualAlloc-style allocation (or one mapped image): its pages and their protections."""

    base: int
    size: int
    type: int  # MEM_IMAGE or MEM_PRIVATE
    allocation_protect: int
    label: str
    protects: list[int] = field(default_factory=list)  # one per page

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, va: int) -> bool:
        return self.base <= va < self.end

    def protect_at(self, va: int) -> int:
        return self.protects[(va - self.base) // PAGE]


class AddressSpace:
    """The allocations of one emulated process, kept in step with Unicorn's mappings."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._bases: list[int] = []  # sorted
        self._allocations: dict[int, Allocation] = {}

    # ── lookups ─────────────────────────────────────────────────────────

    def allocations(self) -> list[Allocation]:
        return [self._allocations[b] for b in self._bases]

    def allocation_at(self, va: int) -> Allocation | None:
        index = bisect.bisect_right(self._bases, va) - 1
        if index < 0:
            return None
        allocation = self._allocations[self._bases[index]]
        return allocation if allocation.contains(va) else None

    def is_free(self, base: int, size: int) -> bool:
        if base < USER_MIN or base + size - 1 > USER_MAX:
            return False
        index = bisect.bisect_left(self._bases, base + size)
        if index == 0:
            return True
        previous = self._allocations[self._bases[index - 1]]
        return previous.end <= base

    def pages_allow(self, va: int, size: int, wanted: int) -> bool:
        """Whether every page of [va, va + size) is committed and its protection grants ``wanted``."""
        if size <= 0 or va < 0:
            return False
        page = align_down(va, PAGE)
        while page < va + size:
            allocation = self.allocation_at(page)
            if allocation is None:
                return False
            if unicorn_permissions(allocation.protect_at(page)) & wanted != wanted:
                return False
            page += PAGE
        return True

    def committed(self, va: int, size: int) -> bool:
        return self.pages_allow(va, size, UC_PROT_NONE)

    # ── mapping ─────────────────────────────────────────────────────────

    def map(self, base: int, size: int, protect: int, type_: int, label: str) -> Allocation:
        """Map and commit ``size`` bytes at ``base`` (64 KiB aligned) with one protection."""
        size = align_up(size, PAGE)
        if base % GRANULE or size <= 0:
            raise BackendError(f"cannot map {size:#x} bytes at {base:#x}: not a 64 KiB aligned allocation")
        if size > MAX_ALLOCATION:
            raise BackendError(f"{size:#x} bytes is more than the emulator maps at once ({MAX_ALLOCATION:#x})")
        if not self.is_free(base, size):
            raise BackendError(f"cannot map {size:#x} bytes at {base:#x} for {label}: the range is in use")
        self._uc.mem_map(base, size, unicorn_permissions(protect))
        allocation = Allocation(base, size, type_, protect, label, [protect] * (size // PAGE))
        bisect.insort(self._bases, base)
        self._allocations[base] = allocation
        return allocation

    def unmap(self, base: int) -> Allocation:
        allocation = self._allocations.pop(base)
        self._bases.remove(base)
        self._uc.mem_unmap(allocation.base, allocation.size)
        return allocation

    def set_protection(self, va: int, size: int, protect: int, call: str = "VirtualProtectEx") -> int:
        """Change the protection of every page touching [va, va + size); the old one of the first page.

        Like VirtualProtect, the pages must be committed and in one allocation.
        """
        check_protection(protect, call)
        first = align_down(va, PAGE)
        end = align_up(va + size, PAGE)
        allocation = self.allocation_at(first)
        if size <= 0 or allocation is None or end > allocation.end:
            raise win32_error(call, ERROR_INVALID_ADDRESS, f"{size:#x} bytes at {va:#x} to {protect:#x}")
        index = (first - allocation.base) // PAGE
        old = allocation.protects[index]
        for page in range(index, index + (end - first) // PAGE):
            allocation.protects[page] = protect
        self._uc.mem_protect(first, end - first, unicorn_permissions(protect))
        return old

    # ── VirtualQuery ────────────────────────────────────────────────────

    def query(self, va: int, call: str = "VirtualQueryEx") -> Region:
        if va < 0 or va > USER_MAX:
            raise win32_error(call, ERROR_INVALID_PARAMETER, f"address {va:#x}")
        page = align_down(va, PAGE)
        allocation = self.allocation_at(page)
        if allocation is None:
            index = bisect.bisect_right(self._bases, page)
            end = self._bases[index] if index < len(self._bases) else USER_MAX + 1
            return Region(page, 0, end - page, 0, MEM_FREE, PAGE_NOACCESS, 0)
        index = (page - allocation.base) // PAGE
        protect = allocation.protects[index]
        first = index
        while first > 0 and allocation.protects[first - 1] == protect:
            first -= 1
        last = index
        while last + 1 < len(allocation.protects) and allocation.protects[last + 1] == protect:
            last += 1
        return Region(
            base_va=page,
            allocation_base_va=allocation.base,
            size=(last + 1 - index) * PAGE,
            allocation_protect=allocation.allocation_protect,
            state=MEM_COMMIT,
            protect=protect,
            type=allocation.type,
        )

    # ── finding room ────────────────────────────────────────────────────

    def _gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Free [start, end) ranges overlapping [lo, hi)."""
        gaps = []
        cursor = USER_MIN
        for base in self._bases:
            allocation = self._allocations[base]
            if base > cursor:
                gaps.append((cursor, base))
            cursor = max(cursor, allocation.end)
        gaps.append((cursor, USER_MAX + 1))
        return [(max(s, lo), min(e, hi)) for s, e in gaps if e > lo and s < hi and min(e, hi) > max(s, lo)]

    def find_near(self, anchor: int, size: int, reach: int) -> int | None:
        """The 64 KiB aligned base nearest ``anchor`` where ``size`` free bytes all lie within ``reach``."""
        size = align_up(size, PAGE)
        lo = align_up(max(anchor - reach, USER_MIN), GRANULE)
        hi = min(anchor + reach - size, USER_MAX + 1 - size)  # highest acceptable base
        if size > reach or lo > hi:
            return None
        best: tuple[int, int] | None = None
        for start, end in self._gaps(lo, hi + size):
            first = align_up(start, GRANULE)
            last = align_down(min(end - size, hi), GRANULE)
            if first > last:
                continue
            candidate = min(max(align_down(anchor, GRANULE), first), last)
            distance = abs(candidate - anchor)
            if best is None or distance < best[0]:
                best = (distance, candidate)
        return best[1] if best else None

    def find_anywhere(self, size: int, floor: int = USER_MIN) -> int | None:
        """The lowest 64 KiB aligned base at or above ``floor`` with ``size`` free bytes."""
        size = align_up(size, PAGE)
        for start, end in self._gaps(floor, USER_MAX + 1):
            first = align_up(start, GRANULE)
            if first + size <= end:
                return first
        return None
