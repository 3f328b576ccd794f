"""The C heap of the emulated process: first-fit blocks inside one emulator allocation.

Bookkeeping lives on the host (no headers in guest memory), so a guest
overflow cannot corrupt it, and a bad ``free`` is caught by name instead of
crashing later. Blocks are 16-byte aligned, as the Windows heap's are, and
the allocator is deterministic: the same calls give the same addresses, so a
baseline and a patched run of the same calls can be compared address for
address.
"""

from __future__ import annotations

import bisect

__all__ = ["ALIGNMENT", "Heap"]

ALIGNMENT = 16


class Heap:
    """Allocates from [base, base + size); knows every live block's size."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._free: list[tuple[int, int]] = [(base, size)]  # sorted (start, length)
        self._live: dict[int, int] = {}  # start -> requested size
        self._spans: dict[int, int] = {}  # start -> length reserved

    def allocate(self, size: int) -> int | None:
        """A new block of ``size`` bytes (at least one), or None when the heap is exhausted."""
        span = max(ALIGNMENT, (size + ALIGNMENT - 1) & ~(ALIGNMENT - 1))
        for index, (start, length) in enumerate(self._free):
            if length >= span:
                if length == span:
                    del self._free[index]
                else:
                    self._free[index] = (start + span, length - span)
                self._live[start] = size
                self._spans[start] = span
                return start
        return None

    def release(self, va: int) -> bool:
        """Free the block at ``va``; False if no live block starts there."""
        if va not in self._live:
            return False
        del self._live[va]
        span = self._spans.pop(va)
        index = bisect.bisect_left(self._free, (va, 0))
        self._free.insert(index, (va, span))
        # merge with the next, then the previous neighbour
        if index + 1 < len(self._free) and va + span == self._free[index + 1][0]:
            span += self._free[index + 1][1]
            self._free[index] = (va, span)
            del self._free[index + 1]
        if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == va:
            start, length = self._free[index - 1]
            self._free[index - 1] = (start, length + span)
            del self._free[index]
        return True

    def block_size(self, va: int) -> int | None:
        """The requested size of the live block at ``va``."""
        return self._live.get(va)

    def contains(self, va: int) -> bool:
        return self.base <= va < self.base + self.size

    @property
    def live_blocks(self) -> dict[int, int]:
        return dict(self._live)
