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
        #: the places the last ``places`` call added
        self.new_places: list[int] = []
        #: a code section's end, and where a function in it ends at the latest, by the section's id
        #: (``end_rva`` is a computed property, asked per start); ``_sections`` keeps those ids taken
        self._section_ends: dict[int, int] = {}
        self._section_limits: dict[int, int] = {}
        self._sections: list[Any] = []

    def __len__(self) -> int:
        return len(self.starts)

    def insert(self, new: Iterable[int]) -> list[tuple[int, Item | None]]:
        """Add starts; return, sorted, the starts whose raw item is new or changed (each new start and
        the one before it, which now ends earlier), each with its item before (None if new). Their
        ``items`` are the raw ones until bounded."""
        raw_items, items, pdata = self.raw, self.items, self._pdata
        added = sorted(set(new).difference(raw_items))
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
        count = len(starts)
        # ``_raw_item`` inlined: the first round lays out every .pdata function at once (tens of thousands)
        for rva in sorted(touched):
            runtime = pdata.get(rva)
            if runtime is not None:
                raw = (rva, ((rva, runtime.end_rva),) + runtime.fragments)
            else:
                limit = self._section_limit(rva)
                index = bisect_right(starts, rva)
                if index < count and starts[index] < limit:
                    limit = starts[index]
                raw = (rva, ((rva, limit),))
            if raw_items.get(rva) != raw:
                changed.append((rva, items.get(rva)))
                raw_items[rva] = items[rva] = raw
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
        items, with only the gaps whose bounds changed looked at again (``kernels.gap_places_many``, all
        in one call). The set is the layout's own: read it, do not change it. ``new_places`` holds the
        places this call added: each place there now that was not there at the previous call is one."""
        gaps, places = self._gaps, self._places
        stale = sorted(self._stale)
        self._stale.clear()
        # every stale gap's old places go before any new ones come: a place can move from one gap to
        # another (into the gap after a new start)
        for rva in stale:
            old = gaps.pop(rva, None)
            if old:
                places.difference_update(old)
        owners, ends, limits = self._gap_bounds(stale)
        added: list[int] = []
        for rva, fresh in zip(owners, kernels.gap_places_many(memory, ends, limits)):
            if fresh:
                gaps[rva] = fresh
                added += fresh
        places.update(added)
        self.new_places = added
        return places

    def _gap_bounds(self, rvas: list[int]) -> tuple[list[int], list[int], list[int]]:
        """The starts among ``rvas`` with a gap after their function before the next start in their
        section, and each gap's bounds (a .pdata entry outside the executable sections bounds no gap)."""
        starts, items, code_section, ends_of = self.starts, self.items, self._code_section, self._section_ends
        count = len(starts)
        owners: list[int] = []
        ends: list[int] = []
        limits: list[int] = []
        for rva in rvas:
            section = code_section(rva)
            if section is None:
                continue
            limit = ends_of.get(id(section))
            if limit is None:
                self._sections.append(section)
                limit = ends_of[id(section)] = section.end_rva
            index = bisect_right(starts, rva)
            if index < count and starts[index] < limit:
                limit = starts[index]
            end = items[rva][1][0][1]
            if end < limit:
                owners.append(rva)
                ends.append(end)
                limits.append(limit)
        return owners, ends, limits

    def _section_limit(self, rva: int) -> int:
        """Where a function starting at ``rva`` (not listed by .pdata) ends at the latest: its section's end."""
        section = self._code_section(rva)
        assert section is not None
        limit = self._section_limits.get(id(section))
        if limit is None:
            self._sections.append(section)
            limit = self._section_limits[id(section)] = min(
                section.rva + section.virtual_size if section.virtual_size else section.end_rva, section.end_rva)
        return limit
