"""Registers a changed function writes that its old version left alone, and whether a caller relies on them.

GCC's interprocedural register allocation (-fipa-ra, on at -O2) lets a caller
keep a value in a volatile register across a call when it knows the callee
never writes that register. The running process's callers were compiled
against the *old* callee; if the new version writes a volatile register the
old one did not, those callers silently lose a value. (kpatch builds with
-fno-ipa-ra for this reason.) MSVC and LLVM do not allocate registers across
functions this way, so the check applies to GCC-built images only.

A new clobber matters only where old code that stays in the process reaches
the old function by a direct call or tail jump (a call through a pointer or
an import follows the ABI) and then reads the register before writing it:
``live_clobbers`` scans every path from each such return address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..analysis.api import x86_numbers
from ..analysis.functions import Function, FunctionTable
from ..analysis.refkinds import BRANCH_REL8, BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP
from ..memo import cache_of
from ..x86 import disassembler
from .layout import layout_kernels

if TYPE_CHECKING:
    import capstone

__all__ = ["ALL_VOLATILE", "LiveClobber", "decode_at", "gcc_built", "live_clobbers",
           "new_clobbers", "volatile_writes"]

x86 = x86_numbers()  # capstone's numbers; its binding is imported only when a GCC image's code is decoded here

_FAMILIES = {
    "rax": ("rax", "eax", "ax", "al", "ah"), "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"), "r8": ("r8", "r8d", "r8w", "r8b"), "r9": ("r9", "r9d", "r9w", "r9b"),
    "r10": ("r10", "r10d", "r10w", "r10b"), "r11": ("r11", "r11d", "r11w", "r11b"),
}
_FAMILY_OF = {alias: family for family, aliases in _FAMILIES.items() for alias in aliases}
#: a write to the 64- or 32-bit name replaces the whole register (32-bit writes zero the top half)
_WHOLE = frozenset(alias for aliases in _FAMILIES.values() for alias in aliases[:2])
#: what a call to code the compiler cannot see clobbers, by the Windows x64 convention
ALL_VOLATILE = frozenset(_FAMILIES)
#: registers a call may read as arguments
_ARGUMENTS = frozenset({"rcx", "rdx", "r8", "r9"})
#: instructions the liveness scan decodes per call site before it gives up and calls everything live
_SCAN_BUDGET = 4096
#: calls followed to see which argument registers the callee reads
_CALL_DEPTH = 2
#: tail jumps followed back to the callers of the function that made them
_TAIL_DEPTH = 3
_ZEROING = {x86.X86_INS_XOR, x86.X86_INS_SUB, x86.X86_INS_PXOR, x86.X86_INS_SBB}
_RETURNS = {x86.X86_INS_RET, x86.X86_INS_RETF}
_STOPS = {x86.X86_INS_INT3, x86.X86_INS_UD2, x86.X86_INS_HLT}


@dataclass(frozen=True)
class LiveClobber:
    """Old code that keeps ``register`` live across its call (or tail jump) at ``site_rva``."""

    caller: Function
    site_rva: int
    register: str


def gcc_built(table: FunctionTable) -> bool:
    """mingw-w64 GCC images: the .CRT section of its runtime, or its version string in the image (searched by
    the layout kernels' ``contains``: Python's own search is the slow part of an MSVC image's verdict)."""
    image = table.image
    return any(s.name == ".CRT" for s in image.sections) or layout_kernels(table).contains(image.memory, b"GCC: (")


def volatile_writes(table: FunctionTable, function: Function) -> frozenset[str]:
    """Volatile general registers the function may change before it returns (calls count as all)."""
    cache = cache_of(table, "volatile_writes")
    found = cache.get(function.rva)
    if found is None:
        found = cache[function.rva] = _volatile_writes(table, function)
    return found


def _volatile_writes(table: FunctionTable, function: Function) -> frozenset[str]:
    analysis = table.analysis_of(function)
    for kind, _, _, _, target in analysis.raw_refs:
        leaves = kind in (BRANCH_REL8, BRANCH_REL32) and not any(b <= target < e for b, e in function.ranges)
        if kind in (CALL_REL32, IAT_CALL, IAT_JUMP) or leaves:
            return ALL_VOLATILE
    md = disassembler(detail=True)
    written: set[str] = set()
    for begin, end in function.ranges:
        for insn in md.disasm(table.image.read(begin, end - begin), begin):
            if insn.id == x86.X86_INS_CALL:
                return ALL_VOLATILE
            _, writes = insn.regs_access()
            for register in writes:
                family = _FAMILY_OF.get(insn.reg_name(register))
                if family:
                    written.add(family)
    return frozenset(written)


def new_clobbers(baseline: FunctionTable, old: Function, patched: FunctionTable, new: Function) -> frozenset[str]:
    """Volatile registers the new version writes and the old one did not."""
    return volatile_writes(patched, new) - volatile_writes(baseline, old)


def live_clobbers(table: FunctionTable, callee: Function, registers: frozenset[str],
                  stays: Callable[[Function], bool]) -> list[LiveClobber]:
    """Where old code that ``stays`` in the process reads one of ``registers`` after reaching ``callee``.

    Only direct calls and tail jumps bind a caller to ``callee``'s register
    use. After a call the scan follows every path from the return address
    until the register is written, a return, or a call that clobbers it; a
    tail jump hands the question to the callers of the function that made it.
    """
    out: list[LiveClobber] = []
    seen: set[int] = set()
    _scan_callers(table, callee, registers, stays, out, seen, _TAIL_DEPTH)
    return out


def _scan_callers(table: FunctionTable, callee: Function, registers: frozenset[str],
                  stays: Callable[[Function], bool], out: list[LiveClobber], seen: set[int], depth: int) -> None:
    if callee.rva in seen:
        return
    seen.add(callee.rva)
    for caller, site, return_rva in _direct_sites(table, callee.rva):
        if not stays(caller):
            continue  # redirected by the same package: its old code is not entered again
        if return_rva is None:  # a tail jump: the caller's callers get the registers back
            if depth == 0:
                out.extend(LiveClobber(caller, site, r) for r in sorted(registers))
            else:
                _scan_callers(table, caller, registers, stays, out, seen, depth - 1)
            continue
        out.extend(LiveClobber(caller, site, r) for r in sorted(_live_after(table, caller, return_rva, registers)))


def _direct_sites(table: FunctionTable, callee_rva: int) -> list[tuple[Function, int, int | None]]:
    """(caller, instruction RVA, return RVA or None for a tail jump) of every direct call or jump to callee."""
    memo = cache_of(table, "direct_sites")
    sites = memo.get("all")
    if sites is None:
        sites = memo["all"] = {}
        for function, analysis in zip(table.functions, table.analyses):
            for kind, insn_rva, operand_offset, operand_size, target in analysis.raw_refs:
                if kind == CALL_REL32:
                    sites.setdefault(target, []).append((function, insn_rva, insn_rva + operand_offset + operand_size))
                elif kind in (BRANCH_REL8, BRANCH_REL32) and target != function.rva \
                        and not any(b <= target < e for b, e in function.ranges):
                    sites.setdefault(target, []).append((function, insn_rva, None))
    return [site for site in sites.get(callee_rva, ()) if site[0].rva != callee_rva]


def _live_after(table: FunctionTable, function: Function, start_rva: int, registers: frozenset[str],
                depth: int = _CALL_DEPTH) -> set[str]:
    """Which of ``registers`` some path from ``start_rva`` reads before writing them (conservative).

    At a direct call the argument registers count as read when the callee
    reads them before writing them (the same scan from its entry, ``depth``
    calls deep); at any other call they count as read.
    """
    live: set[str] = set()
    explored: dict[int, set[str]] = {}
    work: list[tuple[int, frozenset[str]]] = [(start_rva, registers)]
    budget = _SCAN_BUDGET
    inside = function.ranges
    table_targets = [t for jump_table in table.analysis_of(function).raw_tables for t in jump_table[3]]
    while work:
        rva, pending = work.pop()
        while pending - live:
            pending = pending - live
            done = explored.setdefault(rva, set())
            if pending <= done:
                break
            done |= pending
            budget -= 1
            insn = decode_at(table, rva) if any(b <= rva < e for b, e in inside) else None
            if insn is None or budget < 0:
                live |= pending  # left the function, undecodable, or too long to follow: assume the worst
                break
            reads, writes = _access(insn)
            live |= pending & reads
            pending = pending - writes
            next_rva = rva + insn.size
            if insn.id in _RETURNS:
                live |= pending & {"rax"}  # the value may be what this function returns
                break
            if insn.id in _STOPS:
                break
            if insn.id == x86.X86_INS_CALL:
                live |= _arguments_read(table, _direct_target(insn), pending, depth)
                pending = pending - _clobbered_by(table, insn)
                rva = next_rva
                continue
            if insn.group(x86.X86_GRP_JUMP):
                target = _direct_target(insn)
                conditional = insn.id != x86.X86_INS_JMP
                if target is None and _through_rip(insn):  # a tail jump through an import or a pointer
                    live |= pending & _ARGUMENTS
                    targets = []
                elif target is None:  # a switch: every table of the function is a superset of its targets
                    targets = table_targets
                    if not targets:
                        live |= pending
                        break
                elif any(b <= target < e for b, e in inside):
                    targets = [target]
                else:  # a tail jump: arguments and whatever the target leaves alone go back to our caller
                    live |= _arguments_read(table, target, pending, depth)
                    live |= pending - _clobbered_at(table, target)
                    targets = []
                work.extend((t, pending) for t in targets)
                if not conditional:
                    break
            rva = next_rva
    return live & registers


def _arguments_read(table: FunctionTable, target: int | None, pending: frozenset[str], depth: int) -> set[str]:
    """Which pending argument registers a call to ``target`` may read as its arguments."""
    arguments = pending & _ARGUMENTS
    callee = table.at(target) if target is not None and arguments else None
    if callee is None or depth == 0:
        return set(arguments)
    cache = cache_of(table, "arguments_read")
    key = (callee.rva, arguments, depth)
    if key not in cache:
        cache[key] = _live_after(table, callee, callee.rva, arguments, depth - 1)
    return set(cache[key])


def _clobbered_by(table: FunctionTable, insn: capstone.CsInsn) -> frozenset[str]:
    target = _direct_target(insn)
    return ALL_VOLATILE if target is None else _clobbered_at(table, target)


def _clobbered_at(table: FunctionTable, target: int) -> frozenset[str]:
    callee = table.at(target)
    return ALL_VOLATILE if callee is None else volatile_writes(table, callee)


def _direct_target(insn: capstone.CsInsn) -> int | None:
    operands = insn.operands
    if len(operands) == 1 and operands[0].type == x86.X86_OP_IMM:
        return int(operands[0].imm)
    return None


def _through_rip(insn: capstone.CsInsn) -> bool:
    operands = insn.operands
    return len(operands) == 1 and operands[0].type == x86.X86_OP_MEM and operands[0].mem.base == x86.X86_REG_RIP


def _access(insn: capstone.CsInsn) -> tuple[set[str], set[str]]:
    """Register families the instruction reads, and those it replaces whole."""
    read_ids, write_ids = insn.regs_access()
    reads = _families(insn, read_ids)
    writes = {_FAMILY_OF[name] for name in (insn.reg_name(r) for r in write_ids) if name in _WHOLE}
    operands = insn.operands
    if insn.id in _ZEROING and len(operands) == 2 and operands[0].type == operands[1].type == x86.X86_OP_REG \
            and operands[0].reg == operands[1].reg:
        reads -= _families(insn, [operands[0].reg])  # xor eax, eax does not depend on eax
    return reads, writes


def _families(insn: capstone.CsInsn, ids: Iterable[int]) -> set[str]:
    return {_FAMILY_OF[name] for name in (insn.reg_name(r) for r in ids) if name in _FAMILY_OF}


def decode_at(table: FunctionTable, rva: int) -> capstone.CsInsn | None:
    """The instruction at ``rva`` (with detail), decoded once per table."""
    cache = cache_of(table, "liveness_decode")
    if rva not in cache:
        cache[rva] = next(disassembler(detail=True).disasm(table.image.memory[rva:rva + 16], rva, 1), None)
    return cache[rva]


