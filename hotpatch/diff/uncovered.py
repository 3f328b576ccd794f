"""Executable bytes that no discovered function covers, and whether an update changed them.

Discovery cannot promise to find every piece of code: a callback reached only
through a pointer computed at run time, a stub only an unwind table names, or
code behind data it could not tell from data. Such bytes are in no function, so
the function diff never looks at them, and a fix there would go unnoticed: the
package would leave the old code running. Here those bytes are compared
directly. Each gap between functions (fill trimmed) is keyed by the function
in front of it and fingerprinted like a function; a gap whose fingerprint
differs from its counterpart's in the other image is an ``uncovered_code``
change, which the verdict turns into a reason.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass

from ..analysis.api import decode, fingerprint_all
from ..analysis.functions import FILL_RE, FunctionTable
from .result import DataChange

__all__ = ["UncoveredGap", "uncovered_changes", "uncovered_gaps"]

# (section name, RVA of the function in front of the gap or None at the section start, which of its ranges)
_Key = tuple[str, int | None, int]


@dataclass(frozen=True)
class UncoveredGap:
    """The bytes between one function and the next (or the section start and the first), fill trimmed."""

    section: str
    #: RVA of the function in front of the gap, None at the start of the section
    anchor: int | None
    rva: int
    size: int
    fingerprint: str


def uncovered_gaps(table: FunctionTable) -> dict[_Key, UncoveredGap]:
    """Every gap holding bytes that are not fill, keyed by the function before it, with a fingerprint.

    The fingerprint is the analysis core's (placement-invariant: reference operands masked, targets
    described by what they are), over the gap swept as if it were one function, so code and data that
    only moved with the rest of the image compare equal.
    """
    image = table.image
    memory = image.memory
    spans: list[tuple[_Key, int, int]] = []
    for section in image.executable_sections:
        limit = section.rva + section.virtual_size
        ranges = sorted((begin, end, f.rva, index) for f in table.functions
                        for index, (begin, end) in enumerate(f.ranges) if begin < limit and end > section.rva)
        cursor, anchor, part = section.rva, None, 0
        for begin, end, owner, index in ranges + [(limit, limit, None, 0)]:
            if begin > cursor:
                content = _without_fill(memory, cursor, min(begin, limit))
                if content is not None:
                    spans.append(((section.name, anchor, part), *content))
            if end > cursor:
                cursor, anchor, part = end, owner, index
    items = [(begin, ((begin, end),)) for _, begin, end in spans]
    decoded = decode(table.context, items, table.backend)
    starts = array("I", sorted(f.rva for f in table.functions))
    analyses = fingerprint_all(table.context, decoded, starts, table.backend)
    return {key: UncoveredGap(key[0], key[1], begin, end - begin, analysis.fingerprint)
            for (key, begin, end), analysis in zip(spans, analyses)}


def _without_fill(memory: bytes, begin: int, end: int) -> tuple[int, int] | None:
    """The part of ``[begin, end)`` from its first to its last byte that is not fill, if any."""
    first = None
    last = begin
    position = begin
    for match in list(FILL_RE.finditer(memory, begin, end)) + [None]:
        stop = match.start() if match is not None else end
        if stop > position:
            first = position if first is None else first
            last = stop
        if match is not None:
            position = match.end()
    return (first, last) if first is not None else None


def uncovered_changes(a: FunctionTable, b: FunctionTable, function_map: dict[int, int]) -> list[DataChange]:
    """Gaps whose fingerprint differs from their counterpart's (the gap after the matched function), and
    gaps on one side only whose fingerprint appears nowhere on the other."""
    gaps_a, gaps_b = uncovered_gaps(a), uncovered_gaps(b)
    prints_a = Counter(gap.fingerprint for gap in gaps_a.values())
    prints_b = Counter(gap.fingerprint for gap in gaps_b.values())
    out = []
    paired_b: set[_Key] = set()
    for key, gap in sorted(gaps_a.items(), key=lambda kv: kv[1].rva):
        section, anchor, part = key
        counterpart = (section, function_map.get(anchor) if anchor is not None else None, part)
        other = gaps_b.get(counterpart) if anchor is None or anchor in function_map else None
        if other is not None:
            paired_b.add(counterpart)
            if other.fingerprint != gap.fingerprint and not _same_tables(a, gap, b, other):
                out.append(DataChange("uncovered_code", gap.rva, other.rva, gap.size, section,
                                      f"{gap.size} bytes outside every function changed"))
        elif gap.fingerprint not in prints_b:
            out.append(DataChange("uncovered_code", gap.rva, None, gap.size, section,
                                  f"{gap.size} bytes outside every function are gone"))
    for key, gap in sorted(gaps_b.items(), key=lambda kv: kv[1].rva):
        if key not in paired_b and gap.fingerprint not in prints_a:
            out.append(DataChange("uncovered_code", None, gap.rva, gap.size, key[0],
                                  f"{gap.size} new bytes outside every function"))
    return out


def _same_tables(a: FunctionTable, gap_a: UncoveredGap, b: FunctionTable, gap_b: UncoveredGap) -> bool:
    """Whether the two gaps differ only in 32-bit image-relative addresses of code that sit at the same
    offset in the functions before them: MSVC's switch tables of a leaf whose switch discovery did not
    recognise, whose entries move with the code."""
    if gap_a.size != gap_b.size or (gap_a.rva - gap_b.rva) % 4:
        return False
    return _normalised(a, gap_a) == _normalised(b, gap_b)


def _normalised(table: FunctionTable, gap: UncoveredGap) -> bytes:
    memory = table.image.memory
    anchor = table.at(gap.anchor) if gap.anchor is not None else None
    # whole words: zero fill trimmed from the end of the gap may be the top byte of the last entry
    out = bytearray(memory[gap.rva:gap.rva + gap.size + 3])
    for at in range(-gap.rva % 4, gap.size, 4):
        value = int.from_bytes(out[at:at + 4], "little")
        if table.image.code_section(value) is None:
            continue
        inside = anchor is not None and any(begin <= value < end for begin, end in anchor.ranges)
        out[at:at + 4] = (value - anchor.rva).to_bytes(4, "little", signed=True) if inside and anchor \
            else b"\xff\xff\xff\x7f"
    return bytes(out)
