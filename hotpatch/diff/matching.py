"""Matching the functions of a baseline image with those of a patched image.

Stages, each on what is still unmatched: unique name (export or symbol),
unique fingerprint, call-graph propagation from matched pairs (callees by
position, lone unmatched callers and callees), twins (groups of identical
code told apart by matched neighbours and by the gap between matched
functions they sit in), then similarity of the instruction streams above a
threshold.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter

from ..analysis.api import diff_kernels
from ..analysis.functions import Function, FunctionTable
from .streams import InstructionStreams

__all__ = ["Match", "match_functions", "SIMILARITY_THRESHOLD"]

SIMILARITY_THRESHOLD = 0.6
#: candidates per function on each side of its size (keeps the stage linear in the number of functions)
SIMILARITY_CANDIDATES = 5
#: past this many token comparisons a pair is scored by its multiset overlap instead of an alignment
MAX_RATIO_WORK = 1_000_000


@dataclass(frozen=True, slots=True)  # slots, as ``FunctionDiff``: one a matched function
class Match:
    baseline_rva: int
    patched_rva: int
    method: str  # name | fingerprint | callgraph | similarity
    similarity: float | None = None


class _Matcher:
    def __init__(self, baseline: FunctionTable, patched: FunctionTable, streams: InstructionStreams) -> None:
        self.baseline = baseline
        self.patched = patched
        self.streams = streams
        self.forward: dict[int, Match] = {}
        self.backward: dict[int, int] = {}
        #: baseline rva -> patched rva of every pair (forward without the Match: what the neighbour scans read)
        self.mapping: dict[int, int] = {}
        #: (baseline rva, patched rva) of every pair in the order made (forward's order), as propagation
        #: takes them: a slice of it, not a tuple made per pair each time
        self.pairs: list[tuple[int, int]] = []
        #: ``_twin_groups``' last answer, filtered the next time instead of grouping every unmatched function
        self.twin_groups: list[tuple[list[int], list[int]]] | None = None
        #: baseline RVAs of the pairs propagation found unable to offer anything again (every callee matched
        #: on one side, every caller on one side): the later full passes go past them
        self.settled: set[int] = set()
        kernels = diff_kernels(baseline.backend)
        self.propagate, self.aligned_callees = kernels.propagate, kernels.aligned_callees
        self.twins_by_neighbours, self.unique_pairs = kernels.twins_by_neighbours, kernels.unique_pairs
        # the unmatched lists are taken a dozen times: each is the last one filtered (pairs are never undone,
        # so that keeps the table's order), not the whole table again
        self._unmatched_a: list[Function] = list(baseline.functions)
        self._unmatched_b: list[Function] = list(patched.functions)
        #: ``anchors``' last answer, and how many pairs it holds
        self._anchors: list[int] = []
        self._anchored = 0

    def pair(self, a: int, b: int, method: str, similarity: float | None = None) -> bool:
        if a in self.forward or b in self.backward:
            return False
        self.forward[a] = Match(a, b, method, similarity)
        self.backward[b] = a
        self.mapping[a] = b
        self.pairs.append((a, b))
        return True

    def pair_all(self, pairs: Iterable[tuple[int, int]], method: str) -> None:
        """``pair`` of each ``(a, b)`` in order (one loop, not a method call a pair: stages make tens of thousands)."""
        forward, backward, mapping, made = self.forward, self.backward, self.mapping, self.pairs
        for a, b in pairs:
            if a in forward or b in backward:
                continue
            forward[a] = Match(a, b, method)
            backward[b] = a
            mapping[a] = b
            made.append((a, b))

    def anchors(self) -> list[int]:
        """The baseline RVAs of every pair, sorted: the last answer merged with the pairs made since (pairs are
        never undone; two sorted runs merge in one linear pass, where sorting every pair again does not)."""
        made = self.pairs[self._anchored:]
        if made:
            self._anchors = sorted(self._anchors + sorted(a for a, _ in made))
            self._anchored += len(made)
        return self._anchors

    def unmatched_baseline(self) -> list[Function]:
        forward = self.forward
        self._unmatched_a = [f for f in self._unmatched_a if f.rva not in forward]
        return self._unmatched_a

    def unmatched_patched(self) -> list[Function]:
        backward = self.backward
        self._unmatched_b = [f for f in self._unmatched_b if f.rva not in backward]
        return self._unmatched_b


def match_functions(baseline: FunctionTable, patched: FunctionTable,
                    streams: InstructionStreams | None = None) -> dict[int, Match]:
    """Baseline RVA -> Match for every function that has a counterpart."""
    m = _Matcher(baseline, patched, streams or InstructionStreams(baseline, patched))
    _by_unique_key(m, "name", "name")
    _by_unique_key(m, "fingerprint", "fingerprint")
    _by_call_graph(m)
    _by_twins(m)
    _by_fingerprint_groups(m)
    _by_similarity(m)
    _by_call_graph(m)
    _by_twins(m)
    return m.forward


def _by_unique_key(m: _Matcher, attribute: str, method: str) -> None:
    """Pairs the unmatched functions whose ``attribute`` (name, fingerprint) is set and unique on each side, in
    baseline order (counted and paired in one kernel: the first pass reads every function of both images)."""
    key = attrgetter(attribute)
    left, right = m.unmatched_baseline(), m.unmatched_patched()
    m.pair_all(m.unique_pairs(list(map(key, left)), list(map(_RVA, left)), list(map(key, right)),
                              list(map(_RVA, right))), method)


_RVA = attrgetter("rva")


# call graphs by table object (a table's functions never change); an entry goes when its table does
_CALL_GRAPHS: dict[int, tuple[dict[int, list[int]], dict[int, list[int]]]] = {}


def call_graph(table: FunctionTable) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Callees in instruction order and callers (cached per table).

    A callee is a call or tail-jump target, or a function whose address sits
    in a table of pointers the function references (dispatch tables, vtables).
    """
    cached = _CALL_GRAPHS.get(id(table))
    if cached is not None:
        return cached
    callees: dict[int, list[int]] = {}
    callers: dict[int, list[int]] = defaultdict(list)
    starts = {f.rva for f in table}
    pointer_tables = _pointer_tables(table, starts)
    diff_kernels(table.backend).call_graph([analysis.raw_refs for analysis in table.analyses],
                                           [function.ranges for function in table.functions],
                                           [function.rva for function in table.functions], starts, pointer_tables,
                                           callees, callers)
    _CALL_GRAPHS[id(table)] = (callees, callers)
    weakref.finalize(table, _CALL_GRAPHS.pop, id(table), None)
    return callees, callers


def _pointer_tables(table: FunctionTable, starts: set[int]) -> dict[int, list[int]]:
    """Data address -> the functions pointed at by the relocated slots that run from it."""
    image = table.image
    code_spans = tuple((section.rva, section.end_rva)
                       for section in sorted(image.executable_sections, key=attrgetter("rva")))
    return diff_kernels(table.backend).pointer_tables(image.memory, image.relocations, image.image_base, code_spans,
                                                      starts)


def _by_call_graph(m: _Matcher, since: int = 0) -> None:
    """Propagate from matched pairs; ``since``: only from the pairs made after the first ``since`` ones,
    and from the matched neighbours they give new anchors to (the others were propagated from already)."""
    callees_a, callers_a = call_graph(m.baseline)
    callees_b, callers_b = call_graph(m.patched)
    queue = m.pairs[since:]
    if since:
        mapping = m.mapping
        touched = {x for a, _ in queue for x in (*callers_a.get(a, ()), *callees_a.get(a, ())) if x in mapping}
        queue.extend((x, mapping[x]) for x in sorted(touched))
    m.propagate(queue, m.forward, m.backward, callees_a, callees_b, callers_a, callers_b,
                partial(m.aligned_callees, m.mapping, m.backward), lambda x, y: m.pair(x, y, "callgraph"), m.settled)


#: a fingerprint group larger than this on both sides is paired by position only (the scoring is quadratic)
_TWIN_SCORING_LIMIT = 4096


def _by_twins(m: _Matcher) -> None:
    """Unmatched functions with the same fingerprint on both sides, told apart by where they sit.

    Groups of identical code (generic instances, template copies) rarely
    have the same count on both sides after a change. Within a group, a pair
    whose matched callers and callees correspond is taken first (most shared
    neighbours first); then a pair alone in the same gap between two matched
    functions, or the same number of twins in that gap, in address order.
    Each round of pairs seeds the call graph, which can settle more groups.
    """
    for _ in range(4):
        before = len(m.forward)
        groups = _twin_groups(m)
        if not groups:
            return
        _twins_by_neighbours(m, groups)
        _twins_by_gap(m, _twin_groups(m))
        _by_call_graph(m, since=before)
        if len(m.forward) == before:
            return


def _twin_groups(m: _Matcher) -> list[tuple[list[int], list[int]]]:
    """Unmatched baseline and patched RVAs of each fingerprint found unmatched on both sides, the groups in
    the order their first baseline function comes in the table (by RVA)."""
    if m.twin_groups is not None:
        # pairs are never undone, so a group now was a group the last time: its members filtered, the
        # groups ordered again by their first member, give what grouping every unmatched function gives
        forward, backward = m.forward, m.backward
        m.twin_groups = [(left, right) for left, right in (([a for a in rvas if a not in forward],
                                                            [b for b in other if b not in backward])
                                                           for rvas, other in m.twin_groups) if left and right]
        m.twin_groups.sort(key=_first_rva)
        return m.twin_groups
    left: dict[str, list[int]] = defaultdict(list)
    right: dict[str, list[int]] = defaultdict(list)
    for f in m.unmatched_baseline():
        left[f.fingerprint].append(f.rva)
    for f in m.unmatched_patched():
        right[f.fingerprint].append(f.rva)
    m.twin_groups = [(rvas, right[fingerprint]) for fingerprint, rvas in left.items() if fingerprint in right]
    return m.twin_groups


def _first_rva(group: tuple[list[int], list[int]]) -> int:
    return group[0][0]


def _twins_by_neighbours(m: _Matcher, groups: list[tuple[list[int], list[int]]]) -> None:
    callees_a, callers_a = call_graph(m.baseline)
    callees_b, callers_b = call_graph(m.patched)
    m.twins_by_neighbours(groups, m.mapping, callees_a, callers_a, callees_b, callers_b, _TWIN_SCORING_LIMIT,
                          lambda a, b: m.pair(a, b, "callgraph"))


def _twins_by_gap(m: _Matcher, groups: list[tuple[list[int], list[int]]]) -> None:
    mapping = m.mapping
    anchors = m.anchors()
    if not anchors:
        return
    for left, right in groups:
        by_gap_a: dict[tuple[int, int], list[int]] = defaultdict(list)
        for a in left:
            index = bisect_left(anchors, a)
            if 0 < index < len(anchors):
                by_gap_a[(mapping[anchors[index - 1]], mapping[anchors[index]])].append(a)
        for (low, high), twins_a in by_gap_a.items():
            # ``right`` is in table order (by RVA): the twins strictly between low and high are one slice of it
            twins_b = right[bisect_right(right, low):bisect_left(right, high)]
            if len(twins_a) == len(twins_b):
                for a, b in zip(twins_a, twins_b):
                    m.pair(a, b, "fingerprint")


def _by_fingerprint_groups(m: _Matcher) -> None:
    """Identical functions present as often on both sides (template copies): paired in address order."""
    for rvas, other in _twin_groups(m):
        if len(rvas) == len(other):
            for a, b in zip(rvas, other):
                m.pair(a, b, "fingerprint")


def _by_similarity(m: _Matcher) -> None:
    """Best-scoring pairs among the nearest candidates by size and by place (bounded work per function).

    By size alone, every function of a common size would see the same few
    candidates (the first ones of that size); for those, the nearest to
    where the function should be (after the counterpart of the matched
    function before it) are candidates too.
    """
    left = m.unmatched_baseline()
    right = m.unmatched_patched()
    if not left or not right:
        return
    count_a = {f.rva: m.baseline.analysis_of(f).instruction_count for f in left}
    right_sorted = sorted(right, key=lambda f: m.patched.analysis_of(f).instruction_count)
    counts_b = [m.patched.analysis_of(f).instruction_count for f in right_sorted]
    by_place = sorted(right, key=lambda f: f.rva)
    places_b = [f.rva for f in by_place]
    anchors = m.anchors()
    scored: list[tuple[float, int, int]] = []
    for fa in left:
        na = count_a[fa.rva]
        if not na:
            continue
        middle = bisect_left(counts_b, na)
        candidates = right_sorted[max(0, middle - SIMILARITY_CANDIDATES):middle + SIMILARITY_CANDIDATES]
        index = bisect_left(anchors, fa.rva) - 1
        crowded = bisect_left(counts_b, na + 1) - middle > SIMILARITY_CANDIDATES  # more of this size than seen
        if crowded and index >= 0:
            expected = m.forward[anchors[index]].patched_rva + fa.rva - anchors[index]
            near = bisect_left(places_b, expected)
            candidates = [*candidates, *by_place[max(0, near - SIMILARITY_CANDIDATES):near + SIMILARITY_CANDIDATES]]
        for fb in dict.fromkeys(candidates):
            nb = m.patched.analysis_of(fb).instruction_count
            if not nb or max(na, nb) > 2 * min(na, nb):
                continue
            score = m.streams.similarity(fa, fb, SIMILARITY_THRESHOLD, MAX_RATIO_WORK)
            if score >= SIMILARITY_THRESHOLD:
                scored.append((score, fa.rva, fb.rva))
    for score, a, b in sorted(scored, key=lambda s: (-s[0], s[1], s[2])):
        m.pair(a, b, "similarity", round(score, 4))
