"""Data items of an image and their comparison across two images.

Images carry no sizes for their data. An item starts at every address the
code references, every address a base relocation points at, every data
symbol and every exported datum; it ends at the next start (or its section's end, capped). Two mapped
items are compared over the shorter extent, with relocated pointer slots
compared by what they point at rather than by value.
"""

from __future__ import annotations

import struct
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
        starts.update(diff_kernels(table.backend).relocated_data(image.memory, image.relocations, image.image_base,
                                                                 classifier.sections))
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
        self._relocation_set = frozenset(image.relocations)

    def section(self, rva: int) -> Section | None:
        return self.image.section_from_rva(rva)

    def next_start(self, rva: int) -> int | None:
        index = bisect_right(self.starts, rva)
        return self.starts[index] if index < len(self.starts) else None

    def extent(self, rva: int) -> int:
        # the holding section's end bisected here, as Image.section_from_rva finds it (this runs for every
        # data pair the diff compares)
        index = bisect_right(self._section_rvas, rva) - 1
        if index < 0 or rva >= self._section_ends[index]:
            return 0
        limit = min(self._section_ends[index], rva + MAX_ITEM)
        starts = self.starts
        following = bisect_right(starts, rva)
        if following < len(starts):
            limit = min(limit, starts[following])
        return max(0, limit - rva)

    def is_zero_initialised(self, rva: int) -> bool:
        """In the part of its section the loader fills with zeros (.bss, or past the raw data)."""
        section = self.section(rva)
        return section is not None and rva >= section.rva + section.raw_size

    def pointer_slots(self, rva: int, length: int) -> list[int]:
        """Offsets of relocated 64-bit pointers inside [rva, rva + length)."""
        low = bisect_left(self.relocations, rva)
        high = bisect_left(self.relocations, rva + length)
        return [slot - rva for slot in self.relocations[low:high]]

    def pointer_at(self, rva: int) -> int:
        return struct.unpack_from("<Q", self.image.memory, rva)[0] - self.image.image_base

    def contents(self, rva: int, length: int) -> bytes:
        return self.image.memory[rva:rva + length]


def items_equal(a: DataItems, b: DataItems, rva_a: int, rva_b: int, function_map: dict[int, int]) -> bool:
    """Same bytes over the shorter extent; relocated pointers must point at corresponding functions.

    Pointer slots are compared by what they designate, never by value, so the
    preferred image bases and code that moved do not make items differ.
    """
    length = min(a.extent(rva_a), b.extent(rva_b))
    if length <= 0:
        return True
    slots_a = a.pointer_slots(rva_a, length)
    slots_b = b.pointer_slots(rva_b, length)
    if slots_a != slots_b:
        return False
    if not slots_a:  # no pointers: the bytes alone decide
        return a.contents(rva_a, length) == b.contents(rva_b, length)
    bytes_a = bytearray(a.contents(rva_a, length))
    bytes_b = bytearray(b.contents(rva_b, length))
    for slot in slots_a:
        if slot + 8 > length:
            continue
        target_a = a.pointer_at(rva_a + slot)
        target_b = b.pointer_at(rva_b + slot)
        mapped = function_map.get(target_a)
        if mapped is not None and mapped != target_b:
            return False
        if mapped is None and (a.table.at(target_a) is not None or b.table.at(target_b) is not None):
            return False  # a removed function, or one the old pointer did not designate

        bytes_a[slot:slot + 8] = bytes(8)
        bytes_b[slot:slot + 8] = bytes(8)
    return bytes_a == bytes_b
