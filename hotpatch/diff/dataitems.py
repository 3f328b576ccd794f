"""Data items of an image and their comparison across two images.

Images carry no sizes for their data. An item starts at every address the
code references, every address a base relocation points at, every data
symbol and every exported datum; it ends at the next start (or its section's end, capped). Two mapped
items are compared over the shorter extent, with relocated pointer slots
compared by what they point at rather than by value.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from ..analysis.api import diff_kernels
from ..analysis.functions import FunctionTable
from ..pe.image import Section
from .targets import TargetClassifier

__all__ = ["DataItems", "items_equal", "MAX_ITEM"]

#: compare at most this many bytes of one item
MAX_ITEM = 4096


class DataItems:
    def __init__(self, table: FunctionTable, classifier: TargetClassifier, referenced: Iterable[int]) -> None:
        image = table.image
        self.image = image
        self.table = table
        self.classifier = classifier
        starts = classifier.only_data(referenced)
        # what relocated pointers in the image point at in data, and the slots in data themselves (a pointer in
        # data is an item boundary too: tables of pointers)
        kernels = diff_kernels(table.backend)
        starts.update(kernels.relocated_data(image.memory, image.relocations, image.image_base, classifier.sections))
        for symbol in image.symbols:
            if classifier.is_data(symbol.rva):
                starts.add(symbol.rva)
        for export in image.exports:
            if export.forwarder is None and classifier.is_data(export.rva):
                starts.add(export.rva)
        self.starts = sorted(starts)
        self.relocations = image.relocations
        ordered = sorted(image.sections, key=lambda section: section.rva)
        self._section_rvas = [section.rva for section in ordered]
        self._section_ends = [section.end_rva for section in ordered]
        #: what ``items_equal`` reads, in the kernels' form (C arrays with the compiled ones)
        self.side = kernels.data_side(image.memory, self.starts, self._section_rvas, self._section_ends,
                                      self.relocations, image.image_base, classifier.starts, MAX_ITEM)
        self._items_equal, self._item_extent = kernels.items_equal, kernels.item_extent

    def section(self, rva: int) -> Section | None:
        return self.image.section_from_rva(rva)

    def next_start(self, rva: int) -> int | None:
        index = bisect_right(self.starts, rva)
        return self.starts[index] if index < len(self.starts) else None

    def extent(self, rva: int) -> int:
        """Bytes from ``rva`` to the next item start, its section's end or ``MAX_ITEM``, whichever comes first."""
        return self._item_extent(self.side, rva)

    def is_zero_initialised(self, rva: int) -> bool:
        """In the part of its section the loader fills with zeros (.bss, or past the raw data)."""
        section = self.section(rva)
        return section is not None and rva >= section.rva + section.raw_size

    def pointer_slots(self, rva: int, length: int) -> list[int]:
        """Offsets of relocated 64-bit pointers inside [rva, rva + length)."""
        low = bisect_left(self.relocations, rva)
        high = bisect_left(self.relocations, rva + length)
        return [slot - rva for slot in self.relocations[low:high]]

    def contents(self, rva: int, length: int) -> bytes:
        return self.image.memory[rva:rva + length]


def items_equal(a: DataItems, b: DataItems, rva_a: int, rva_b: int, function_map: dict[int, int]) -> bool:
    """Same bytes over the shorter extent; relocated pointers must point at corresponding functions.

    Pointer slots are compared by what they designate, never by value, so the
    preferred image bases and code that moved do not make items differ.
    """
    # the diff kernels' (their twin is this comparison in Python): it runs for every data pair a diff compares
    return a._items_equal(a.side, b.side, rva_a, rva_b, function_map)
