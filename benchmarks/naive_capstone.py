"""The naive peer: capstone's Python binding over every .pdata function of a PE image.

Reads the exception directory by hand (struct, no PE library), disassembles each
RUNTIME_FUNCTION's range with ``disasm_lite`` and prints the function and
instruction counts as JSON. It finds no functions beyond .pdata, no padding, no
references, no fingerprints: far less work than ``hotpatch functions``.
Usage: ``python benchmarks/naive_capstone.py IMAGE``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import capstone


def _sections(data: bytes) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """The exception directory (RVA, size) and the section table (rva, virtual size, raw offset, raw size)."""
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    count, optional_size = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    optional = pe + 24
    exception_rva, exception_size = struct.unpack_from("<II", data, optional + 112 + 3 * 8)  # data directory 3
    table = optional + optional_size
    sections = []
    for i in range(count):
        vsize, rva, raw_size, raw_offset = struct.unpack_from("<IIII", data, table + 40 * i + 8)
        sections.append((rva, vsize, raw_offset, raw_size))
    return exception_rva, exception_size, sections


def _offset(sections: list[tuple[int, int, int, int]], rva: int) -> int:
    for start, vsize, raw_offset, raw_size in sections:
        if start <= rva < start + max(vsize, raw_size):
            return raw_offset + rva - start
    raise ValueError(f"RVA {rva:#x} is in no section")


def main(path: str) -> None:
    data = Path(path).read_bytes()
    exception_rva, exception_size, sections = _sections(data)
    base = _offset(sections, exception_rva)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    functions = instructions = 0
    for begin, end, _ in struct.iter_unpack("<III", data[base:base + exception_size - exception_size % 12]):
        if begin >= end:
            continue
        start = _offset(sections, begin)
        functions += 1
        instructions += sum(1 for _ in md.disasm_lite(data[start:start + end - begin], begin))
    print(json.dumps({"functions": functions, "instructions": instructions}))


if __name__ == "__main__":
    main(sys.argv[1])
