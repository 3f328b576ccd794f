"""The instruction streams of two images, as tokens comparable across both.

A token is an instruction's bytes with its reference operands zeroed, so code
that only moved (or whose targets moved) gives the same tokens. Tokens are
interned as small integers shared by both images of one diff; similarity and
alignment run on those arrays in the diff kernels (``hotpatch.diff._diffcore``,
or its Python twin ``_diffreference`` when the tables were analysed by the
Python reference).
"""

from __future__ import annotations

from array import array
from typing import Any

from ..analysis.api import diff_kernels
from ..analysis.functions import Function, FunctionTable

__all__ = ["InstructionStreams"]


class InstructionStreams:
    """Token arrays of the functions of a baseline and a patched table, and their alignments (cached)."""

    def __init__(self, baseline: FunctionTable, patched: FunctionTable) -> None:
        self.baseline = baseline
        self.patched = patched
        self.kernels: Any = diff_kernels(baseline.backend)
        #: token ids by masked bytes (a dict with the Python kernels, kept in C with the compiled ones)
        self._intern: Any = self.kernels.new_interner()
        self._tokens: tuple[dict[int, array], dict[int, array]] = ({}, {})
        #: (fa.rva, fb.rva) -> the alignment's i and j packed in one array (i0, j0, i1, j1, ...): a list of
        #: tuples costs about 60 bytes a pair, and a large diff aligns millions of instructions
        self._aligned: dict[tuple[int, int], array] = {}

    def tokens(self, table: FunctionTable, function: Function) -> array:
        cache = self._tokens[0 if table is self.baseline else 1]
        found = cache.get(function.rva)
        if found is None:
            analysis = table.analysis_of(function)
            found = cache[function.rva] = self.kernels.token_ids(
                table.image.memory, analysis.insn_rvas, function.end_rva, analysis.raw_refs, self._intern)
        return found

    def aligned(self, fa: Function, fb: Function) -> list[tuple[int, int]]:
        """(i, j): baseline instruction i corresponds to patched instruction j (equal tokens, patience order)."""
        packed = self.aligned_packed(fa, fb)
        return list(zip(packed[::2], packed[1::2]))

    def aligned_packed(self, fa: Function, fb: Function) -> array:
        """``aligned`` flat, as it is kept: i0, j0, i1, j1, ..."""
        key = (fa.rva, fb.rva)
        packed = self._aligned.get(key)
        if packed is None:
            packed = self._aligned[key] = self.kernels.aligned_packed(self.tokens(self.baseline, fa),
                                                                      self.tokens(self.patched, fb))
        return packed

    def similarity(self, fa: Function, fb: Function, threshold: float, max_ratio_work: int) -> float:
        """difflib's ratio of the two token streams, or -1.0 when it is surely below ``threshold``."""
        return self.kernels.similarity(self.tokens(self.baseline, fa), self.tokens(self.patched, fb),
                                       threshold, max_ratio_work)
