"""Pure-Python twin of ``hotpatch.verdict._ownership``: the ownership scan of one function.

``_ownership.pyx`` runs exactly the same scan over capstone's C API (the tests
check that both give identical evidence); this one is used when the tables were
analysed by the pure-Python core, and is the oracle of the tests. The scan is
linear and per register (a value loaded from a field, or an allocation's result,
followed through register moves until the register is written or a call
clobbers it), following the function's control flow with what each location may
hold merged where paths meet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..analysis.api import x86_numbers
from ..analysis.functions import Function, FunctionTable
from ..x86 import disassembler

if TYPE_CHECKING:
    import capstone

__all__ = ["ENDS", "SCAN_BUDGET", "TO_64", "VOLATILE", "call_targets", "reaches", "scan", "small_callers"]

x86 = x86_numbers()  # capstone's numbers; its binding is imported only when this scan decodes

VOLATILE = (x86.X86_REG_RAX, x86.X86_REG_RCX, x86.X86_REG_RDX, x86.X86_REG_R8, x86.X86_REG_R9,
            x86.X86_REG_R10, x86.X86_REG_R11)
#: instructions decoded per function before the scan stops (what it found so far stands)
SCAN_BUDGET = 20000
ENDS = frozenset({x86.X86_INS_RET, x86.X86_INS_RETF, x86.X86_INS_INT3, x86.X86_INS_UD2, x86.X86_INS_HLT})


def call_targets(refs: Iterable[tuple[int, int, int, int, int]], calls: frozenset[int],
                 through_iat: frozenset[int]) -> set[int]:
    """The targets of the references of kind ``calls``; those of kind ``through_iat`` are IAT slots, negated."""
    return {-t if kind in through_iat else t for kind, _, _, _, t in refs if kind in calls}


def reaches(refs: Iterable[tuple[int, int, int, int, int]], targets: frozenset[int]) -> bool:
    """Whether a reference's target is one of ``targets``."""
    return any(ref[4] in targets for ref in refs)


def small_callers(functions: Iterable[Function], analyses: Iterable[Any], max_bytes: int, calls: frozenset[int],
                  through_iat: frozenset[int]) -> tuple[list[tuple[Function, set[int]]], dict[int, list[int]]]:
    """The functions of at most ``max_bytes`` bytes that call or jump somewhere, with the targets (as
    ``call_targets``), and per target the indices into that list of the ones reaching it, in order."""
    small = [(f, targets) for f, a in zip(functions, analyses) if f.size <= max_bytes
             if (targets := call_targets(a.raw_refs, calls, through_iat))]
    callers: dict[int, list[int]] = {}
    for index, (_, targets) in enumerate(small):
        for target in targets:
            callers.setdefault(target, []).append(index)
    return small, callers


_Tag = tuple[str, int]  # ("field", displacement) | ("alloc", call RVA) | ("arg", register)
_Tags = dict[object, frozenset[_Tag]]  # register id or ("rsp", displacement) -> what it may hold


def scan(table: FunctionTable, function: Function, allocators: frozenset[int], deallocators: dict[int, int],
         entry: _Tags, allocations: dict[int, set[int]]) -> list[tuple[_Tag, int]]:
    """The tags of the pointers passed to deallocators, with the call's RVA; ``allocations`` gets, per allocation
    call, the fields its result is stored into.

    Follows the function's control flow (a value loaded before a loop may be freed by code placed before
    the load), merging what each register may hold where paths meet, until nothing new reaches any
    instruction (or the budget runs out).
    """
    frees: set[tuple[_Tag, int]] = set()
    inside = function.ranges
    switch_targets = [t for jump_table in table.analysis_of(function).raw_tables for t in jump_table[3]]
    seen: dict[int, set[tuple[object, _Tag]]] = {}
    work: list[tuple[int, _Tags]] = [(function.rva, dict(entry))]
    # Instructions summarised for this scan only (loops revisit them): capstone's objects with their detail
    # (about 2 KB each) are dropped as soon as their summary is made.
    steps: dict[int, _Step | None] = {}
    md = disassembler(detail=True)
    memory = table.image.memory
    budget = SCAN_BUDGET
    while work and budget > 0:
        rva, tags = work.pop()
        while budget > 0:
            budget -= 1
            known = seen.setdefault(rva, set())
            pairs = {(loc, tag) for loc, held in tags.items() for tag in held}
            if known and pairs <= known:
                break
            if known - pairs:  # what other paths brought here joins this one
                known |= pairs
                tags = {}
                for loc, tag in known:
                    tags[loc] = tags.get(loc, frozenset()) | {tag}
            else:
                known |= pairs
            if not any(b <= rva < e for b, e in inside):
                break
            if rva in steps:
                step = steps[rva]
            else:
                insn = next(md.disasm(memory[rva:rva + 16], rva, 1), None)
                step = steps[rva] = _summarise(insn, allocators, deallocators) if insn is not None else None
            if step is None:
                break
            if step.call is not None:
                kind, target, is_call = step.call
                if kind == "free" and target is not None:
                    frees.update((tag, rva) for tag in tags.get(deallocators[target], ()))
                for register in VOLATILE:
                    tags.pop(register, None)
                if kind == "alloc" and is_call:
                    tags[x86.X86_REG_RAX] = frozenset({("alloc", rva)})
                    allocations.setdefault(rva, set())
                if not is_call:
                    break  # a tail jump
            elif step.ends:
                break
            elif step.jump is not None:
                targets = [step.jump] if step.jump >= 0 else switch_targets
                work.extend((t, dict(tags)) for t in targets if any(b <= t < e for b, e in inside))
                if step.unconditional:
                    break
            else:
                _track(step, tags, allocations)
            rva += step.size
    return sorted(frees, key=lambda item: item[1])


@dataclass(frozen=True, slots=True)
class _Step:
    """What the scan needs of one instruction, read once from capstone's detail."""

    size: int
    #: (kind, target, is a call) for a call or jump to a known or unknown function
    call: tuple[str, int | None, bool] | None = None
    ends: bool = False
    #: a jump's target (-1: through a table), and whether it never falls through
    jump: int | None = None
    unconditional: bool = False
    #: the 64-bit move's shape: "spill" (slot <- reg), "store" (field <- reg), "load" (reg <- slot or field),
    #: "move" (reg <- reg), or None for any other instruction
    move: str | None = None
    register: int = 0  # the move's register operand (source of spill/store/move, target of load)
    source: int = 0  # move: the source register
    slot: tuple[str, int] | None = None  # a stack slot read or written
    field: int | None = None  # a field displacement read or written
    writes: tuple[int, ...] = ()  # 64-bit registers the instruction writes


def _summarise(insn: capstone.CsInsn, allocators: frozenset[int], deallocators: dict[int, int]) -> _Step:
    kind, target = _call_kind(insn, allocators, deallocators)
    if kind is not None:
        return _Step(insn.size, call=(kind, target, insn.id == x86.X86_INS_CALL))
    if insn.id in ENDS:
        return _Step(insn.size, ends=True)
    operands = insn.operands
    if insn.group(x86.X86_GRP_JUMP):
        direct = len(operands) == 1 and operands[0].type == x86.X86_OP_IMM
        return _Step(insn.size, jump=int(operands[0].imm) if direct else -1,
                     unconditional=insn.id == x86.X86_INS_JMP)
    writes = tuple(TO_64.get(r, r) for r in insn.regs_access()[1])
    if insn.id == x86.X86_INS_MOV and len(operands) == 2 and operands[0].size == 8:
        target_op, source = operands
        if target_op.type == x86.X86_OP_MEM and source.type == x86.X86_OP_REG:
            slot = _slot(target_op)
            if slot is not None:
                return _Step(insn.size, move="spill", register=source.reg, slot=slot, writes=writes)
            return _Step(insn.size, move="store", register=source.reg, field=_field(target_op), writes=writes)
        if target_op.type == x86.X86_OP_REG and source.type == x86.X86_OP_MEM:
            return _Step(insn.size, move="load", register=target_op.reg, slot=_slot(source), field=_field(source),
                         writes=writes)
        if target_op.type == x86.X86_OP_REG and source.type == x86.X86_OP_REG:
            return _Step(insn.size, move="move", register=target_op.reg, source=source.reg, writes=writes)
    slot = _slot(operands[0]) if len(operands) >= 1 and operands[0].type == x86.X86_OP_MEM else None
    return _Step(insn.size, slot=slot, writes=writes)


def _track(step: _Step, tags: _Tags, allocations: dict[int, set[int]]) -> None:
    if step.move == "spill":  # the value comes back with its tags
        held = tags.get(step.register, frozenset())
        tags.pop(step.slot, None)
        if held:
            tags[step.slot] = held
        return
    if step.move == "store":
        if step.field is not None:
            for kind, site in tags.get(step.register, frozenset()):
                if kind == "alloc":
                    allocations[site].add(step.field)
        return
    if step.move == "load":
        _written(step, tags)
        if step.slot is not None and step.slot in tags:
            tags[step.register] = tags[step.slot]
        elif step.field is not None:
            tags[step.register] = frozenset({("field", step.field)})
        return
    if step.move == "move":
        held = tags.get(step.source)
        _written(step, tags)
        if held:
            tags[step.register] = held
        return
    if step.slot is not None:
        tags.pop(step.slot, None)
    _written(step, tags)


def _written(step: _Step, tags: _Tags) -> None:
    for register in step.writes:  # a write to a part of a register ends its tag
        tags.pop(register, None)


def _slot(operand: capstone.x86.X86Op) -> tuple[str, int] | None:
    mem = operand.mem
    return ("rsp", int(mem.disp)) if mem.base == x86.X86_REG_RSP and mem.index == 0 else None


def _field(operand: capstone.x86.X86Op) -> int | None:
    """The displacement of ``[base+disp]`` when it addresses a field of an object (not the stack or the image)."""
    mem = operand.mem
    if mem.base in (0, x86.X86_REG_RSP, x86.X86_REG_RIP) or mem.index != 0:
        return None
    return int(mem.disp)


def _call_kind(insn: capstone.CsInsn, allocators: frozenset[int],
               deallocators: dict[int, int]) -> tuple[str | None, int | None]:
    """("alloc" | "free" | "call", target) for a call or a jump to an allocator or deallocator, else None."""
    if insn.id not in (x86.X86_INS_CALL, x86.X86_INS_JMP):
        return None, None
    operands = insn.operands
    target = None
    if len(operands) == 1 and operands[0].type == x86.X86_OP_IMM:
        target = int(operands[0].imm)
    elif len(operands) == 1 and operands[0].type == x86.X86_OP_MEM and operands[0].mem.base == x86.X86_REG_RIP:
        target = -(insn.address + insn.size + int(operands[0].mem.disp))  # an IAT slot, negated
    if target in allocators:
        return "alloc", target
    if target in deallocators:
        return "free", target
    return ("call", target) if insn.id == x86.X86_INS_CALL else (None, None)



#: a part of a general register -> the whole 64-bit register (a write to a part ends the whole's tag)
TO_64 = {
    sub: full
    for full, subs in {
        x86.X86_REG_RAX: (x86.X86_REG_EAX, x86.X86_REG_AX, x86.X86_REG_AL, x86.X86_REG_AH),
        x86.X86_REG_RBX: (x86.X86_REG_EBX, x86.X86_REG_BX, x86.X86_REG_BL, x86.X86_REG_BH),
        x86.X86_REG_RCX: (x86.X86_REG_ECX, x86.X86_REG_CX, x86.X86_REG_CL, x86.X86_REG_CH),
        x86.X86_REG_RDX: (x86.X86_REG_EDX, x86.X86_REG_DX, x86.X86_REG_DL, x86.X86_REG_DH),
        x86.X86_REG_RSI: (x86.X86_REG_ESI, x86.X86_REG_SI, x86.X86_REG_SIL),
        x86.X86_REG_RDI: (x86.X86_REG_EDI, x86.X86_REG_DI, x86.X86_REG_DIL),
        x86.X86_REG_RBP: (x86.X86_REG_EBP, x86.X86_REG_BP, x86.X86_REG_BPL),
        **{getattr(x86, f"X86_REG_R{n}"): tuple(getattr(x86, f"X86_REG_R{n}{s}") for s in ("D", "W", "B"))
           for n in range(8, 16)},
    }.items()
    for sub in subs
}
