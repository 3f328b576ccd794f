"""Executable bytes that no discovered function covers, and whether an update changed them.

Discovery cannot promise to find every piece of code: a callback reached only
through a pointer computed at run time, a stub only an unwind table names, or
code behind data it could not tell from data. Such bytes are in no function, so
the function diff never looks at them, and a fix there would go unnoticed: the
package would leave the old code running. Here those bytes are compared
directly. Each gap between functions (fill, known jump tables and relocated
pointers left out) is keyed by the function in front of it; a gap whose bytes
differ from its counterpart's in the other image is an ``uncovered_code``
change, which the verdict turns into a reason.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

from .datadiff import DataChange
from .functions import FILL_RE, FunctionTable

__all__ = ["UncoveredGap", "uncovered_changes", "uncovered_gaps"]

# (section name, RVA of the function in front of the gap or None at the section start, which of its ranges)
_Key = tuple[str, int | None, int]


class UncoveredGap:
    """The non-fill bytes between one function and the next (or the section start and the first)."""

    __slots__ = ("section", "anchor", "rva", "content")

    def __init__(self, section: str, anchor: int | None, rva: int, content: bytes) -> None:
        self.section = section
        #: RVA of the function in front of the gap, None at the start of the section
        self.anchor = anchor
        #: RVA of the first byte of the gap that is not fill
        self.rva = rva
        #: the gap's bytes with fill, jump tables and relocated pointers left out
        self.content = content


def uncovered_gaps(table: FunctionTable) -> dict[_Key, UncoveredGap]:
    """Every gap holding bytes that are neither fill nor a jump table, keyed by the function before it."""
    image = table.image
    memory = image.memory
    tables = sorted((t[1], t[1] + 4 * len(t[3])) for a in table.analyses for t in a.raw_tables if t[3])
    relocations = image.relocations
    out: dict[_Key, UncoveredGap] = {}
    for section in image.executable_sections:
        limit = section.rva + section.virtual_size
        spans = sorted((begin, end, f.rva, index) for f in table.functions
                       for index, (begin, end) in enumerate(f.ranges) if begin < limit and end > section.rva)
        cursor, anchor, part = section.rva, None, 0
        for begin, end, owner, index in spans + [(limit, limit, None, 0)]:
            if begin > cursor:
                gap = _gap_content(memory, cursor, min(begin, limit), tables, relocations)
                if gap is not None:
                    out[(section.name, anchor, part)] = UncoveredGap(section.name, anchor, gap[0], gap[1])
            if end > cursor:
                cursor, anchor, part = end, owner, index
    return out


def _gap_content(memory: bytes, begin: int, end: int, tables: list[tuple[int, int]],
                 relocations: list[int]) -> tuple[int, bytes] | None:
    kept = bytearray()
    first = None
    position = begin
    for match in list(FILL_RE.finditer(memory, begin, end)) + [None]:
        stop = match.start() if match is not None else end
        if stop > position:
            piece = bytearray(memory[position:stop])
            _blank(piece, position, tables, relocations)
            if any(piece):
                first = position if first is None else first
                kept += piece
        if match is not None:
            position = match.end()
    return (first, bytes(kept)) if first is not None else None


def _blank(piece: bytearray, rva: int, tables: list[tuple[int, int]], relocations: list[int]) -> None:
    """Zero the bytes of ``piece`` (at ``rva``) that belong to a jump table or a relocated pointer: their
    values move with the code they designate (compared through the functions' fingerprints)."""
    end = rva + len(piece)
    for begin, stop in tables[max(0, bisect_left(tables, (rva - 4 * 4096, 0))):]:
        if begin >= end:
            break
        if stop > rva:
            piece[max(begin, rva) - rva:min(stop, end) - rva] = bytes(min(stop, end) - max(begin, rva))
    index = bisect_left(relocations, rva - 7)
    while index < len(relocations) and relocations[index] < end:
        at = relocations[index]
        piece[max(at, rva) - rva:min(at + 8, end) - rva] = bytes(min(at + 8, end) - max(at, rva))
        index += 1


def uncovered_changes(a: FunctionTable, b: FunctionTable, function_map: dict[int, int]) -> list[DataChange]:
    """Gaps whose bytes differ from their counterpart's (the gap after the matched function), and gaps
    on one side only whose bytes appear nowhere on the other."""
    gaps_a, gaps_b = uncovered_gaps(a), uncovered_gaps(b)
    contents_a: dict[bytes, int] = defaultdict(int)
    contents_b: dict[bytes, int] = defaultdict(int)
    for gap in gaps_a.values():
        contents_a[gap.content] += 1
    for gap in gaps_b.values():
        contents_b[gap.content] += 1
    out = []
    paired_b: set[_Key] = set()
    for key, gap in sorted(gaps_a.items(), key=lambda kv: kv[1].rva):
        section, anchor, part = key
        counterpart = (section, function_map.get(anchor) if anchor is not None else None, part)
        other = gaps_b.get(counterpart) if anchor is None or anchor in function_map else None
        if other is not None:
            paired_b.add(counterpart)
            if other.content != gap.content:
                out.append(DataChange("uncovered_code", gap.rva, other.rva, len(gap.content), section,
                                      f"{len(gap.content)} bytes of code outside every function changed"))
        elif gap.content not in contents_b:
            out.append(DataChange("uncovered_code", gap.rva, None, len(gap.content), section,
                                  f"{len(gap.content)} bytes of code outside every function are gone"))
    for key, gap in sorted(gaps_b.items(), key=lambda kv: kv[1].rva):
        if key not in paired_b and gap.content not in contents_a:
            out.append(DataChange("uncovered_code", None, gap.rva, len(gap.content), key[0],
                                  f"{len(gap.content)} new bytes of code outside every function"))
    return out
