"""Pure-Python reference implementation of the diff kernels.

``hotpatch/diff/_diffcore.pyx`` implements exactly the same three functions; this
module is the oracle the tests compare it with, and what the diff runs on
when the pure-Python analysis core is in use.

The contract (both implementations):

``token_ids(memory, insn_rvas, end_rva, refs, intern)``
    One token per instruction: its bytes (up to the next instruction, or to
    ``end_rva`` for the last one; one byte when that is not 1..15 bytes) with
    every reference operand zeroed, replaced by its id in ``intern`` (a dict
    shared by both images of a diff; a new token gets ``len(intern)``).
    Returns an ``array('I')``.

``new_interner()``
    What ``InstructionStreams`` passes ``token_ids`` as ``intern``: a dict
    here; the compiled kernels give an ``Interner`` that keeps the same ids
    in C (``token_ids`` there takes either).

``similarity(a, b, threshold, max_ratio_work)``
    ``difflib.SequenceMatcher(None, a, b, autojunk=False)``: -1.0 when
    ``real_quick_ratio()`` or ``quick_ratio()`` is below ``threshold``, else
    ``ratio()``, or ``quick_ratio()`` when ``len(a) * len(b)`` exceeds
    ``max_ratio_work``.

``aligned_indices(a, b)``
    ``hotpatch.diff.align.aligned_indices``: the patience alignment of two token
    streams as sorted ``(i, j)`` pairs.

``aligned_packed(a, b)``
    ``aligned_indices(a, b)`` flattened into one ``array('I')``: i0, j0, i1, j1, ...

``ref_pairs(refs_a, refs_b, insn_rvas_a, insn_rvas_b, aligned)``
    The references of aligned instructions paired up: for each (i, j) of
    ``aligned`` (flat, as ``aligned_packed`` gives it), the references of
    instruction ``insn_rvas_a[i]`` (in their order) zipped with those of
    ``insn_rvas_b[j]`` when both have references, as many on each side.

``callees(refs, ranges, starts, pointer_tables)``
    The functions one function reaches, in instruction order: targets of its
    direct calls and branches that are function ``starts`` outside its own
    ``ranges``, and for a reference to a key of ``pointer_tables`` the
    functions listed there.

``ref_targets(refs_lists)``
    The set of every target of the given reference lists.

``call_graph(refs_lists, ranges_list, rvas, starts, pointer_tables, callees_out, callers_out)``
    ``callees`` of every function (the three lists side by side) into
    ``callees_out`` (rva -> callees), and each function's rva appended once
    to ``callers_out[target]`` for every function it reaches, in function
    order (a list made for a target first seen).

``pointer_tables(memory, relocations, image_base, code_spans, starts)``
    Data address -> the function ``starts`` pointed at by the run of
    relocated 8-byte slots that begins there: a slot of ``relocations``
    begins a run when the slot 8 bytes before is not relocated and it lies
    outside code (``code_spans``: ``(begin, end)`` sorted by begin; in code
    when the last span beginning at or before it ends after it, as
    ``Image.is_executable_rva`` says); the run goes on while
    the next slot is relocated. A slot's pointer is its 8 bytes (or those
    left before the end of ``memory``) less ``image_base``. Only runs that
    point at a start are kept, in the order of ``relocations``.

``targets_within(refs_lists, spans)``
    The set of the targets of the given reference lists that lie in one of
    ``spans`` (``(begin, end)`` pairs, end excluded).

``propagate(queue, forward, backward, callees_a, callees_b, callers_a, callers_b, aligned_pairs, pair, settled=None)``
    Call-graph propagation: while ``queue`` (matched ``(a, b)``, taken from
    its end) is not empty, the callees of ``a`` and ``b`` go to
    ``aligned_pairs(left, right)`` unless every one on one side is matched
    already (a key of ``forward``, resp. ``backward``), the ``lone_pair`` of
    their callers joins them, and each ``(x, y)`` both still unmatched for
    which ``pair(x, y)`` is true goes on the queue. With a ``settled`` set, a
    pair whose ``a`` is in it is passed over, and a pair that offered nothing
    with every callee matched on one side and every caller matched on one
    side goes in (it can offer nothing again: pairs are never undone).

``twins_by_neighbours(groups, mapping, callees_a, callers_a, callees_b, callers_b, limit, pair)``
    For each ``(left, right)`` of ``groups`` in order whose product of
    lengths is at most ``limit``: each ``a`` of ``left`` is scored against
    each ``b`` of ``right`` by how many of a's callers and callees, through
    ``mapping`` (its matched ones), are callers or callees of ``b``
    (scores of 0 are left out). Then, most shared first and by ``(a, b)``,
    ``pair(a, b)`` for each pair whose score is the single best of ``a``
    and the single best of ``b`` (a tie is no evidence). A group's pairs are
    made before the next group is scored.

``relocated_data(memory, relocations, image_base, sections)``
    For each relocated slot in order: the pointer there (8 bytes, or those
    left before the end of ``memory``) less ``image_base`` when that lies in
    data, then the slot itself when it lies in data. An RVA lies in data when
    the last of ``sections`` ((begin, end, executable), sorted by begin)
    starting at or before it is not executable and ends after it.

``triage_refs(refs_a, refs_b, pairs, ranges_a, ranges_b, iat_a, iat_b, function_map, data_a, data_b)``
    The reference pairs of two matched functions (``ranges_a``/``ranges_b``:
    each one's ranges, its own range first): ``pairs`` as given, or when it
    is None (equal fingerprints) the references zipped in order, less those
    inside the baseline's own range (but jump tables) and those to ``iat_a``
    slots. Pairs whose baseline target maps to the patched one through
    ``function_map`` are dropped; pairs with both targets in ``data_a`` /
    ``data_b`` come back as ``(target_a, target_b)`` in the first list; pairs
    whose targets both lie in their own function's ranges (and in no import
    slot: what ``TargetClassifier`` calls ``self`` on both sides) are
    dropped; the rest come back as ``(ref_a, ref_b)`` in the second.

``aligned_callees(mapping, backward, left, right)``
    Nothing when every element of ``left`` is a key of ``mapping`` (baseline
    -> patched of every pair) or every one of ``right`` a key of
    ``backward`` (its inverse). Else each matched element becomes its
    counterpart (``mapping[x]``, resp. itself) and each unmatched one a
    placeholder of its own; the unmatched pairs facing each other in the
    ``equal_replacements`` of those two lists, in order, then the
    ``lone_pair`` of ``left`` and ``right``.

``equal_replacements(a, b)``
    ``(a0, a1, b0, b1)`` of each "replace" opcode of
    ``hotpatch.diff.align.opcodes(a, b)`` (lists of any hashable elements)
    whose two sides are as long, in order.

``unfilled_gaps(memory, ranges, begin, limit)``
    The gaps of a section ``[begin, limit)`` between ``ranges`` ((begin,
    end, owner, index), sorted by begin; index -1 marks a jump table) that
    hold a byte other than int3, nop or zero, or that run past ``memory``:
    ``(anchor, part, gap_begin, gap_end)`` in order, where anchor and part
    are the owner and index of the last range (not a table) that moved the
    sweep's cursor before the gap (None and 0 before any). A range ending at
    or before the cursor moves nothing.

``rva_map(function_map)``
    What ``triage_block`` may take as ``rva_map``: None here; the compiled
    kernels keep the map in C (``RvaMap``) to drop calls to matched
    functions before making a Python int.

``triage_block(functions_a, analyses_a, functions_b, analyses_b, at_b, start, stop, iat_a, iat_b, function_map,
data_a, data_b, rva_map, unequal)``
    Per baseline function ``index`` in ``[start, stop)``, whose counterpart
    is ``functions_b[at_b[index]]`` (-1: none), in one list: ``unequal``
    when it has none or their fingerprints differ, else ``triage_refs``
    without pairs (equal fingerprints) of the two functions' ``raw_refs``
    and ``ranges``: None where both of its lists are empty (nothing left to
    judge), else ``(data, rest)``.

``unique_pairs(keys_a, rvas_a, keys_b, rvas_b)``
    ``(rvas_a[i], rvas_b[j])`` for each key that is set (truthy), met once
    in ``keys_a`` (at i) and once in ``keys_b`` (at j), in baseline order.

``branch_targets_between(refs, low, high)``
    The set of the targets of the rel8/rel32 branches among ``refs`` that lie
    strictly between ``low`` and ``high``.

``unsupported_refs(refs, ranges, rel8_leaves, sections, iat)``
    The references a package cannot relocate, in order, leaving out those
    whose target lies in ``ranges`` (they move with the function): ``(0,
    insn_rva, target)`` for a rel8 branch when ``rel8_leaves``, else ``(1,
    insn_rva, target)`` for a nonzero target in none of ``sections``
    ((begin, end, executable), sorted by begin, not overlapping) and not a
    key of ``iat``.

``lone_pair(taken_left, taken_right, left, right)``
    ``[(x, y)]`` when exactly one distinct element of ``left`` is not a key of
    ``taken_left`` (``x``) and exactly one of ``right`` not of ``taken_right``
    (``y``), else ``[]``.

``data_side(memory, starts, section_rvas, section_ends, relocations, image_base, functions, max_item)``
    One image's data items as ``items_equal`` reads them: its mapped
    ``memory``, the sorted item ``starts``, its sections' RVAs and ends
    (sorted by RVA), its sorted relocated slots, ``image_base``, the set of
    its function starts and the most bytes of one item compared.

``item_extent(side, rva)``
    The bytes of an item compared from ``rva``: to the next item start, the
    end of the section holding it or ``max_item`` bytes, whichever comes
    first (0 outside every section).

``lists_reaching(refs_lists, targets)``
    The indexes of the reference lists, in order, with at least one target
    in ``targets`` (a set of ints).

``items_equal(side_a, side_b, rva_a, rva_b, function_map)``
    ``hotpatch.diff.dataitems.items_equal`` of two ``data_side``: the items
    compared over the shorter extent (to the next start, the section's end
    or ``max_item`` bytes); the relocated slots inside must sit at the same
    offsets, and each whole one must designate corresponding functions
    (``function_map``) or, when its baseline target is unmatched, no
    function on either side; the bytes (as far as ``memory`` holds them)
    must be equal outside those slots. A slot read past the end of
    ``memory`` raises ``struct.error``.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from difflib import SequenceMatcher
from itertools import filterfalse
from typing import Any

from ..analysis.refkinds import BRANCH_REL8, BRANCH_REL32, CALL_REL32, JUMP_TABLE
from .align import aligned_indices, opcodes

__all__ = ["IMPLEMENTATION", "aligned_callees", "aligned_indices", "aligned_packed", "branch_targets_between",
           "call_graph", "callees", "data_side", "equal_replacements", "item_extent", "items_equal", "lists_reaching",
           "lone_pair", "new_interner", "pointer_tables", "propagate", "ref_pairs", "ref_targets", "relocated_data",
           "rva_map", "similarity", "targets_within", "token_ids", "triage_block", "triage_refs",
           "twins_by_neighbours", "unfilled_gaps", "unique_pairs", "unsupported_refs"]

IMPLEMENTATION = "python"


def new_interner() -> dict[bytes, int]:
    return {}


def token_ids(memory: bytes, insn_rvas: Any, end_rva: int, refs: list, intern: dict[bytes, int]) -> array:
    masks: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for _, insn_rva, offset, size, _ in refs:
        if size:
            masks[insn_rva].append((offset, size))
    rvas = list(insn_rvas)
    ends = rvas[1:] + [end_rva]
    out = array("I")
    for rva, end in zip(rvas, ends):
        if not rva < end <= rva + 15:
            end = rva + 1  # the last instruction of a fragment, or undecodable bytes
        token = memory[rva:end]
        masked = masks.get(rva)
        if masked is not None:
            raw = bytearray(token)
            for offset, size in masked:
                raw[offset:offset + size] = bytes(min(size, max(0, len(raw) - offset)))
            token = bytes(raw)
        found = intern.get(token)
        if found is None:
            found = intern[token] = len(intern)
        out.append(found)
    return out


def similarity(a: Any, b: Any, threshold: float, max_ratio_work: int) -> float:
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
        return -1.0
    return matcher.ratio() if len(a) * len(b) <= max_ratio_work else matcher.quick_ratio()


def aligned_packed(a: Any, b: Any) -> array:
    return array("I", [index for pair in aligned_indices(a, b) for index in pair])


def ref_pairs(refs_a: Any, refs_b: Any, insn_rvas_a: Any, insn_rvas_b: Any, aligned: Any) -> list[tuple[tuple, tuple]]:
    by_insn_a: dict[int, list[tuple]] = defaultdict(list)
    by_insn_b: dict[int, list[tuple]] = defaultdict(list)
    for ref in refs_a:
        by_insn_a[ref[1]].append(ref)
    for ref in refs_b:
        by_insn_b[ref[1]].append(ref)
    pairs = []
    for i, j in zip(aligned[::2], aligned[1::2]):
        left = by_insn_a.get(insn_rvas_a[i])
        right = by_insn_b.get(insn_rvas_b[j])
        if left is not None and right is not None and len(left) == len(right):
            pairs.extend(zip(left, right))
    return pairs


def callees(refs: list, ranges: tuple, starts: set[int], pointer_tables: dict[int, list[int]]) -> list[int]:
    out: list[int] = []
    for kind, _, _, _, target in refs:
        if kind == CALL_REL32 or kind == BRANCH_REL32 or kind == BRANCH_REL8:
            if target in starts and not any(begin <= target < end for begin, end in ranges):
                out.append(target)
        elif target in pointer_tables:
            out.extend(pointer_tables[target])
    return out


def relocated_data(memory: bytes, relocations: Any, image_base: int, sections: tuple) -> list[int]:
    begins = [section[0] for section in sections]

    def in_data(rva: int) -> bool:
        index = bisect_right(begins, rva) - 1
        return index >= 0 and rva < sections[index][1] and not sections[index][2]

    out = []
    for slot in relocations:
        target = int.from_bytes(memory[slot:slot + 8], "little") - image_base
        if in_data(target):
            out.append(target)
        if in_data(slot):
            out.append(slot)
    return out


def call_graph(refs_lists: list, ranges_list: list, rvas: list, starts: set[int], pointer_tables: dict[int, list[int]],
               callees_out: dict[int, list[int]], callers_out: dict[int, list[int]]) -> None:
    for refs, ranges, rva in zip(refs_lists, ranges_list, rvas):
        out = callees_out[rva] = callees(refs, ranges, starts, pointer_tables)
        for target in dict.fromkeys(out):
            callers_out.setdefault(target, []).append(rva)


def pointer_tables(memory: bytes, relocations: Any, image_base: int, code_spans: tuple,
                   starts: set[int]) -> dict[int, list[int]]:
    relocated = set(relocations)
    begins = [span[0] for span in code_spans]
    out: dict[int, list[int]] = {}
    for slot in relocations:
        index = bisect_right(begins, slot) - 1
        if slot - 8 in relocated or (index >= 0 and slot < code_spans[index][1]):
            continue  # not the first slot of a run
        run = []
        at = slot
        while at in relocated:
            target = int.from_bytes(memory[at:at + 8], "little") - image_base
            if target in starts:
                run.append(target)
            at += 8
        if run:
            out[slot] = run
    return out


def ref_targets(refs_lists: Any) -> set[int]:
    return {ref[4] for refs in refs_lists for ref in refs}


def targets_within(refs_lists: Any, spans: tuple) -> set[int]:
    return {ref[4] for refs in refs_lists for ref in refs if _inside(spans, ref[4])}


def _inside(ranges: tuple, target: int) -> bool:
    return any(begin <= target < end for begin, end in ranges)


def triage_refs(refs_a: list, refs_b: list, pairs: list | None, ranges_a: tuple, ranges_b: tuple, iat_a: dict,
                iat_b: dict, function_map: dict[int, int], data_a: frozenset[int],
                data_b: frozenset[int]) -> tuple[list[tuple[int, int]], list[tuple[tuple, tuple]]]:
    begin, end = ranges_a[0]
    if pairs is None:
        pairs = [(ra, rb) for ra, rb in zip(refs_a, refs_b)
                 if not (begin <= ra[4] < end and ra[0] != JUMP_TABLE or ra[4] in iat_a)]
    data, rest = [], []
    for ra, rb in pairs:
        target_a, target_b = ra[4], rb[4]
        if function_map.get(target_a) == target_b:
            continue
        if target_a in data_a and target_b in data_b:
            data.append((target_a, target_b))
        elif not (_inside(ranges_a, target_a) and _inside(ranges_b, target_b)
                  and target_a not in iat_a and target_b not in iat_b):
            rest.append((ra, rb))
    return data, rest


def equal_replacements(a: list, b: list) -> list[tuple[int, int, int, int]]:
    return [(a0, a1, b0, b1) for tag, a0, a1, b0, b1 in opcodes(a, b) if tag == "replace" and a1 - a0 == b1 - b0]


def aligned_callees(mapping: dict[int, int], backward: dict[int, int], left: list[int],
                    right: list[int]) -> list[tuple[int, int]]:
    if all(map(mapping.__contains__, left)) or all(map(backward.__contains__, right)):
        return []  # nothing left to pair on one side
    # Matched callees become anchors (their counterpart), unmatched ones unique placeholders.
    keys_a = [mapping[x] if x in mapping else ("a", i) for i, x in enumerate(left)]
    keys_b = [y if y in backward else ("b", i) for i, y in enumerate(right)]
    pairs = []
    for a0, a1, b0, b1 in equal_replacements(keys_a, keys_b):
        pairs.extend((left[i], right[j]) for i, j in zip(range(a0, a1), range(b0, b1))
                     if left[i] not in mapping and right[j] not in backward)
    pairs.extend(lone_pair(mapping, backward, left, right))
    return pairs


#: the fill bytes ``unfilled_gaps`` takes one by one (``uncovered._ONE_BYTE_FILL``)
_ONE_BYTE_FILL = b"\xcc\x90\x00"


def unfilled_gaps(memory: bytes, ranges: list, begin: int, limit: int) -> list[tuple[Any, int, int, int]]:
    out = []
    cursor, anchor, part = begin, None, 0
    for start, end, owner, index in ranges + [(limit, limit, None, 0)]:
        if start > cursor:
            stop = min(start, limit)
            if stop > len(memory) or memory[cursor:stop].translate(None, _ONE_BYTE_FILL):
                out.append((anchor, part, cursor, stop))
        if end > cursor:
            cursor = end
            if index != -1:
                anchor, part = owner, index
    return out


def rva_map(function_map: dict[int, int]) -> None:
    return None  # the dict alone answers here


def triage_block(functions_a: Any, analyses_a: Any, functions_b: Any, analyses_b: Any, at_b: list[int], start: int,
                 stop: int, iat_a: dict, iat_b: dict, function_map: dict[int, int], data_a: frozenset[int],
                 data_b: frozenset[int], rva_map: Any, unequal: object) -> list[object]:
    out: list[object] = []
    for index in range(start, stop):
        at = at_b[index]
        if at < 0 or functions_a[index].fingerprint != functions_b[at].fingerprint:
            out.append(unequal)
            continue
        data, rest = triage_refs(analyses_a[index].raw_refs, analyses_b[at].raw_refs, None, functions_a[index].ranges,
                                 functions_b[at].ranges, iat_a, iat_b, function_map, data_a, data_b)
        out.append((data, rest) if data or rest else None)
    return out


def propagate(queue: list, forward: dict, backward: dict, callees_a: dict, callees_b: dict, callers_a: Any,
              callers_b: Any, aligned_pairs: Any, pair: Any, settled: set | None = None) -> None:
    while queue:
        a, b = queue.pop()
        if settled is not None and a in settled:
            continue
        left, right = callees_a.get(a, []), callees_b.get(b, [])
        trivial = all(map(forward.__contains__, left)) or all(map(backward.__contains__, right))
        new = [] if trivial else aligned_pairs(left, right)
        lone = lone_pair(forward, backward, callers_a.get(a, ()), callers_b.get(b, ()))
        new.extend(lone)
        if trivial and not lone and settled is not None and (
                all(map(forward.__contains__, callers_a.get(a, ())))
                or all(map(backward.__contains__, callers_b.get(b, ())))):
            settled.add(a)
        for x, y in new:
            if x not in forward and y not in backward and pair(x, y):
                queue.append((x, y))


def twins_by_neighbours(groups: list, mapping: dict[int, int], callees_a: dict, callers_a: Any, callees_b: dict,
                        callers_b: Any, limit: int, pair: Any) -> None:
    for left, right in groups:
        if len(left) * len(right) > limit:
            continue
        scored = []
        neighbours_b: list[tuple[int, set[int]]] | None = None  # each b's, made once per group when needed
        for a in left:
            mapped = {mapping[x] for x in (*callers_a.get(a, ()), *callees_a.get(a, ())) if x in mapping}
            if not mapped:
                continue
            if neighbours_b is None:
                neighbours_b = [(b, {*callers_b.get(b, ()), *callees_b.get(b, ())}) for b in right]
            for b, neighbours in neighbours_b:
                shared = len(mapped & neighbours)
                if shared:
                    scored.append((-shared, a, b))
        # a pair counts only when each is the other's single best: a tie is no evidence either way
        best_a: dict[int, list[int]] = defaultdict(list)
        best_b: dict[int, list[int]] = defaultdict(list)
        for score, a, b in scored:
            best_a[a].append(score)
            best_b[b].append(score)
        # each one's two best scores, taken once (not once per pair it is in)
        tops_a = {a: sorted(scores)[:2] for a, scores in best_a.items()}
        tops_b = {b: sorted(scores)[:2] for b, scores in best_b.items()}
        for score, a, b in sorted(scored):
            top_a, top_b = tops_a[a], tops_b[b]
            if score == top_a[0] == top_b[0] and top_a[1:] != [score] and top_b[1:] != [score]:
                pair(a, b)


def lone_pair(taken_left: dict, taken_right: dict, left: Any, right: Any) -> list[tuple[int, int]]:
    free_left = list(filterfalse(taken_left.__contains__, dict.fromkeys(left)))
    free_right = list(filterfalse(taken_right.__contains__, dict.fromkeys(right)))
    return [(free_left[0], free_right[0])] if len(free_left) == 1 and len(free_right) == 1 else []


def branch_targets_between(refs: Any, low: int, high: int) -> set[int]:
    return {ref[4] for ref in refs if (ref[0] == BRANCH_REL8 or ref[0] == BRANCH_REL32) and low < ref[4] < high}


def unsupported_refs(refs: Any, ranges: tuple, rel8_leaves: bool, sections: tuple,
                     iat: dict) -> list[tuple[int, int, int]]:
    out = []
    for kind, insn_rva, _, _, target in refs:
        if _inside(ranges, target):
            continue
        if kind == BRANCH_REL8 and rel8_leaves:
            out.append((0, insn_rva, target))
        elif target != 0 and not any(s[0] <= target < s[1] for s in sections) and target not in iat:
            out.append((1, insn_rva, target))
    return out


class DataSide:
    """``data_side``'s answer: one image's data items, as ``items_equal`` reads them."""

    __slots__ = ("memory", "starts", "section_rvas", "section_ends", "relocations", "image_base", "functions",
                 "max_item")

    def __init__(self, memory: bytes, starts: Any, section_rvas: Any, section_ends: Any, relocations: Any,
                 image_base: int, functions: Any, max_item: int) -> None:
        self.memory, self.starts, self.relocations = memory, starts, relocations
        self.section_rvas, self.section_ends = section_rvas, section_ends
        self.image_base, self.functions, self.max_item = image_base, functions, max_item

    def extent(self, rva: int) -> int:
        index = bisect_right(self.section_rvas, rva) - 1
        if index < 0 or rva >= self.section_ends[index]:
            return 0
        limit = min(self.section_ends[index], rva + self.max_item)
        following = bisect_right(self.starts, rva)
        if following < len(self.starts):
            limit = min(limit, self.starts[following])
        return max(0, limit - rva)

    def pointer_slots(self, rva: int, length: int) -> list[int]:
        low = bisect_left(self.relocations, rva)
        high = bisect_left(self.relocations, rva + length)
        return [slot - rva for slot in self.relocations[low:high]]

    def pointer_at(self, rva: int) -> int:
        return struct.unpack_from("<Q", self.memory, rva)[0] - self.image_base


def data_side(memory: bytes, starts: Any, section_rvas: Any, section_ends: Any, relocations: Any, image_base: int,
              functions: Any, max_item: int) -> DataSide:
    return DataSide(memory, starts, section_rvas, section_ends, relocations, image_base, functions, max_item)


def item_extent(side: DataSide, rva: int) -> int:
    return side.extent(rva)


def items_equal(a: DataSide, b: DataSide, rva_a: int, rva_b: int, function_map: dict[int, int]) -> bool:
    length = min(a.extent(rva_a), b.extent(rva_b))
    if length <= 0:
        return True
    slots_a = a.pointer_slots(rva_a, length)
    slots_b = b.pointer_slots(rva_b, length)
    if slots_a != slots_b:
        return False
    if not slots_a:  # no pointers: the bytes alone decide
        return a.memory[rva_a:rva_a + length] == b.memory[rva_b:rva_b + length]
    bytes_a = bytearray(a.memory[rva_a:rva_a + length])
    bytes_b = bytearray(b.memory[rva_b:rva_b + length])
    for slot in slots_a:
        if slot + 8 > length:
            continue
        target_a = a.pointer_at(rva_a + slot)
        target_b = b.pointer_at(rva_b + slot)
        mapped = function_map.get(target_a)
        if mapped is not None and mapped != target_b:
            return False
        if mapped is None and (target_a in a.functions or target_b in b.functions):
            return False  # a removed function, or one the old pointer did not designate
        bytes_a[slot:slot + 8] = bytes(8)
        bytes_b[slot:slot + 8] = bytes(8)
    return bytes_a == bytes_b


def lists_reaching(refs_lists: Any, targets: set[int]) -> list[int]:
    return [index for index, refs in enumerate(refs_lists) if any(ref[4] in targets for ref in refs)]


def unique_pairs(keys_a: list, rvas_a: list[int], keys_b: list, rvas_b: list[int]) -> list[tuple[int, int]]:
    count_a, count_b = Counter(keys_a), Counter(keys_b)
    rva_b = dict(zip(keys_b, rvas_b))
    return [(rva, rva_b[key]) for key, rva in zip(keys_a, rvas_a) if key and count_a[key] == 1 and count_b[key] == 1]
