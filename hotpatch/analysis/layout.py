"""Discovery's layout kept up to date as function starts are found: each start's (rva, ranges) item and
the places in the gaps between functions where code could begin.

Discovery's fixed-point loop adds a few starts a round to tens of thousands (26 rounds on a large MSVC
image). A new start changes only its own item and the one of the start before it, which now ends
earlier; so do the gaps. The layout keeps the items and the gaps' places by start and recomputes only
what those starts touch, instead of rebuilding everything every round; the result is the same as
building it from scratch (tests/test_discovery_layout.py checks both after random insertions).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from typing import Any

from . import _discovery_reference

__all__ = ["Item", "Layout"]

#: (rva, ranges): a function's entry and its byte ranges, the primary one first
Item = tuple[int, tuple[tuple[int, int], ...]]


class Layout:
    """Every known function start with its current item, sorted by RVA.

    A start listed by .pdata has its .pdata ranges; any other ends before the next known start (its
    ``raw`` item), or earlier where the caller bounds it (``bound``)."""

    def __init__(self, sections: Sequence[Any], pdata: dict[int, Any]) -> None:
        """``sections``: the executable sections (``rva``, ``end_rva``, ``virtual_size``), disjoint."""
        ordered = sorted(sections, key=lambda section: section.rva)
        #: their bounds, for the kernels
        self._section_arrays = (array("I", (section.rva for section in ordered)),
                                array("I", (section.end_rva for section in ordered)))
        #: where a function without .pdata ends at the latest in each section
        self._section_limits = array("I", (min(s.rva + s.virtual_size if s.virtual_size else s.end_rva, s.end_rva)
                                           for s in ordered))
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

    def __len__(self) -> int:
        return len(self.starts)

    def insert(self, new: Iterable[int], kernels: Any = _discovery_reference) -> list[tuple[int, Item | None]]:
        """Add starts; return, sorted, the starts whose raw item is new or changed (each new start and
        the one before it, which now ends earlier), each with its item before (None if new). Their
        ``items`` are the raw ones until bounded. ``kernels.refresh_raw_items`` lays them out in one call
        (the first round lays out every .pdata function at once: tens of thousands)."""
        # sorted first: the first call's tens of thousands of .pdata starts come in order (one run, a cheap
        # sort), and sorted duplicates are neighbours; a set of them sorted costs four times as much
        ordered = sorted(new)
        raw = self.raw
        added = [rva for rva, previous in zip(ordered, [None, *ordered]) if rva != previous and rva not in raw]
        if not added:
            return []
        starts = self.starts
        if not starts:
            starts.extend(added)
        elif len(added) < 64:  # most rounds add a few starts: sorting tens of thousands each round costs more
            for rva in added:
                insort(starts, rva)
        else:
            starts.extend(added)
            starts.sort()  # one sorted run and a short one: a merge
        touched, changed = kernels.refresh_raw_items(added, starts, self._pdata, *self._section_arrays,
                                                     self._section_limits, self.raw, self.items)
        self._stale.update(touched)
        return changed

    def bound(self, rva: int, item: Item) -> None:
        """Set the item of start ``rva`` (its raw item cut where its reachable code ends)."""
        self.items[rva] = item
        self._stale.add(rva)

    def settle(self, changed: list[tuple[int, Item | None]], todo: list[Item], reached: list[Item],
               decoded: dict[Item, Any], kernels: Any = _discovery_reference) -> tuple[list[Item], list[Item]]:
        """``bound`` each raw item of ``todo`` (the starts ``insert`` changed that have no .pdata) to its
        ``reached`` item, in one kernel call; the decodes ``decoded`` keeps of items no longer current go.
        Returns the ``changed`` starts' items and those of them ``decoded`` lacks."""
        return kernels.settle_round(changed, todo, reached, self.items, self._stale, decoded)

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
        items, with only the gaps whose bounds changed looked at again (``kernels.refresh_gap_places``, all
        in one call). The set is the layout's own: read it, do not change it. ``new_places`` holds the
        places this call added: each place there now that was not there at the previous call is one."""
        stale = sorted(self._stale)
        self._stale.clear()
        self.new_places = kernels.refresh_gap_places(memory, stale, self.starts, self.items, *self._section_arrays,
                                                     self._gaps, self._places)
        return self._places
