"""Discovery's layout kept up to date as function starts are found: each start's (rva, ranges) item and
the places in the gaps between functions where code could begin.

Discovery's fixed-point loop adds a few starts a round to tens of thousands (26 rounds on a large MSVC
image). A new start changes only its own item and the one of the start before it, which now ends
earlier; so do the gaps. The layout keeps the items and the gaps' places by start and recomputes only
what those starts touch, instead of rebuilding everything every round; the result is the same as
building it from scratch (tests/test_discovery_layout.py checks both after random insertions).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Item", "Layout"]

#: (rva, ranges): a function's entry and its byte ranges, the primary one first
Item = tuple[int, tuple[tuple[int, int], ...]]


class Layout:
    """Every known function start with its current item, sorted by RVA.

    A start listed by .pdata has its .pdata ranges; any other ends before the next known start (its
    ``raw`` item), or earlier where the caller bounds it (``bound``)."""

    def __init__(self, code_section: Callable[[int], Any], pdata: dict[int, Any]) -> None:
        #: ``Image.code_section`` (memoised by the caller)
        self._code_section = code_section
        self._pdata = pdata
        self.starts: list[int] = []
        #: start -> its item as the loop last bounded it
        self.items: dict[int, Item] = {}
        #: start -> its item bounded only by the next start (pdata starts: their .pdata ranges)
        self.raw: dict[int, Item] = {}
        #: start -> the places of the gap after its function (``gap_places``), and all of them together
        self._gaps: dict[int, list[int]] = {}
        self._places: set[int] = set()
        #: starts whose item or next start changed since their gap was last looked at
        self._stale: set[int] = set()

    def __len__(self) -> int:
        return len(self.starts)

    def insert(self, new: Iterable[int]) -> list[tuple[int, Item | None]]:
        """Add starts; return, sorted, the starts whose raw item is new or changed (each new start and
        the one before it, which now ends earlier), each with its item before (None if new). Their
        ``items`` are the raw ones until bounded."""
        added = sorted(set(new).difference(self.raw))
        if not added:
            return []
        starts = self.starts
        starts.extend(added)
        starts.sort()  # one sorted run and a short one: a merge
        touched = set(added)
        for rva in added:
            index = bisect_left(starts, rva)
            if index:
                touched.add(starts[index - 1])
        self._stale |= touched
        changed = []
        for rva in sorted(touched):
            raw = self._raw_item(rva)
            if self.raw.get(rva) != raw:
                changed.append((rva, self.items.get(rva)))
                self.raw[rva] = self.items[rva] = raw
        return changed

    def bound(self, rva: int, item: Item) -> None:
        """Set the item of start ``rva`` (its raw item cut where its reachable code ends)."""
        self.items[rva] = item
        self._stale.add(rva)

    def ordered(self) -> list[Item]:
        """Every item, sorted by RVA."""
        items = self.items
        return [items[rva] for rva in self.starts]

    def at_or_before(self, rva: int) -> Item | None:
        """The item of the last start at or before ``rva``."""
        index = bisect_right(self.starts, rva) - 1
        return self.items[self.starts[index]] if index >= 0 else None

    def following(self, rva: int) -> int | None:
        """The first start after ``rva``."""
        index = bisect_right(self.starts, rva)
        return self.starts[index] if index < len(self.starts) else None

    def places(self, memory: bytes, kernels: Any) -> set[int]:
        """Places outside every function where code could begin: ``kernels.gap_starts`` of the current
        items, with only the gaps whose bounds changed looked at again. The set is the layout's own:
        read it, do not change it."""
        gaps, places = self._gaps, self._places
        # every stale gap's old places go before any new ones come: a place can move from one gap to
        # another (into the gap after a new start)
        for rva in self._stale:
            old = gaps.pop(rva, None)
            if old:
                places.difference_update(old)
        for rva in self._stale:
            fresh = self._gap_places(memory, rva, kernels)
            if fresh:
                gaps[rva] = fresh
                places.update(fresh)
        self._stale.clear()
        return places

    def _gap_places(self, memory: bytes, rva: int, kernels: Any) -> list[int]:
        """The places of the gap between the function at ``rva`` and the next start in its section."""
        section = self._code_section(rva)
        if section is None:
            return []  # a .pdata entry outside the executable sections bounds no gap
        high = section.end_rva
        following = self.following(rva)
        limit = following if following is not None and following < high else high
        end = self.items[rva][1][0][1]
        return kernels.gap_places(memory, end, limit) if end < limit else []

    def _raw_item(self, rva: int) -> Item:
        runtime = self._pdata.get(rva)
        if runtime is not None:
            return (rva, ((rva, runtime.end_rva),) + runtime.fragments)
        section = self._code_section(rva)
        assert section is not None
        limit = min(section.rva + section.virtual_size if section.virtual_size else section.end_rva,
                    section.end_rva)
        following = self.following(rva)
        if following is not None:
            limit = min(limit, following)
        return (rva, ((rva, limit),))
