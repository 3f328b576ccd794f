"""Padding and fill between functions: the byte patterns, whether code follows padding, and how much of a
section functions cover. The usable padding runs next to each function (room for a short-jump redirect)
are measured by discovery's kernels (``_discovery.pyx`` and its twin ``_discovery_reference.py``)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..pe.image import Image, Section

__all__ = ["FILL_BYTES", "FILL_RE", "USABLE_PADDING_RE", "after_padding", "covered_bytes", "gap_fill_bytes"]

# Padding between functions: int3, nop and the multi-byte nops compilers emit
# for alignment (0F 1F /0 with their 66/2E prefixes, and 66 90).
_NOP = rb"(?:\xcc|\x90|\x66+\x90|\x66*\x2e?\x0f\x1f(?:\x00|\x40.|\x44\x00\x00|\x80....|\x84\x00....))"
USABLE_PADDING_RE = re.compile(_NOP + b"+", re.DOTALL)
#: for coverage, zero fill (section tails, alignment in data-in-code) is not code either
FILL_RE = re.compile(b"(?:" + _NOP + rb"|\x00)+", re.DOTALL)


def after_padding(memory: bytes, rva: int) -> bool:
    """Whether int3 or nop padding ends right before ``rva`` (a multi-byte nop's last byte is 00 or 40)."""
    return memory[rva - 1] in (0xCC, 0x90) or bool(USABLE_PADDING_RE.search(memory, max(0, rva - 9), rva)) and \
        any(match.end() == rva for match in USABLE_PADDING_RE.finditer(memory, max(0, rva - 9), rva))


#: single bytes that fill between functions: int3, nop, zero
FILL_BYTES = frozenset((0xCC, 0x90, 0x00))


def covered_bytes(ranges: Iterable[tuple[int, int]], section: Section) -> int:
    """Bytes of ``section`` inside the given function ranges."""
    total = 0
    limit = section.rva + section.virtual_size
    for begin, end in ranges:
        if begin < limit and end > section.rva:
            total += min(end, limit) - max(begin, section.rva)
    return total


def gap_fill_bytes(image: Image, ranges: Iterable[tuple[int, int]], section: Section) -> int:
    """Fill bytes (padding, zeros) lying outside every function range in ``section``."""
    spans = sorted(ranges)
    limit = section.rva + section.virtual_size
    fill = 0
    cursor = section.rva
    for begin, end in spans + [(limit, limit)]:
        if end <= section.rva or begin > limit:
            continue
        if begin > cursor:
            for match in FILL_RE.finditer(image.memory, cursor, min(begin, limit)):
                fill += match.end() - match.start()
        cursor = max(cursor, end)
    return fill
