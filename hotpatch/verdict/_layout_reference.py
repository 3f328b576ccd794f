"""Pure-Python twin of ``hotpatch.verdict._layout``: the instruction pairs the layout check reads.

The token alignment of a changed function's two versions (``InstructionStreams.aligned_packed``) pairs
instructions that are equal but for their reference operands; those cannot show a moved field or a changed
allocation size. What lies between them, in the function's primary range, is decoded as text, its tokens
(displacements and immediates abstracted away) aligned again, and the pairs whose operand text differs are
what ``hotpatch.verdict.layout`` looks at. ``_layout.pyx`` finds the same pairs in C (the tests hold the two
equal); this one goes with the pure-Python analysis core and is the tests' oracle.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

from ..analysis.functions import Function, FunctionTable

__all__ = ["NUMBER", "DifferingPairs", "Insn", "abstracted", "contains"]

#: one decoded instruction: (rva, mnemonic, operand text)
Insn = tuple[int, str, str]
#: a number in capstone's operand text (a displacement or an immediate)
NUMBER = re.compile(r"\b(?:0x[0-9a-f]+|\d+)\b")


class DifferingPairs:
    """The pairs of one diff's changed functions, with the tokens' numbers shared between the calls."""

    def __init__(self, aligned_indices: Callable[[Any, Any], list[tuple[int, int]]]) -> None:
        #: the diff kernels' patience alignment (``aligned_indices``)
        self.aligned_indices = aligned_indices
        self.numbers = _TokenNumbers()

    def __call__(self, baseline: FunctionTable, fa: Function, patched: FunctionTable, fb: Function,
                 packed: Any) -> list[tuple[Insn, Insn]]:
        """Instructions of ``fa`` and ``fb`` the alignment ``packed`` (i0, j0, i1, j1, ...) left unpaired that the
        alignment of their tokens pairs, with different operand text, in order."""
        out = []
        for insns_a, insns_b in _differing_runs(baseline, fa, patched, fb, packed):
            tokens_a = array("I", [self.numbers.of(x) for x in insns_a])
            tokens_b = array("I", [self.numbers.of(x) for x in insns_b])
            for i, j in self.aligned_indices(tokens_a, tokens_b):
                if insns_a[i][2] != insns_b[j][2]:
                    out.append((insns_a[i], insns_b[j]))
        return out


def _differing_runs(baseline: FunctionTable, fa: Function, patched: FunctionTable, fb: Function,
                    packed: Any) -> Iterator[tuple[list[Insn], list[Insn]]]:
    """Decoded runs of instructions the alignment left unpaired, facing each other."""
    rvas_a = baseline.analysis_of(fa).insn_rvas
    rvas_b = patched.analysis_of(fb).insn_rvas
    previous_i = previous_j = -1
    flat = iter(packed)
    for i, j in chain(zip(flat, flat), ((len(rvas_a), len(rvas_b)),)):
        if i - previous_i > 1 and j - previous_j > 1:
            yield (_decoded(baseline, fa, rvas_a, previous_i + 1, i),
                   _decoded(patched, fb, rvas_b, previous_j + 1, j))
        previous_i, previous_j = i, j


def _decoded(table: FunctionTable, function: Function, rvas: Any, first: int, stop: int) -> list[Insn]:
    """Instructions ``first`` to ``stop`` (exclusive) of ``function`` that lie in its primary range."""
    inside = [k for k in range(first, stop) if function.rva <= rvas[k] < function.end_rva]
    if not inside:
        return []
    begin = rvas[inside[0]]
    end = rvas[inside[-1] + 1] if inside[-1] + 1 < len(rvas) else function.end_rva
    end = min(max(end, begin + 1), function.end_rva)
    return table.backend.instruction_text(table.image.memory, begin, end)  # type: ignore[no-any-return]


def contains(memory: bytes, needle: bytes) -> bool:
    """Whether ``needle`` occurs in ``memory`` (a whole image: the compiled twin is much faster at it)."""
    return needle in memory


def abstracted(operands: str) -> str:
    """Operand text with its displacements and immediates abstracted away."""
    return NUMBER.sub("#", operands)


def _token(insn: Insn) -> tuple[str, str]:
    return insn[1], abstracted(insn[2])


class _TokenNumbers:
    """Instructions' tokens as numbers, equal when the tokens are, for every changed function: the alignment
    only compares them, and most instructions recur, so each text is abstracted once."""

    __slots__ = ("by_text", "by_token")

    def __init__(self) -> None:
        self.by_text: dict[tuple[str, str], int] = {}
        self.by_token: dict[tuple[str, str], int] = {}

    def of(self, insn: Insn) -> int:
        text = insn[1], insn[2]
        found = self.by_text.get(text)
        if found is None:
            found = self.by_text[text] = self.by_token.setdefault(_token(insn), len(self.by_token))
        return found
