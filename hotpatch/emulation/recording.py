"""Which guest bytes a run of calls wrote: watched ranges, their bytes before the first write and after the last.

``verify`` compares what the baseline with the package and the patched image
wrote to their writable sections and allocations.
"""

from __future__ import annotations

from unicorn import UC_HOOK_MEM_WRITE, Uc

__all__ = ["WriteRecorder"]


class WriteRecorder:
    """Guest writes into watched ranges of one CPU, between ``start`` and ``stop``."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self._before: dict[int, int] | None = None  # VA -> its byte before the first write; None: not recording
        self._watches: dict[int, tuple[int, int]] = {}  # hook handle -> [begin, end)

    def watch(self, begin: int, end: int) -> int:
        handle = self.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, begin=begin, end=end - 1)
        self._watches[handle] = (begin, end)
        return handle

    def unwatch(self, handle: int) -> None:
        self.uc.hook_del(handle)
        self._watches.pop(handle, None)

    def _on_write(self, uc: Uc, access: int, address: int, size: int, value: int, data: object) -> None:
        self.record(address, size)

    def record(self, address: int, size: int) -> None:
        """Note a write about to happen (the guest's through the hook, the host's through Machine.write)."""
        before = self._before
        if before is None:
            return
        for begin, end in self._watches.values():
            lo, hi = max(address, begin), min(address + size, end)
            if lo < hi:
                old = self.uc.mem_read(lo, hi - lo)
                for offset in range(hi - lo):
                    before.setdefault(lo + offset, old[offset])

    def start(self) -> None:
        self._before = {}

    def stop(self) -> list[tuple[int, bytes, bytes]]:
        """The runs of bytes written since ``start``: (VA, bytes before, bytes now)."""
        before, self._before = self._before, None
        if before is None:
            return []
        runs: list[tuple[int, bytes, bytes]] = []
        addresses = sorted(before)
        start = 0
        for index in range(1, len(addresses) + 1):
            if index == len(addresses) or addresses[index] != addresses[index - 1] + 1:
                first = addresses[start]
                runs.append((first, bytes(before[a] for a in addresses[start:index]),
                             bytes(self.uc.mem_read(first, index - start))))
                start = index
        return runs
