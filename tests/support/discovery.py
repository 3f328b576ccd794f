"""Random inputs shared by the tests of discovery's kernels and of its incremental layout."""

from __future__ import annotations

import random

#: bytes that make up int3/nop padding and fill, so random soup is full of runs, partial nops and near misses
ALPHABET = bytes((0xCC, 0x90, 0x66, 0x2E, 0x0F, 0x1F, 0x00, 0x40, 0x44, 0x80, 0x84, 0xC3, 0x48, 0xE9))


def padding_soup(rng: random.Random, size: int) -> bytes:
    """``size`` bytes, nine in ten drawn from ``ALPHABET``."""
    return bytes(rng.choice(ALPHABET) if rng.random() < 0.9 else rng.randrange(256) for _ in range(size))
