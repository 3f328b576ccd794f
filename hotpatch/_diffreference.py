"""Pure-Python reference implementation of the diff kernels.

``hotpatch/_diffcore.pyx`` implements exactly the same three functions; this
module is the oracle the tests compare it with, and what the diff runs on
when the pure-Python analysis core is in use.

The contract (both implementations):

``token_ids(memory, insn_rvas, end_rva, refs, intern)``
    One token per instruction: its bytes (up to the next instruction, or to
    ``end_rva`` for the last one; one byte when that is not 1..15 bytes) with
    every reference operand zeroed, replaced by its id in ``intern`` (a dict
    shared by both images of a diff; a new token gets ``len(intern)``).
    Returns an ``array('I')``.

``similarity(a, b, threshold, max_ratio_work)``
    ``difflib.SequenceMatcher(None, a, b, autojunk=False)``: -1.0 when
    ``real_quick_ratio()`` or ``quick_ratio()`` is below ``threshold``, else
    ``ratio()``, or ``quick_ratio()`` when ``len(a) * len(b)`` exceeds
    ``max_ratio_work``.

``aligned_indices(a, b)``
    ``hotpatch.align.aligned_indices``: the patience alignment of two token
    streams as sorted ``(i, j)`` pairs.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from difflib import SequenceMatcher
from typing import Any

from .align import aligned_indices

__all__ = ["IMPLEMENTATION", "aligned_indices", "similarity", "token_ids"]

IMPLEMENTATION = "python"


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
