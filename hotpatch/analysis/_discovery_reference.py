"""Pure-Python twin of ``hotpatch.analysis._discovery``: the kernels of discovery's rounds written with the
regular expressions of ``padding.py``. The compiled kernels must give exactly these results (the tests
compare both on fixtures, real binaries and random bytes)."""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence

from .padding import FILL_RE, USABLE_PADDING_RE

__all__ = ["IMPLEMENTATION", "gap_places", "named", "padding_runs"]

IMPLEMENTATION = "python"

#: how far back from an entry the padding that ends there is looked for
RUN_WINDOW = 4096


def gap_places(memory: bytes, end: int, limit: int) -> list[int]:
    """Places in the gap ``[end, limit)`` where code could begin, in order: the gap's start and the end of
    each usable padding run before ``limit``, leaving out those where fill begins."""
    # code follows int3/nop padding; zero runs in a gap are data more often than not
    found = {end}
    found.update(match.end() for match in USABLE_PADDING_RE.finditer(memory, end, limit) if match.end() < limit)
    # code does not begin with fill (a multi-byte nop right after a function is its padding)
    return sorted(p for p in found if not FILL_RE.match(memory, p, p + 15))


def padding_runs(memory: bytes, rvas: Sequence[int], ends: Sequence[int], section_rvas: Sequence[int],
                 section_ends: Sequence[int]) -> tuple[array, array]:
    """For each span ``(rvas[i], ends[i])`` (sorted, each in one of the executable sections given sorted by
    RVA): the usable padding run ending at its entry and the one starting at its end, each within the gap
    to its neighbour in the same section."""
    before, after = array("I"), array("I")
    for index, (rva, end) in enumerate(zip(rvas, ends)):
        s = bisect_right(section_rvas, rva) - 1
        if s < 0 or not rva < section_ends[s]:
            raise ValueError(f"span at {rva:#x} outside every executable section")
        low, high = section_rvas[s], section_ends[s]
        gap_start = ends[index - 1] if index > 0 and ends[index - 1] >= low else low
        gap_end = min(rvas[index + 1] if index + 1 < len(rvas) else high, high)
        before.append(_run_ending_at(memory, gap_start, rva))
        after.append(_run_starting_at(memory, end, gap_end))
    return before, after


def _run_ending_at(memory: bytes, gap_start: int, entry: int) -> int:
    if gap_start >= entry:
        return 0
    # Padding ends in int3, nop, or a multi-byte nop whose 0F 1F sits in its last eight bytes.
    if memory[entry - 1] not in (0xCC, 0x90) and memory.find(b"\x0f\x1f", max(gap_start, entry - 8), entry) < 0:
        return 0
    best = 0
    for match in USABLE_PADDING_RE.finditer(memory, max(gap_start, entry - RUN_WINDOW), entry):
        if match.end() == entry:
            best = entry - match.start()
    return best


def _run_starting_at(memory: bytes, end: int, gap_end: int) -> int:
    if end >= gap_end:
        return 0
    match = USABLE_PADDING_RE.match(memory, end, gap_end)
    return match.end() - end if match else 0


def named(places: Iterable[int], words: Iterable[array]) -> set[int]:
    """The places equal to some value in the ``array("I")`` chunks ``words``."""
    wanted = set(places)
    found: set[int] = set()
    for chunk in words:
        found |= wanted.intersection(chunk)
    return found
