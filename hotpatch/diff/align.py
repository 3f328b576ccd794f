"""Aligning two sequences (instruction tokens, callee lists) fast.

difflib's SequenceMatcher is quadratic in the worst case and dominated diff
time on large functions. Changed functions usually keep a long common prefix
and suffix, so those are peeled off first and only the middle goes to
SequenceMatcher; a middle too large to align in reasonable time is left
unaligned (no pairs), which only makes the diff more conservative.

``aligned_indices`` is the pure-Python definition of the patience alignment;
the diff runs its compiled twin in ``hotpatch.diff._diffcore`` on token arrays.
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
    """(i, j) for elements of ``a`` aligned with equal elements of ``b`` (patience diff).

    Common prefix and suffix first; in between, elements that occur exactly
    once on each side anchor the alignment (their longest increasing run),
    and the gaps between anchors are aligned the same way. Small gaps without
    anchors fall back to SequenceMatcher. Near-linear on the long, mostly
    equal instruction streams of changed functions.
    """
    pairs: list[tuple[int, int]] = []
    _patience(a, b, 0, len(a), 0, len(b), pairs)
    pairs.sort()
    return pairs


#: gaps without unique anchors up to this many comparisons go to SequenceMatcher
_SMALL_GAP = 20_000


def _patience(a: Sequence[Hashable], b: Sequence[Hashable], a0: int, a1: int, b0: int, b1: int,
              pairs: list[tuple[int, int]]) -> None:
    while a0 < a1 and b0 < b1 and a[a0] == b[b0]:
        pairs.append((a0, b0))
        a0, b0 = a0 + 1, b0 + 1
    while a0 < a1 and b0 < b1 and a[a1 - 1] == b[b1 - 1]:
        a1, b1 = a1 - 1, b1 - 1
        pairs.append((a1, b1))
    if a0 >= a1 or b0 >= b1:
        return
    count_a: dict[Hashable, int] = {}
    for i in range(a0, a1):
        count_a[a[i]] = count_a.get(a[i], 0) + 1
    position_b: dict[Hashable, int] = {}
    count_b: dict[Hashable, int] = {}
    for j in range(b0, b1):
        count_b[b[j]] = count_b.get(b[j], 0) + 1
        position_b[b[j]] = j
    candidates = [(i, position_b[a[i]]) for i in range(a0, a1)
                  if count_a[a[i]] == 1 and count_b.get(a[i]) == 1]
    anchors = _longest_increasing(candidates)
    if not anchors:
        if (a1 - a0) * (b1 - b0) <= _SMALL_GAP:
            for block in SequenceMatcher(None, a[a0:a1], b[b0:b1], autojunk=False).get_matching_blocks():
                pairs.extend((a0 + block.a + k, b0 + block.b + k) for k in range(block.size))
        return
    previous_i, previous_j = a0, b0
    for i, j in anchors:
        _patience(a, b, previous_i, i, previous_j, j, pairs)
        pairs.append((i, j))
        previous_i, previous_j = i + 1, j + 1
    _patience(a, b, previous_i, a1, previous_j, b1, pairs)


def _longest_increasing(candidates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest run of ``candidates`` (sorted by i) whose j increases too."""
    from bisect import bisect_left

    tails: list[int] = []  # smallest j ending a run of each length
    tail_index: list[int] = []
    previous: list[int] = []
    for index, (_, j) in enumerate(candidates):
        length = bisect_left(tails, j)
        if length == len(tails):
            tails.append(j)
            tail_index.append(index)
        else:
            tails[length] = j
            tail_index[length] = index
        previous.append(tail_index[length - 1] if length else -1)
    run = []
    index = tail_index[-1] if tail_index else -1
    while index >= 0:
        run.append(candidates[index])
        index = previous[index]
    return run[::-1]
