"""Pairing the references of matched functions, and judging whether a matched pair really changed.

A matched pair is changed when its code differs, or when what its calls,
imports, code references and read-only data reach no longer correspond.
``datadiff`` reads the data votes and the data items gathered here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import chain
from operator import attrgetter

from ..analysis.api import FunctionAnalysis
from ..analysis.functions import Function, FunctionTable
from .dataitems import DataItems, items_equal
from .matching import Match
from .result import ADDED, CHANGED, REMOVED, UNCHANGED, FunctionDiff
from .streams import InstructionStreams
from .targets import CODE, DATA, FUNCTION, IMPORT, OTHER, TargetClassifier

__all__ = ["Pairing"]


class Pairing:
    """Pairs the references of matched functions and judges whether they still mean the same."""

    def __init__(self, a: FunctionTable, b: FunctionTable, function_map: dict[int, int],
                 streams: InstructionStreams) -> None:
        self.a, self.b = a, b
        self.streams = streams
        self.function_map = function_map
        self.targets_a = TargetClassifier(a)
        self.targets_b = TargetClassifier(b)
        #: (baseline data rva, patched data rva) -> number of instruction pairs that say so; per source
        self.data_votes: dict[str, Counter[tuple[int, int]]] = {"unchanged": Counter(), "changed": Counter()}
        self._items: tuple[DataItems, DataItems] | None = None
        self._items_equal: dict[tuple[int, int], bool] = {}
        #: baseline data rva -> read-only data and no jump table (a pair of those is checked by content)
        self._read_only_a: dict[int, bool] = {}
        #: jump tables are compared through the fingerprint (targets relative to the function), not as bytes
        self.jump_tables_a = {t[1] for analysis in a.analyses for t in analysis.raw_tables}
        # what every pair's triage reads, looked up once
        self._triage = streams.kernels.triage_refs
        self._iat_a, self._iat_b = self.targets_a.iat, self.targets_b.iat
        self._data_a, self._data_b = self.targets_a.all_data_targets(), self.targets_b.all_data_targets()

    def items(self) -> tuple[DataItems, DataItems]:
        if self._items is None:
            self._items = (DataItems(self.a, self.targets_a, self.targets_a.all_data_targets()),
                           DataItems(self.b, self.targets_b, self.targets_b.all_data_targets()))
        return self._items

    def items_equal(self, rva_a: int, rva_b: int) -> bool:
        """``dataitems.items_equal`` of the two images' items (remembered: many functions read the same data)."""
        key = (rva_a, rva_b)
        found = self._items_equal.get(key)
        if found is None:
            items_a, items_b = self.items()
            found = self._items_equal[key] = items_equal(items_a, items_b, rva_a, rva_b, self.function_map)
        return found

    def classify(self, matches: dict[int, Match]) -> list[FunctionDiff]:
        out: list[FunctionDiff] = []
        rodata_checks: list[tuple[int, int, int]] = []  # (index in out, rva_a, rva_b)
        functions_a, analyses_a = self.a.functions, self.a.analyses
        functions_b, analyses_b, index_b = self.b.functions, self.b.analyses, self.b._index
        # each baseline function's match, and where its counterpart sits in the patched table (-1: none)
        matched = list(map(matches.get, map(_RVA, functions_a)))
        at_b = [-1 if match is None else index_b[match.patched_rva] for match in matched]
        # the data pairs that vote for equal code, in order: counted a block at a time (Counter.update a pair
        # at a time costs more than the counting; all at the end would keep every pair alive till then)
        unchanged_data: list[tuple[int, int]] = []
        unchanged_votes, known_read_only = self.data_votes["unchanged"], self._read_only_a
        for fa, analysis_a, at, match, found in zip(functions_a, analyses_a, at_b, matched,
                                                    chain.from_iterable(self._triaged(at_b))):
            if at < 0:
                out.append(FunctionDiff(REMOVED, fa, None))
                continue
            fb = functions_b[at]
            if found is None:  # equal code and nothing left to judge: most unchanged functions
                out.append(FunctionDiff(UNCHANGED, fa, fb, match.method, match.similarity))
                continue
            if found is _UNEQUAL_CODE:
                changes, rodata = self._compare(fa, fb, analysis_a, analyses_b[at], unchanged_data)
            elif not found[1]:  # equal code reading data alone (the next most common): only the data to check
                data = found[0]
                unchanged_data += data
                if len(unchanged_data) >= _VOTES_BLOCK:
                    unchanged_votes.update(unchanged_data)
                    unchanged_data.clear()
                for rva_a, rva_b in data:
                    read_only = known_read_only.get(rva_a)
                    if read_only is None:
                        read_only = self._is_read_only(rva_a)
                    if read_only:
                        rodata_checks.append((len(out), rva_a, rva_b))
                out.append(FunctionDiff(UNCHANGED, fa, fb, match.method, match.similarity))
                continue
            else:
                changes, rodata = self._judge(fa, fb, True, *found, unchanged_data)
            for rva_a, rva_b in rodata:
                rodata_checks.append((len(out), rva_a, rva_b))
            status = CHANGED if changes else UNCHANGED
            out.append(FunctionDiff(status, fa, fb, match.method, match.similarity, tuple(changes)))
        unchanged_votes.update(unchanged_data)
        if rodata_checks:
            known = self._items_equal
            for index, rva_a, rva_b in rodata_checks:
                entry = out[index]
                if "rodata" in entry.changes:
                    continue
                same = known.get((rva_a, rva_b))  # most are known: the call is made for the others alone
                if same or (same is None and self.items_equal(rva_a, rva_b)):
                    continue
                out[index] = FunctionDiff(CHANGED, entry.baseline, entry.patched, entry.match, entry.similarity,
                                          tuple(sorted(set(entry.changes) | {"rodata"})))
        matched_b = set(self.function_map.values())
        out.extend(FunctionDiff(ADDED, None, fb) for fb in self.b if fb.rva not in matched_b)
        return out

    def _triaged(self, at_b: list[int]) -> Iterator[list[object]]:
        """Per baseline function, in blocks: the triage of its references against its counterpart's when both
        have the same fingerprint (None: nothing left to judge), else ``_UNEQUAL_CODE``. A block of functions
        goes to the kernel in one call (which reads their fingerprints, ranges and references itself), without
        every pair's data pairs alive at once. Triage reads and writes nothing else, so doing it ahead changes
        no order."""
        kernels = self.streams.kernels
        functions_a, functions_b = self.a.functions, self.b.functions
        analyses_a, analyses_b = self.a.analyses, self.b.analyses
        rva_map = kernels.rva_map(self.function_map)
        for start in range(0, len(at_b), _TRIAGE_BLOCK):
            yield kernels.triage_block(functions_a, analyses_a, functions_b, analyses_b, at_b, start,
                                       min(start + _TRIAGE_BLOCK, len(at_b)), self._iat_a, self._iat_b,
                                       self.function_map, self._data_a, self._data_b, rva_map, _UNEQUAL_CODE)

    def ref_pairs(self, fa: Function, fb: Function) -> list[tuple[tuple, tuple]] | None:
        """Pairs of references that sit at the same place in matched instructions; None when the
        fingerprints are equal (then the references pair up in order)."""
        if fa.fingerprint == fb.fingerprint:
            return None
        analysis_a, analysis_b = self.a.analysis_of(fa), self.b.analysis_of(fb)
        return self.streams.kernels.ref_pairs(analysis_a.raw_refs, analysis_b.raw_refs, analysis_a.insn_rvas,
                                              analysis_b.insn_rvas, self.streams.aligned_packed(fa, fb))

    def _compare(self, fa: Function, fb: Function, analysis_a: FunctionAnalysis, analysis_b: FunctionAnalysis,
                 unchanged_data: list[tuple[int, int]]) -> tuple[list[str], list[tuple[int, int]]]:
        same_code = fa.fingerprint == fb.fingerprint
        # Calls to matched functions drop out, data on both sides comes back apart; with equal fingerprints
        # the branches inside the function and the imports are known to be the same and are left out too.
        # Pairs whose targets lie inside their own function on both sides drop out as well (``self`` both ways).
        data, rest = self._triage(analysis_a.raw_refs, analysis_b.raw_refs,
                                  None if same_code else self.ref_pairs(fa, fb), fa.ranges, fb.ranges,
                                  self._iat_a, self._iat_b, self.function_map, self._data_a, self._data_b)
        if same_code and not data and not rest:
            return [], []  # most unchanged functions: nothing left to judge
        return self._judge(fa, fb, same_code, data, rest, unchanged_data)

    def _judge(self, fa: Function, fb: Function, same_code: bool, data: list[tuple[int, int]],
               rest: list[tuple[tuple, tuple]],
               unchanged_data: list[tuple[int, int]]) -> tuple[list[str], list[tuple[int, int]]]:
        """The changes a pair's triaged references show, and its read-only data pairs to check (``data`` is
        extended in place; with equal code its pairs join ``unchanged_data``, the votes ``classify`` counts
        a block at a time, else they are counted as votes for changed code)."""
        changes: set[str] = set()
        if not same_code:
            changes.add("code")
        rodata: list[tuple[int, int]] = []
        function_map = self.function_map
        for ra, rb in rest:
            kind_a, value_a = self.targets_a.classify(fa, ra[4])
            kind_b, value_b = self.targets_b.classify(fb, rb[4])
            if kind_a != kind_b:
                changes.add("reference")
                continue
            if kind_a == FUNCTION:
                if function_map.get(value_a) != value_b:  # type: ignore[arg-type]
                    changes.add("call_target")
            elif kind_a == IMPORT:
                if value_a != value_b:
                    changes.add("import")
            elif kind_a == CODE:
                if not self._same_code_place(value_a, value_b):  # type: ignore[arg-type]
                    changes.add("reference")
            elif kind_a == DATA:
                data.append((value_a, value_b))  # type: ignore[arg-type]
            elif kind_a == OTHER and value_a != value_b:
                changes.add("reference")
        if same_code:
            unchanged_data += data
        else:
            self.data_votes["changed"].update(data)  # counted in C, in the same order as one by one
        read_only = self._read_only_a
        for pair in data:
            found = read_only.get(pair[0])
            if found is None:
                found = self._is_read_only(pair[0])
            if found:
                rodata.append(pair)
        return sorted(changes), rodata

    def _is_read_only(self, rva_a: int) -> bool:
        """Whether baseline data at ``rva_a`` is compared by content: read-only and no jump table (remembered:
        many pairs read the same data)."""
        found = rva_a not in self.jump_tables_a and not self.targets_a.is_writable_data(rva_a)
        self._read_only_a[rva_a] = found
        return found

    def _same_code_place(self, rva_a: int, rva_b: int, hops: int = 2) -> bool:
        """Code targets correspond when they sit at the same offset in (or after) matched functions.

        A ``jmp rel32`` on both sides (an entry of MSVC's incremental-link
        table, which no function need cover) corresponds when it leads to
        corresponding code: the table's order is the linker's, not the code's.
        """
        if hops and self.a.image.memory[rva_a:rva_a + 1] == b"\xe9" == self.b.image.memory[rva_b:rva_b + 1]:
            lead_a, lead_b = _jump_destination(self.a, rva_a), _jump_destination(self.b, rva_b)
            if self.function_map.get(lead_a) == lead_b:
                return True
            if lead_a not in self.function_map and self._same_code_place(lead_a, lead_b, hops - 1):
                return True
        owner_a = self.a.containing(rva_a) or self.a.preceding(rva_a)
        owner_b = self.b.containing(rva_b) or self.b.preceding(rva_b)
        if owner_a is None or owner_b is None:
            return False
        return self.function_map.get(owner_a.rva) == owner_b.rva and rva_a - owner_a.rva == rva_b - owner_b.rva


#: baseline functions triaged per kernel call
_TRIAGE_BLOCK = 2048
#: equal code's data votes counted per Counter.update call
_VOTES_BLOCK = 4096
#: ``Pairing._triaged``'s mark for a pair whose fingerprints differ (triaged on its own, after alignment)
_UNEQUAL_CODE = object()
_RVA = attrgetter("rva")


def _jump_destination(table: FunctionTable, rva: int) -> int:
    """Where the ``jmp rel32`` at ``rva`` goes."""
    return rva + 5 + int.from_bytes(table.image.memory[rva + 1:rva + 5], "little", signed=True)
