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

from collections import defaultdict
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import TYPE_CHECKING

import capstone
from capstone import x86_const as x86

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
_FRAME_REGISTERS = {x86.X86_REG_RSP, x86.X86_REG_RBP, x86.X86_REG_ESP, x86.X86_REG_EBP, x86.X86_REG_RIP, 0}
_ARGUMENT_REGISTERS = {x86.X86_REG_RCX, x86.X86_REG_ECX, x86.X86_REG_RDX, x86.X86_REG_EDX,
                       x86.X86_REG_R8, x86.X86_REG_R8D}
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
    md.detail = True
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


def _decode(md: capstone.Cs, table: FunctionTable, function: Function) -> list:
    code = table.image.read(function.rva, function.size)
    return list(md.disasm(code, function.rva))


def _token(insn: capstone.CsInsn) -> tuple:
    """The instruction with displacements and immediates abstracted away."""
    shape: list[object] = [insn.id]
    for op in insn.operands:
        if op.type == x86.X86_OP_REG:
            shape.append(("r", op.reg))
        elif op.type == x86.X86_OP_MEM:
            shape.append(("m", op.mem.base, op.mem.index, op.mem.scale, op.size))
        else:
            shape.append(("i", op.size))
    return tuple(shape)


def _compare(md: capstone.Cs, table_a: FunctionTable, fa: Function, table_b: FunctionTable,
             fb: Function) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(delta, old displacement) of moved structure fields, and (old, new) allocation sizes."""
    insns_a, insns_b = _decode(md, table_a, fa), _decode(md, table_b, fb)
    matcher = SequenceMatcher(None, [_token(i) for i in insns_a], [_token(i) for i in insns_b], autojunk=False)
    moved: list[tuple[int, int]] = []
    sizes: list[tuple[int, int]] = []
    allocator_calls_a = _allocator_calls(table_a, fa)
    allocator_calls_b = _allocator_calls(table_b, fb)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            ia, ib = insns_a[block.a + k], insns_b[block.b + k]
            for oa, ob in zip(ia.operands, ib.operands):
                if oa.type == x86.X86_OP_MEM and oa.mem.base not in _FRAME_REGISTERS and oa.mem.disp != ob.mem.disp:
                    moved.append((ob.mem.disp - oa.mem.disp, oa.mem.disp))
            if _sets_allocator_size(ia, allocator_calls_a) and _sets_allocator_size(ib, allocator_calls_b):
                old, new = ia.operands[1].imm, ib.operands[1].imm
                if old != new:
                    sizes.append((old, new))
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


def _sets_allocator_size(insn: capstone.CsInsn, allocator_calls: set[int]) -> bool:
    """``mov <first or second argument register>, imm`` shortly before an allocator call."""
    if insn.id != x86.X86_INS_MOV or len(insn.operands) != 2:
        return False
    dest, source = insn.operands
    if dest.type != x86.X86_OP_REG or dest.reg not in _ARGUMENT_REGISTERS or source.type != x86.X86_OP_IMM:
        return False
    return any(0 < call - insn.address <= _ALLOCATOR_WINDOW * 15 for call in allocator_calls)
