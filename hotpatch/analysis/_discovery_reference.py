"""Pure-Python twin of ``hotpatch.analysis._discovery``: the kernels of discovery's rounds, the padding
ones written with the regular expressions of ``padding.py``. The compiled kernels must give exactly these
results (the tests compare both on fixtures, real binaries and random bytes)."""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from heapq import heappop, heappush
from typing import Any

from .flow import terminates
from .padding import FILL_BYTES, FILL_RE, USABLE_PADDING_RE, after_padding
from .refkinds import BRANCH_REL8, BRANCH_REL32, CALL_REL32, RIP_RELATIVE

__all__ = ["IMPLEMENTATION", "acceptable_in", "add_sources", "after_padding_in", "build_functions",
           "call_and_lea_targets", "decodable_in", "fresh_refs", "gap_places", "gap_starts", "memory_word_index",
           "memory_words", "named", "named_in", "owned_spans", "padding_runs", "plausible_limits", "pointer_targets",
           "reach_windows", "reachable_end", "refresh_gap_places", "refresh_raw_items", "rip_jumps", "sane_items",
           "sane_references", "settle_round", "stale_gap_places", "sweep_matches", "trimmed_end", "trimmed_layout",
           "word_index"]

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


def stale_gap_places(memory: bytes, stale: Sequence[int], starts: Sequence[int], items: dict[int, tuple],
                     section_rvas: Sequence[int], section_ends: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """The layout's gaps looked at again: for each start of ``stale`` in a code section (``section_rvas``,
    ``section_ends``: sorted, disjoint), ``gap_places`` of the gap from the end of its item's first range
    (``items[start]``) to the next of the sorted ``starts`` or its section's end; the starts with places
    and their places."""
    owners: list[int] = []
    out: list[list[int]] = []
    for rva in stale:
        index = bisect_right(section_rvas, rva) - 1
        if index < 0 or rva >= section_ends[index]:
            continue  # a .pdata entry outside the executable sections bounds no gap
        limit = section_ends[index]
        index = bisect_right(starts, rva)
        if index < len(starts) and starts[index] < limit:
            limit = starts[index]
        end = items[rva][1][0][1]
        if end < limit:
            fresh = gap_places(memory, end, limit)
            if fresh:
                owners.append(rva)
                out.append(fresh)
    return owners, out


def refresh_raw_items(added: Sequence[int], starts: Sequence[int], pdata: dict[int, Any],
                      section_rvas: Sequence[int], section_ends: Sequence[int], section_limits: Sequence[int],
                      raw_items: dict[int, tuple], items: dict[int, tuple]) -> tuple[list[int], list[tuple]]:
    """``Layout.insert``'s bookkeeping once the new starts ``added`` (sorted) are in the sorted ``starts``:
    the touched starts (each new one and the start before each, sorted) get their raw item, their .pdata
    ranges if ``pdata`` lists them, else up to the next start or their section's limit (``section_rvas``,
    ``section_ends``: sorted, disjoint; ``section_limits``: where a function may end in each). Those whose
    raw item is new or changed are set in ``raw_items`` and ``items``; returns the touched starts and the
    changed ones, each with its item before (None if new)."""
    touched = set(added)
    for rva in added:
        index = bisect_left(starts, rva)
        if index:
            touched.add(starts[index - 1])
    changed = []
    for rva in sorted(touched):
        runtime = pdata.get(rva)
        if runtime is not None:
            raw = (rva, ((rva, runtime.end_rva),) + runtime.fragments)
        else:
            index = bisect_right(section_rvas, rva) - 1
            if index < 0 or rva >= section_ends[index]:
                raise ValueError(f"start {rva:#x} outside the code sections")
            limit = section_limits[index]
            index = bisect_right(starts, rva)
            if index < len(starts) and starts[index] < limit:
                limit = starts[index]
            raw = (rva, ((rva, limit),))
        if raw_items.get(rva) != raw:
            changed.append((rva, items.get(rva)))
            raw_items[rva] = items[rva] = raw
    return sorted(touched), changed


def refresh_gap_places(memory: bytes, stale: Sequence[int], starts: Sequence[int], items: dict[int, tuple],
                       section_rvas: Sequence[int], section_ends: Sequence[int], gaps: dict[int, list[int]],
                       places: set[int]) -> list[int]:
    """``Layout.places``' bookkeeping: the gaps after the sorted ``stale`` starts lose their places (``gaps``:
    start -> its gap's places; ``places``: all of them), then get those of ``stale_gap_places``; returns the
    places added, in order."""
    for rva in stale:
        old = gaps.pop(rva, None)
        if old:  # every stale gap's old places go before new ones come: a place can move to another gap
            places.difference_update(old)
    added: list[int] = []
    for rva, fresh in zip(*stale_gap_places(memory, stale, starts, items, section_rvas, section_ends)):
        gaps[rva] = fresh
        added += fresh
    places.update(added)
    return added


def settle_round(changed: list[tuple[int, tuple | None]], todo: list[tuple], reached: list[tuple],
                 items: dict[int, tuple], stale: set[int], decoded: dict[tuple, Any]
                 ) -> tuple[list[tuple], list[tuple]]:
    """A round's items once bounded: the start of each raw item of ``todo`` gets its ``reached`` item in
    ``items`` and goes ``stale``, and the whole decode of an item cut (in ``decoded``) goes, as do the decodes
    of the ``changed`` starts' items before ``(start, item before)`` that changed. Returns the changed starts'
    current items and those of them ``decoded`` lacks."""
    if len(todo) != len(reached):
        raise ValueError("todo and reached differ in length")
    for item, cut in zip(todo, reached):
        items[item[0]] = cut
        stale.add(item[0])
        if cut != item:
            decoded.pop(item, None)
    current = []
    for rva, before in changed:
        item = items[rva]
        current.append(item)
        if before is not None and before != item:
            decoded.pop(before, None)
    return current, [item for item in current if item not in decoded]


def fresh_refs(current: list[tuple], decoded: dict[tuple, Any], scanned: set[tuple]) -> list[Any]:
    """The references (``raw_refs`` of their decodes in ``decoded``) of the items of ``current`` not yet in
    ``scanned``, which gets them all."""
    out = [decoded[item].raw_refs for item in current if item not in scanned]
    scanned.update(current)
    return out


def gap_starts(memory: bytes, starts: Sequence[int], ends: Sequence[int], section_rvas: Sequence[int],
               section_ends: Sequence[int]) -> set[int]:
    """The places of every gap between the functions ``(starts[i], ends[i])`` (sorted by start) of each
    executable section, and after the last one: ``gap_places`` of each."""
    places: set[int] = set()
    for low, high in zip(section_rvas, section_ends):
        first = bisect_right(starts, low - 1)
        last = bisect_right(starts, high - 1)
        for index in range(first, last):
            end = ends[index]
            limit = min(starts[index + 1], high) if index + 1 < last else high
            if end < limit:
                places.update(gap_places(memory, end, limit))
    return places


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


def acceptable_in(rvas: Iterable[int], code_rvas: Sequence[int], code_ends: Sequence[int],
                  owned_begins: Sequence[int], owned_ends: Sequence[int], owned_primary: bytes) -> list[int]:
    """The addresses (in the given order) that could start a function: inside a code section (``code_rvas``,
    ``code_ends``: sorted, disjoint) and not inside a .pdata function. ``owned_begins``/``owned_ends`` are
    every .pdata range (primary ranges and fragments) sorted; ``owned_primary[i]`` says whether
    ``owned_begins[i]`` starts a .pdata function (a fragment's first byte is no start). Only the last range
    beginning at or before an address is asked, as discovery always did."""
    out = []
    for rva in rvas:
        index = bisect_right(code_rvas, rva) - 1
        if index < 0 or rva >= code_ends[index]:
            continue
        index = bisect_right(owned_begins, rva) - 1
        if index >= 0 and (owned_begins[index] < rva < owned_ends[index] or
                           owned_begins[index] == rva and not owned_primary[index]):
            continue
        out.append(rva)
    return out


def owned_spans(runtime_functions: Iterable[Any], pdata: dict[int, Any]) -> tuple[array, array, bytes]:
    """Every .pdata range (each function's primary range and its fragments) sorted, as the arrays of their
    begins and ends, and whether each begin starts a .pdata function (is in ``pdata``): ``acceptable_in``'s
    bounds."""
    owned = sorted((begin, end) for f in runtime_functions for begin, end in ((f.begin_rva, f.end_rva),) + f.fragments)
    return (array("I", (begin for begin, _ in owned)), array("I", (end for _, end in owned)),
            bytes(begin in pdata for begin, _ in owned))


def add_sources(rvas: Iterable[int], bit: int, sources: dict[int, int], pending: list[int]) -> bool:
    """Each of ``rvas`` starts a function found by the source ``bit``: its mask in ``sources`` (start -> the
    bits of its sources) gets it; a start not there yet is new and goes to ``pending``. True if any was."""
    found = False
    for rva in rvas:
        mask = sources.get(rva)
        if mask is None:
            sources[rva] = bit
            pending.append(rva)
            found = True
        else:
            sources[rva] = mask | bit
    return found


def after_padding_in(memory: bytes, places: Iterable[int]) -> list[int]:
    """The places (in the given order) right after int3 or nop padding (``padding.after_padding``)."""
    return [place for place in places if after_padding(memory, place)]


#: ``jmp [rip+disp32]``
_RIP_JUMP_RE = re.compile(rb"\xff\x25(....)", re.DOTALL)


def rip_jumps(memory: bytes, begins: Sequence[int], ends: Sequence[int]) -> list[tuple[int, int]]:
    """Every ``jmp [rip+disp32]`` (FF 25 and four bytes) in the spans ``[begins[i], ends[i])`` of ``memory``, in
    the given order, as the regular expression finds them: each as (its RVA, the RVA its displacement names)."""
    return [(match.start(), match.start() + 6 + int.from_bytes(match.group(1), "little", signed=True))
            for begin, end in zip(begins, ends) for match in _RIP_JUMP_RE.finditer(memory, begin, end)]


def pointer_targets(memory: bytes, relocations: Sequence[int], image_base: int, code_rvas: Sequence[int],
                    code_ends: Sequence[int]) -> list[int]:
    """What the relocated 64-bit pointers outside code point at inside the image, as RVAs, in relocation
    order: the little-endian value at each relocation (fewer bytes at the image's end) minus the image
    base, kept where it lies in ``[0, len(memory))``; relocations inside a code section (``code_rvas``,
    ``code_ends``: sorted, disjoint) are references of that code and left out."""
    out = []
    for reloc in relocations:
        index = bisect_right(code_rvas, reloc) - 1
        if index >= 0 and reloc < code_ends[index]:
            continue
        target = int.from_bytes(memory[reloc:reloc + 8], "little") - image_base
        if 0 <= target < len(memory):
            out.append(target)
    return out


def trimmed_end(memory: bytes, rvas: Sequence[int], begin: int, limit: int) -> int:
    """Where a function whose instructions start at ``rvas`` in ``[begin, limit)`` ends once the fill after
    its last instruction that is not fill (int3, nops, zeros) is cut off; at least one byte past ``begin``."""
    end = limit
    for index in range(len(rvas) - 1, -1, -1):
        insn_end = rvas[index + 1] if index + 1 < len(rvas) else end
        if not FILL_RE.fullmatch(memory, rvas[index], insn_end):
            end = insn_end
            break
    else:
        end = begin + 1
    return max(end, begin + 1)


def trimmed_layout(memory: bytes, starts: list[int], items: dict[int, tuple], pdata: dict[int, Any],
                   decoded: dict[tuple, Any]) -> tuple[list[tuple], list[Any], list[int], array, array]:
    """The final layout: the item ``items[start]`` of each of the sorted ``starts``, as it is if ``pdata`` lists
    it, else cut after its last instruction that is not fill (``trimmed_end`` of its decode ``decoded[item]``).
    Returns the items, their decodes (None where an item was cut), the indexes of the cut ones, and the items'
    starts and first ranges' ends as arrays."""
    out, analyses, cut = [], [], []
    for index, rva in enumerate(starts):
        item = items[rva]
        analysis = decoded[item]
        if rva not in pdata:
            (begin, limit), = item[1]
            trimmed = (rva, ((begin, trimmed_end(memory, analysis.insn_rvas, begin, limit)),))
            if trimmed != item:
                item, analysis = trimmed, None
                cut.append(index)
        out.append(item)
        analyses.append(analysis)
    return out, analyses, cut, array("I", starts), array("I", (ranges[0][1] for _, ranges in out))


def named(places: Iterable[int], words: Iterable[array]) -> set[int]:
    """The places equal to some value in the ``array("I")`` chunks ``words``."""
    wanted = set(places)
    found: set[int] = set()
    for chunk in words:
        found |= wanted.intersection(chunk)
    return found


def word_index(words: Iterable[array], top: int) -> tuple[list[array], int]:
    """What ``named_in`` looks places up in: the chunks themselves and ``top`` (a set of every word would
    take far more memory than the bitmap of the compiled kernel)."""
    return list(words), top


def memory_words(memory: bytes, begins: Sequence[int], ends: Sequence[int]) -> list[array]:
    """Every 32-bit value, at every alignment, of the spans ``[begins[i], ends[i])`` of ``memory``: one
    ``array("I")`` per span and alignment."""
    out = []
    for low, high in zip(begins, ends):
        for phase in range(4):
            begin = low + phase
            end = begin + (max(0, min(high, len(memory)) - begin) // 4) * 4
            words = array("I")
            words.frombytes(memory[begin:end])
            out.append(words)
    return out


def memory_word_index(memory: bytes, begins: Sequence[int], ends: Sequence[int], top: int) -> tuple[list[array], int]:
    """``word_index`` of ``memory_words``: which values below ``top`` the spans hold at some alignment."""
    return word_index(memory_words(memory, begins, ends), top)


def named_in(places: Iterable[int], index: tuple[list[array], int]) -> set[int]:
    """The places some word of ``word_index``'s ``index`` names: ``named`` of the places below its ``top``."""
    words, top = index
    return named((p for p in places if p < top), words)


#: first bytes of an instruction that may not fall through: the opcodes themselves and prefixes
_MAY_TERMINATE = frozenset((0xC3, 0xC2, 0xCB, 0xCA, 0xE9, 0xEB, 0xCC, 0xF4, 0x0F, 0xFF, 0x66, 0xF2, 0xF3, 0x2E,
                            0x3E, 0x26, 0x36, 0x64, 0x65, *range(0x40, 0x50)))


def reachable_end(memory: bytes, rvas: Sequence[int], refs: Iterable[tuple[int, int, int, int, int]],
                  tables: list[tuple[int, int, int, tuple[int, ...]]], begin: int, limit: int, horizon: int,
                  tail_gaps: bool = True) -> int:
    """Where the code reachable from ``begin`` ends: after the first instruction that does not fall through
    with no branch (up to ``horizon``) or jump-table target beyond it; ``limit`` if none.

    With ``tail_gaps``, an instruction that does not fall through, followed by fill (the padding that ends
    a function), then by bytes that are not fill, then by fill again right before the nearest branch or
    table target after it (below ``limit``), opens a gap no path has reached yet. If the code from that
    target on ends, or runs into ``limit`` without branching beyond it, and never branches back into the
    gap or the code before it, the branch over the gap was a tail jump into the next function (OpenSSL's
    dispatchers jump past a table and a banner string to a sibling's entry): the code ends where the gap
    begins. Code after a gap that comes back is the same function: a loop body jumped over into its
    condition after alignment padding (its back edge), switch cases behind an indirect jump the analysis
    has no table for (they return to the code before), anything a jump table names. The gap's own
    branches count for nothing.
    """
    horizon = max(horizon, limit)  # branch targets up to here count (the item may be a first look)
    refs = list(refs)
    reaches = {table[0]: max(table[3]) for table in tables if table[3]}
    cases = {table[0]: table[3] for table in tables if table[3]}
    reach = begin
    ahead: list[int] = []  # a heap of the targets seen, for the nearest one past a gap's start
    gap_begin = gap_end = -1  # the pending gap, if any
    kept = begin  # ``reach`` without the instructions inside the pending gap
    ref_index, ref_count = 0, len(refs)
    count = len(rvas)
    for index in range(count):
        insn = rvas[index]
        outside = insn >= gap_end
        while ref_index < ref_count and refs[ref_index][1] <= insn:
            kind, _, _, _, target = refs[ref_index]
            if kind == BRANCH_REL8 or kind == BRANCH_REL32:
                if reach < target < horizon:
                    reach = target
                if tail_gaps and target < horizon:
                    heappush(ahead, target)
                    if outside:
                        if gap_end >= 0 and begin <= target < gap_end:
                            gap_begin = gap_end = -1  # code that comes back: all one function
                        elif kept < target:
                            kept = target
            ref_index += 1
        table_reach = reaches.get(insn)
        if table_reach is not None:
            if table_reach > reach:
                reach = table_reach
            if tail_gaps:
                for target in cases[insn]:
                    heappush(ahead, target)
                if outside:
                    if gap_end >= 0 and any(begin <= target < gap_end for target in cases[insn]):
                        gap_begin = gap_end = -1
                    elif table_reach > kept:
                        kept = table_reach
        end = rvas[index + 1] if index + 1 < count else limit
        if memory[insn] not in _MAY_TERMINATE or not terminates(memory, insn, end):
            continue
        if gap_end < 0:
            if reach < end:
                return end
            if tail_gaps:
                while ahead and ahead[0] < end:
                    heappop(ahead)
                nearest = ahead[0] if ahead else limit
                # fill after the instruction, something else, and fill again right before the target: the
                # shape of a function's end, data, and the next function's entry
                fill = FILL_RE.match(memory, end, nearest) if end < nearest < limit and nearest <= len(memory) else None
                if fill and fill.end() < nearest and memory[nearest - 1] in FILL_BYTES:
                    gap_begin, gap_end, kept = end, nearest, reach
        elif kept < end:
            return gap_begin
    # code that runs into the next start without branching back into the gap or beyond that start
    return gap_begin if gap_end >= 0 and kept < limit else limit


def reach_windows(memory: bytes, items: list[tuple], windows: list[tuple], analyses: list[Any], horizons: list[int],
                  margin: int, full: dict[tuple, Any], tail_gaps: bool = True) -> tuple[list[tuple | None], list[int]]:
    """``functions._reach``'s verdicts on the decodes ``analyses`` of the first ``windows`` of ``items`` (each
    window the item's single range, perhaps cut short): an item whose window is all of it is reached on its
    decode (which goes into ``full``); a window without jump tables whose code ends, tail gaps aside, at least
    ``margin`` bytes before the window's end is reached on it, branches up to the item's end counting. The
    others need their whole decode: None in the list returned, and their indexes in the second list."""
    if not len(windows) == len(analyses) == len(horizons) == len(items):
        raise ValueError("items, windows, analyses and horizons differ in length")

    def reached(item: tuple, analysis: Any, horizon: int) -> tuple:
        rva, ((begin, limit),) = item
        end = reachable_end(memory, analysis.insn_rvas, analysis.raw_refs, analysis.raw_tables, begin, limit, horizon,
                            tail_gaps)
        return (rva, ((begin, end),)) if end < limit else item

    out: list[tuple | None] = []
    whole = []
    for index, (item, window, analysis, horizon) in enumerate(zip(items, windows, analyses, horizons)):
        limit, ((begin, window_end),) = item[1][0][1], window[1]
        if window_end == limit:
            full[item] = analysis
            out.append(reached(item, analysis, horizon))
            continue
        if not analysis.raw_tables:
            horizon = max(horizon, limit)
            # a tail gap's cut comes before the instruction that confirms it: only an end well inside the
            # window without tail gaps (they only ever cut earlier) is decided by the window
            if reachable_end(memory, analysis.insn_rvas, analysis.raw_refs, analysis.raw_tables, begin, window_end,
                             horizon, False) <= window_end - margin:
                out.append(reached(window, analysis, horizon))
                continue
        out.append(None)
        whole.append(index)
    return out, whole


def plausible_limits(candidates: Iterable[int], relocations: Sequence[int], starts: Sequence[int],
                     code_rvas: Sequence[int], code_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """The candidates worth judging, sorted, and how far each may run: up to the next of the sorted ``starts``
    after it, within its code section (``code_rvas``, ``code_ends``: sorted, disjoint; every candidate lies in
    one). A candidate in or right after a relocated 64-bit pointer (``relocations``, sorted) is left out:
    mingw keeps its constructor lists in .text, and a pointer's low byte can look like a nop."""
    ordered = []
    for rva in candidates:
        index = bisect_right(relocations, rva) - 1
        if not (index >= 0 and relocations[index] + 8 >= rva):
            ordered.append(rva)
    ordered.sort()
    limits = []
    for rva in ordered:
        index = bisect_right(code_rvas, rva) - 1
        if index < 0 or rva >= code_ends[index]:
            raise ValueError(f"candidate {rva:#x} outside the code sections")
        limit = code_ends[index]
        index = bisect_right(starts, rva)
        limits.append(starts[index] if index < len(starts) and starts[index] < limit else limit)
    return ordered, limits


def sane_references(rvas: Sequence[int], refs: Iterable[tuple[int, int, int, int, int]], begin: int, end: int,
                    code_rvas: Sequence[int], code_ends: Sequence[int], section_rvas: Sequence[int],
                    section_ends: Sequence[int]) -> bool:
    """Whether code decoded from ``begin`` to ``end`` (instructions at ``rvas``) starts at ``begin`` and refers
    only where compiled code does: every branch and call into a code section (``code_rvas``, ``code_ends``)
    and, inside the range, onto one of its instructions; every RIP-relative operand into a section
    (``section_rvas``, ``section_ends``). All bounds sorted and disjoint."""
    if not len(rvas) or rvas[0] != begin:
        return False
    for kind, _, _, _, target in refs:
        if kind in (BRANCH_REL8, BRANCH_REL32, CALL_REL32):
            index = bisect_right(code_rvas, target) - 1
            if index < 0 or target >= code_ends[index]:
                return False
            if begin <= target < end and target not in rvas:
                return False  # a branch into the middle of one of its own instructions
        elif kind == RIP_RELATIVE:
            index = bisect_right(section_rvas, target) - 1
            if index < 0 or target >= section_ends[index]:
                return False
    return True


def sane_items(memory: bytes, items: list[tuple], analyses: list[Any], code_rvas: Sequence[int],
               code_ends: Sequence[int], section_rvas: Sequence[int], section_ends: Sequence[int]) -> list[bool]:
    """For each item with its decode: ``sane_references`` of its single range, and where it has no jump table,
    ``sweep_matches`` of that range too (a byte capstone could not decode leaves a hole in the sweep)."""
    if len(items) != len(analyses):
        raise ValueError("items and analyses differ in length")
    out = []
    for (_, ((begin, end),)), analysis in zip(items, analyses):
        rvas = analysis.insn_rvas
        out.append(sane_references(rvas, analysis.raw_refs, begin, end, code_rvas, code_ends, section_rvas,
                                   section_ends) and
                   (bool(analysis.raw_tables) or sweep_matches(memory, begin, end, rvas)))
    return out


def call_and_lea_targets(memory: bytes, refs_lists: Iterable[Iterable[tuple[int, int, int, int, int]]]
                         ) -> tuple[set[int], set[int]]:
    """Targets of direct calls, and addresses taken with ``lea r, [rip+X]``, in the given reference lists."""
    calls: set[int] = set()
    leas: set[int] = set()
    for refs in refs_lists:
        for kind, insn_rva, operand_offset, _, target in refs:
            if kind == CALL_REL32:
                calls.add(target)
            # RIP-relative addressing has no SIB byte: the opcode sits right before the ModRM byte
            elif kind == RIP_RELATIVE and operand_offset >= 2 and memory[insn_rva + operand_offset - 2] == 0x8D:
                leas.add(target)
    return calls, leas


def build_functions(cls: Any, items: list[tuple[int, tuple[tuple[int, int], ...]]], analyses: list[Any],
                    before: Sequence[int], after: Sequence[int], pdata: dict[int, Any], names: dict[int, str],
                    sources: dict[int, int], sources_of: Callable[[int], tuple[str, ...]]) -> list[Any]:
    """A ``cls`` (``functions.Function``) for each final item ``(rva, ranges)`` with its analysis and the padding
    before and after it: its name in ``names``, its sources ``sources_of(sources[rva])``, its unwind info
    from the .pdata entry ``pdata[rva]`` if any."""
    if not len(analyses) == len(before) == len(after) == len(items):
        raise ValueError("items, analyses and paddings differ in length")
    out = []
    for (rva, ranges), analysis, pad_before, pad_after in zip(items, analyses, before, after):
        runtime = pdata.get(rva)
        out.append(cls(rva, ranges[0][1], names.get(rva), sources_of(sources[rva]), ranges[1:], pad_before, pad_after,
                       None if runtime is None else runtime.unwind, analysis.fingerprint))
    return out


def sweep_matches(memory: bytes, begin: int, end: int, rvas: Sequence[int]) -> bool:
    """Whether capstone's plain sweep of ``[begin, end)``, up to its first undecodable byte, decodes exactly
    the instructions at ``rvas`` (``instruction_text``'s addresses)."""
    from ._reference import instruction_text  # the core's twin imports capstone's binding: only when asked

    text = instruction_text(memory, begin, end)
    return len(text) == len(rvas) and all(insn[0] == rva for insn, rva in zip(text, rvas))


def decodable_in(memory: bytes, targets: Iterable[int]) -> list[int]:
    """The targets (in the given order) where an instruction decodes within 15 bytes (``instruction_text`` of
    ``[target, target + 15)`` is not empty)."""
    from ._reference import instruction_text

    return [target for target in targets if instruction_text(memory, target, target + 15)]
