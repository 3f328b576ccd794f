"""Traces of a changed in-memory data layout in matched code.

A binary diff cannot see a structure definition, but it sees its shadow: when
a field is inserted, matched instructions that reach the fields behind it
through the same base register move their displacements by the same amount,
and the size passed to the allocator that creates the object changes. The
running process holds objects of the old layout; new code would read and
write past them. Stack frames (rsp/rbp) and RIP-relative operands are not
structures the process keeps, so they are left out.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import capstone

from .align import aligned_indices
from .functions import Function, FunctionTable, import_thunk_target
from .refkinds import CALL_REL32, IAT_CALL

if TYPE_CHECKING:
    from .diff import DiffResult

__all__ = ["LayoutEvidence", "find_layout_changes", "ALLOCATORS"]

ALLOCATORS = frozenset({
    "malloc", "calloc", "realloc", "_aligned_malloc", "_malloc_base", "_calloc_base", "_realloc_base",
    "heapalloc", "heaprealloc", "rtlallocateheap", "localalloc", "globalalloc", "virtualalloc",
    "??2@yapeax_k@z", "??_u@yapeax_k@z", "_znwm", "_znam", "_znwy", "_znay",
})
_FRAME_REGISTERS = {"rsp", "rbp", "esp", "ebp", "rip"}
_ARGUMENT_REGISTERS = {"rcx", "ecx", "rdx", "edx", "r8", "r8d"}
# capstone's Intel syntax: "qword ptr [rcx + rax*8 + 0x10]"; the decoder runs in lite mode (text only),
# about twenty times cheaper than building detail objects for every instruction of every changed function.
_MEMORY = re.compile(r"\[(?P<base>[a-z0-9]+)(?: \+ [a-z0-9]+\*\d)?(?: (?P<sign>[+-]) (?P<disp>0x[0-9a-f]+|\d+))?\]")
_NUMBER = re.compile(r"\b(?:0x[0-9a-f]+|\d+)\b")
#: how many instructions before an allocator call may set its size argument
_ALLOCATOR_WINDOW = 6


@dataclass(frozen=True)
class LayoutEvidence:
    function: str
    kind: str  # "displacement_shift" | "allocation_size"
    detail: str


def find_layout_changes(result: DiffResult) -> list[LayoutEvidence]:
    """Evidence across all changed functions: consistent displacement shifts, changed allocation sizes."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    shifts: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))  # delta -> disp -> functions
    evidence: list[LayoutEvidence] = []
    for entry in result.functions:
        if entry.status != "changed" or entry.baseline is None or entry.patched is None:
            continue
        name = entry.patched.label
        moved, sizes = _compare(md, result.baseline, entry.baseline, result.patched, entry.patched)
        for delta, displacement in moved:
            shifts[delta][displacement].add(name)
        evidence.extend(LayoutEvidence(name, "allocation_size", f"{name}: allocation size changed from "
                                       f"{old} to {new} bytes") for old, new in sizes)
    # Two fields moving together is a layout change; one is, when an allocation size changed too.
    needed = 1 if evidence else 2
    for delta, places in sorted(shifts.items()):
        if len(places) >= needed:
            names = sorted({n for functions in places.values() for n in functions})
            offsets = ", ".join(f"{d:#x}" for d in sorted(places))
            evidence.append(LayoutEvidence(", ".join(names), "displacement_shift",
                                           f"field offsets {offsets} moved by {delta:+d} in {', '.join(names)}"))
    return evidence


#: one decoded instruction: (rva, mnemonic, operand text)
Insn = tuple[int, str, str]


def _differing_instructions(md: capstone.Cs, table_a: FunctionTable, fa: Function, table_b: FunctionTable,
                            fb: Function) -> tuple[list[Insn], list[Insn]]:
    """Both functions' instructions, less the common prefix and suffix of byte-identical ones.

    Identical instructions cannot show a moved displacement or a changed size.
    """
    def raw(table: FunctionTable, function: Function) -> list[tuple[int, bytes]]:
        rvas = list(table.analysis_of(function).insn_rvas)
        memory = table.image.memory
        ends = rvas[1:] + [function.end_rva]
        return [(rva, memory[rva:end]) for rva, end in zip(rvas, ends) if function.rva <= rva < function.end_rva]

    raw_a, raw_b = raw(table_a, fa), raw(table_b, fb)
    prefix = 0
    while prefix < min(len(raw_a), len(raw_b)) and raw_a[prefix][1] == raw_b[prefix][1]:
        prefix += 1
    suffix = 0
    while suffix < min(len(raw_a), len(raw_b)) - prefix and raw_a[-1 - suffix][1] == raw_b[-1 - suffix][1]:
        suffix += 1

    def decoded(table: FunctionTable, items: list[tuple[int, bytes]]) -> list[Insn]:
        if not items:
            return []
        begin, end = items[0][0], items[-1][0] + len(items[-1][1])
        return [(rva, mnemonic, operands) for rva, _, mnemonic, operands
                in md.disasm_lite(table.image.read(begin, end - begin), begin)]

    return decoded(table_a, raw_a[prefix:len(raw_a) - suffix]), decoded(table_b, raw_b[prefix:len(raw_b) - suffix])


def _token(insn: Insn) -> tuple[str, str]:
    """The instruction with displacements and immediates abstracted away."""
    return insn[1], _NUMBER.sub("#", insn[2])


def _displacement(operands: str) -> tuple[str, int] | None:
    match = _MEMORY.search(operands)
    if match is None or match.group("base") in _FRAME_REGISTERS:
        return None
    text = match.group("disp")
    value = int(text, 0) if text else 0
    return match.group("base"), -value if match.group("sign") == "-" else value


def _compare(md: capstone.Cs, table_a: FunctionTable, fa: Function, table_b: FunctionTable,
             fb: Function) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(delta, old displacement) of moved structure fields, and (old, new) allocation sizes."""
    insns_a, insns_b = _differing_instructions(md, table_a, fa, table_b, fb)
    moved: list[tuple[int, int]] = []
    sizes: list[tuple[int, int]] = []
    allocator_calls_a = _allocator_calls(table_a, fa)
    allocator_calls_b = _allocator_calls(table_b, fb)
    for i, j in aligned_indices([_token(x) for x in insns_a], [_token(x) for x in insns_b]):
        ia, ib = insns_a[i], insns_b[j]
        if ia[2] == ib[2]:
            continue
        # lea computes with its "displacement" (x * 3 + 2); only real memory accesses reach fields
        old, new = (None, None) if ia[1] == "lea" else (_displacement(ia[2]), _displacement(ib[2]))
        if old is not None and new is not None and old[0] == new[0] and old[1] != new[1]:
            moved.append((new[1] - old[1], old[1]))
        size_a, size_b = _allocator_size(ia, allocator_calls_a), _allocator_size(ib, allocator_calls_b)
        if size_a is not None and size_b is not None and size_a != size_b:
            sizes.append((size_a, size_b))
    return moved, sizes


def _allocator_calls(table: FunctionTable, function: Function) -> set[int]:
    """RVAs of the calls in ``function`` that reach an allocator (directly or through an import thunk)."""
    image = table.image
    out = set()
    for kind, insn_rva, _, _, target in table.analysis_of(function).raw_refs:
        name = None
        if kind == IAT_CALL:
            imported = image.import_at(target)
            name = imported.name if imported else None
        elif kind == CALL_REL32 and table.at(target) is not None:
            label = import_thunk_target(table, table.at(target))  # type: ignore[arg-type]
            name = label.split("!", 1)[1] if label else None
        if name and name.lower() in ALLOCATORS:
            out.add(insn_rva)
    return out


def _allocator_size(insn: Insn, allocator_calls: set[int]) -> int | None:
    """The immediate of ``mov <first or second argument register>, imm`` shortly before an allocator call."""
    rva, mnemonic, operands = insn
    if mnemonic != "mov" or not any(0 < call - rva <= _ALLOCATOR_WINDOW * 15 for call in allocator_calls):
        return None
    dest, _, source = operands.partition(", ")
    if dest not in _ARGUMENT_REGISTERS or not _NUMBER.fullmatch(source):
        return None
    return int(source, 0)
