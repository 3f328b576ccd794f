"""Aligning two sequences (instruction tokens, callee lists) fast.

difflib's SequenceMatcher is quadratic in the worst case and dominated diff
time on large functions. Changed functions usually keep a long common prefix
and suffix, so those are peeled off first and only the middle goes to
SequenceMatcher; a middle too large to align in reasonable time is left
unaligned (no pairs), which only makes the diff more conservative.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from difflib import SequenceMatcher

__all__ = ["aligned_indices", "opcodes"]

#: above this many element comparisons the middle is not aligned
MAX_MIDDLE_WORK = 4_000_000


def _peel(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[int, int]:
    limit = min(len(a), len(b))
    prefix = 0
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]:
        suffix += 1
    return prefix, suffix


def opcodes(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[tuple[str, int, int, int, int]]:
    """SequenceMatcher-style opcodes ("equal", "replace", "delete", "insert") over the whole sequences."""
    prefix, suffix = _peel(a, b)
    out: list[tuple[str, int, int, int, int]] = []
    if prefix:
        out.append(("equal", 0, prefix, 0, prefix))
    mid_a, mid_b = a[prefix:len(a) - suffix], b[prefix:len(b) - suffix]
    if mid_a or mid_b:
        if len(mid_a) * len(mid_b) > MAX_MIDDLE_WORK:
            out.append(("replace", prefix, prefix + len(mid_a), prefix, prefix + len(mid_b)))
        else:
            matcher = SequenceMatcher(None, mid_a, mid_b, autojunk=False)
            for tag, a0, a1, b0, b1 in matcher.get_opcodes():
                out.append((tag, a0 + prefix, a1 + prefix, b0 + prefix, b1 + prefix))
    if suffix:
        out.append(("equal", len(a) - suffix, len(a), len(b) - suffix, len(b)))
    return out


def aligned_indices(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[tuple[int, int]]:
    """(i, j) for every element of ``a`` aligned with an equal element of ``b``."""
    pairs: list[tuple[int, int]] = []
    for tag, a0, a1, b0, _ in opcodes(a, b):
        if tag == "equal":
            pairs.extend(zip(range(a0, a1), range(b0, b0 + (a1 - a0))))
    return pairs
