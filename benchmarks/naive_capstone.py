"""The naive peer: capstone's Python binding over every .pdata function of a PE image.

Reads the exception directory by hand (struct, no PE library) and disassembles each
RUNTIME_FUNCTION's range, in one of two ways:

- ``detail`` (the default): what a researcher writes to get the facts ``hotpatch functions``
  reports: ``md.detail = True`` and ``md.disasm`` (CsInsn objects), reading each instruction's
  operands to count its references (rel branches and calls, RIP-relative memory operands).
- ``lite``: ``disasm_lite`` tuples, no operands and so no references: a lower bound on what
  capstone's Python binding costs at all.

It finds no functions beyond .pdata, no padding, no fingerprints: still less work than
``hotpatch functions``. Prints function, instruction and reference counts as JSON.
Usage: ``python benchmarks/naive_capstone.py IMAGE [detail|lite]``.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import capstone
from capstone import x86

MODES = ("detail", "lite")


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


def _functions(data: bytes) -> Iterator[tuple[int, bytes]]:
    exception_rva, exception_size, sections = _sections(data)
    base = _offset(sections, exception_rva)
    for begin, end, _ in struct.iter_unpack("<III", data[base:base + exception_size - exception_size % 12]):
        if begin < end:
            start = _offset(sections, begin)
            yield begin, data[start:start + end - begin]


def _references(insn: capstone.CsInsn) -> int:
    """References one instruction makes: a relative branch or call target, RIP-relative memory operands."""
    count = 0
    relative = insn.group(x86.X86_GRP_JUMP) or insn.group(x86.X86_GRP_CALL)
    for operand in insn.operands:
        if operand.type == x86.X86_OP_IMM and relative:
            count += 1
        elif operand.type == x86.X86_OP_MEM and operand.mem.base == x86.X86_REG_RIP:
            count += 1
    return count


def main(path: str, mode: str = "detail") -> None:
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}")
    data = Path(path).read_bytes()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = mode == "detail"
    functions = instructions = references = 0
    for begin, code in _functions(data):
        functions += 1
        if mode == "lite":
            instructions += sum(1 for _ in md.disasm_lite(code, begin))
            continue
        for insn in md.disasm(code, begin):
            instructions += 1
            references += _references(insn)
    print(json.dumps({"mode": mode, "functions": functions, "instructions": instructions,
                      "references": references if mode == "detail" else None}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
