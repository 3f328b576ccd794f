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

Not every such byte is code: mingw-w64's linker script keeps ``__CTOR_LIST__``
and ``__DTOR_LIST__`` in .text, each an all-ones quadword, absolute pointers to
the constructors (each covered by a base relocation), and a zero quadword.
Those lists are recognised by that shape alone (no symbols needed, so the
stripped build is read the same way) and compared as data: the functions their
pointers designate, through the function map, not the pointers' bytes.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, itemgetter

from ..analysis.api import decode, diff_kernels, fingerprint_all
from ..analysis.functions import FunctionTable
from ..analysis.padding import FILL_RE
from .result import DataChange

__all__ = ["UncoveredGap", "pointer_lists", "uncovered_changes", "uncovered_gaps"]

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
    #: the functions (RVAs) each pointer list in the gap designates, in order (``pointer_lists``)
    lists: tuple[tuple[int, ...], ...] = ()


def uncovered_gaps(table: FunctionTable) -> dict[_Key, UncoveredGap]:
    """Every gap holding bytes that are not fill, keyed by the function before it, with a fingerprint.

    The fingerprint is the analysis core's (placement-invariant: reference operands masked, targets
    described by what they are), over the gap swept as if it were one function, so code and data that
    only moved with the rest of the image compare equal.
    """
    image = table.image
    memory = image.memory
    unfilled_gaps = diff_kernels(table.backend).unfilled_gaps
    functions = table.functions
    # (begin, end, function rva, range index) of every range: the primary ones zipped in C, fragments apart
    every_range = list(zip(map(_RVA, functions), map(_END_RVA, functions), map(_RVA, functions), repeat(0)))
    every_range += [(begin, end, f.rva, index) for f in filter(_FRAGMENTS, functions)
                    for index, (begin, end) in enumerate(f.fragments, 1)]
    tables = _jump_tables(table)
    spans: list[tuple[_Key, int, int]] = []
    for section in image.executable_sections:
        low, limit = section.rva, section.rva + section.virtual_size
        ranges = sorted([r for r in every_range if r[0] < limit and r[1] > low])
        ranges = sorted(ranges + [(begin, end, None, _TABLE) for begin, end in tables if begin < limit and end > low],
                        key=_BEGIN_END)
        for anchor, part, begin, end in unfilled_gaps(memory, ranges, low, limit):
            content = _swept(memory, begin, end)
            if content is not None:
                spans.append(((section.name, anchor, part), *content))
    relocated = frozenset(image.relocations)
    lists = [pointer_lists(table, relocated, begin, end) for _, begin, end in spans]
    items = [(begin, _outside(begin, end, found)) for (_, begin, end), found in zip(spans, lists)]
    code = [i for i, (_, ranges) in enumerate(items) if ranges]
    decoded = decode(table.context, [items[i] for i in code], table.backend)
    starts = array("I", sorted(f.rva for f in table.functions))
    prints = [""] * len(items)  # a gap that is all pointer lists has no code to fingerprint
    for i, analysis in zip(code, fingerprint_all(table.context, decoded, starts, table.backend)):
        prints[i] = analysis.fingerprint
    return {key: UncoveredGap(key[0], key[1], begin, end - begin, fingerprint,
                              tuple(targets for _, _, targets in found))
            for (key, begin, end), fingerprint, found in zip(spans, prints, lists)}


_TABLE = -1  # the "range index" of a jump table in uncovered_gaps' sweep (the kernels' ``unfilled_gaps``)
_RVA, _END_RVA, _FRAGMENTS = attrgetter("rva"), attrgetter("end_rva"), attrgetter("fragments")
_BEGIN_END = itemgetter(0, 1)


def _jump_tables(table: FunctionTable) -> list[tuple[int, int]]:
    """The bytes of every switch table the analysis recognised: its function's data (compared with the
    function through its targets, and copied with it by the builder), not code no function covers.
    MSVC places them in .text right after the function."""
    return [(rva, rva + 4 * len(targets)) for analysis in table.analyses for _, rva, _, targets in analysis.raw_tables]


#: mingw-w64's constructor and destructor lists open with -1 and close with 0
_LIST_HEAD = b"\xff" * 8
_LIST_END = 0


def pointer_lists(table: FunctionTable, relocated: frozenset[int], begin: int,
                  end: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """The ``__CTOR_LIST__``/``__DTOR_LIST__``-shaped lists starting in ``[begin, end)``: (start, end, the
    function RVAs designated), each an aligned all-ones quadword, quadwords that are base-relocated
    pointers to discovered functions, and a zero quadword (which may lie past ``end``: zero is fill)."""
    image = table.image
    memory, base = image.memory, image.image_base
    out = []
    at = begin + (-begin % 8)
    while at + 16 <= min(end + 8, len(memory)):
        if memory[at:at + 8] != _LIST_HEAD:
            at += 8
            continue
        cursor, targets = at + 8, []
        while cursor + 8 <= len(memory):
            value = int.from_bytes(memory[cursor:cursor + 8], "little")
            if value == _LIST_END or cursor not in relocated or table.at(value - base) is None:
                break
            targets.append(value - base)
            cursor += 8
        if cursor + 8 <= len(memory) and int.from_bytes(memory[cursor:cursor + 8], "little") == _LIST_END:
            out.append((at, cursor + 8, tuple(targets)))
            at = cursor + 8
        else:
            at += 8
    return out


def _outside(begin: int, end: int, lists: list[tuple[int, int, tuple[int, ...]]]) -> tuple[tuple[int, int], ...]:
    """The parts of ``[begin, end)`` no pointer list covers."""
    ranges, cursor = [], begin
    for start, stop, _ in lists:
        if start > cursor:
            ranges.append((cursor, start))
        cursor = max(cursor, stop)
    if cursor < end:
        ranges.append((cursor, end))
    return tuple(ranges)


#: the fill bytes FILL_RE matches on their own (its other patterns are multi-byte nops)
_ONE_BYTE_FILL = b"\xcc\x90\x00"


def _without_fill(memory: bytes, begin: int, end: int) -> tuple[int, int] | None:
    """The part of ``[begin, end)`` from its first to its last byte that is not fill, if any."""
    if end <= len(memory) and not memory[begin:end].translate(None, _ONE_BYTE_FILL):
        return None  # most gaps are int3/nop/zero bytes alone, which FILL_RE takes one by one: no regex sweep
    return _swept(memory, begin, end)


def _swept(memory: bytes, begin: int, end: int) -> tuple[int, int] | None:
    """``_without_fill`` by sweeping FILL_RE over the gap."""
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
            elif _mapped_lists(gap, function_map) != other.lists:
                out.append(DataChange("uncovered_code", gap.rva, other.rva, gap.size, section,
                                      "a constructor or destructor list designates other functions"))
        elif gap.fingerprint not in prints_b:
            out.append(DataChange("uncovered_code", gap.rva, None, gap.size, section,
                                  f"{gap.size} bytes outside every function are gone"))
    for key, gap in sorted(gaps_b.items(), key=lambda kv: kv[1].rva):
        if key not in paired_b and gap.fingerprint not in prints_a:
            out.append(DataChange("uncovered_code", None, gap.rva, gap.size, key[0],
                                  f"{gap.size} new bytes outside every function"))
    return out


def _mapped_lists(gap: UncoveredGap, function_map: dict[int, int]) -> tuple[tuple[int, ...], ...]:
    """The gap's pointer lists with each designated function replaced by its match (-1: none)."""
    return tuple(tuple(function_map.get(rva, -1) for rva in targets) for targets in gap.lists)


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
