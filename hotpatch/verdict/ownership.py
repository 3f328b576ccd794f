"""Changes of who owns heap memory kept in objects' fields, seen in the code of changed functions.

A fix can keep every layout and datum and still change the meaning of objects
a running process holds: CVE-2026-33416 makes ``png_struct.trans_alpha`` a
private copy instead of an alias of ``png_info``'s buffer, and frees it in new
places. An object set up by the old code and freed by the new one is freed
twice. A hotpatch cannot convert the objects already alive, so such a change
needs a new baseline.

The evidence read here, per changed function and for both its versions: which
fields (the displacement of ``[reg+disp]``) hold a pointer that is passed to a
deallocator, and, for each allocation, which fields its result is stored into.
A field freed by one version and not the other, or an allocation stored into a
set of fields no allocation of the other version fills (two fields that shared
one buffer now get one each), is an ``OwnershipChange``.

Allocators and deallocators are the C runtime's and Win32's by import name, and
the image's own small wrappers around them (``png_malloc``, ``png_free``): a
function of at most ``_WRAPPER_BYTES`` bytes that calls or jumps to one. The
scan is linear and per register (a value loaded from a field, or an
allocation's result, followed through register moves until the register is
written or a call clobbers it), which is enough for the pattern the compiler
emits for ``free(obj->field)`` and ``obj->field = malloc(n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86_const as x86

from ..analysis.functions import Function, FunctionTable
from ..analysis.refkinds import BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP
from ..memo import cache_of
from ..x86 import disassembler

__all__ = ["OwnershipChange", "ownership_changes", "ownership_evidence"]

_ALLOCATORS = frozenset({
    "malloc", "calloc", "realloc", "_strdup", "strdup", "_wcsdup", "_aligned_malloc", "_aligned_realloc",
    "HeapAlloc", "HeapReAlloc", "LocalAlloc", "LocalReAlloc", "GlobalAlloc", "GlobalReAlloc", "CoTaskMemAlloc",
    "CoTaskMemRealloc", "??2@YAPEAX_K@Z", "??_U@YAPEAX_K@Z",
})
#: deallocators and the register holding the pointer they free
_DEALLOCATORS = {
    **dict.fromkeys(("free", "_aligned_free", "LocalFree", "GlobalFree", "CoTaskMemFree", "??3@YAXPEAX@Z",
                     "??_V@YAXPEAX@Z", "??3@YAXPEAX_K@Z", "??_V@YAXPEAX_K@Z"), x86.X86_REG_RCX),
    "HeapFree": x86.X86_REG_R8,
}
_CALLS = (CALL_REL32, BRANCH_REL32, IAT_CALL, IAT_JUMP)
#: a function this small that calls an allocator (deallocator) is taken for a wrapper around it
_WRAPPER_BYTES = 160
_WRAPPER_ROUNDS = 3
_VOLATILE = frozenset({x86.X86_REG_RAX, x86.X86_REG_RCX, x86.X86_REG_RDX, x86.X86_REG_R8, x86.X86_REG_R9,
                       x86.X86_REG_R10, x86.X86_REG_R11})
#: instructions decoded per function before the scan stops (what it found so far stands)
_SCAN_BUDGET = 20000
_ENDS = frozenset({x86.X86_INS_RET, x86.X86_INS_RETF, x86.X86_INS_INT3, x86.X86_INS_UD2, x86.X86_INS_HLT})
_ARGUMENTS = (x86.X86_REG_RCX, x86.X86_REG_RDX, x86.X86_REG_R8, x86.X86_REG_R9)


@dataclass(frozen=True)
class OwnershipEvidence:
    """What one function does with heap memory kept in fields."""

    #: field displacement -> RVA of a call that frees the pointer loaded from it
    frees: dict[int, int]
    #: the set of fields one allocation's result is stored into -> RVA of that allocation's call
    allocations: dict[frozenset[int], int]


@dataclass(frozen=True)
class OwnershipChange:
    """A changed function frees, or allocates into, fields its other version does not."""

    function: str
    field: int
    call_rva: int
    detail: str


def ownership_changes(baseline: FunctionTable, old: Function, patched: FunctionTable,
                      new: Function) -> list[OwnershipChange]:
    """Differences in the heap ownership of fields between the two versions of one function."""
    before, after = ownership_evidence(baseline, old), ownership_evidence(patched, new)
    label = old.label
    out = []
    for field_, site in sorted(after.frees.items()):
        if field_ not in before.frees:
            out.append(OwnershipChange(label, field_, site, f"{label} now frees the pointer in field +{field_:#x} "
                                                            f"(call at patched {site:#x})"))
    for field_, site in sorted(before.frees.items()):
        if field_ not in after.frees:
            out.append(OwnershipChange(label, field_, site, f"{label} no longer frees the pointer in field "
                                                            f"+{field_:#x} (call at baseline {site:#x})"))
    for fields, site in sorted(after.allocations.items(), key=lambda kv: kv[1]):
        if fields not in before.allocations:
            names = ", ".join(f"+{f:#x}" for f in sorted(fields))
            was = "; ".join("{" + ", ".join(f"+{f:#x}" for f in sorted(s)) + "}" for s in before.allocations) \
                or "none"
            out.append(OwnershipChange(label, min(fields), site,
                                       f"{label} stores one allocation (call at patched {site:#x}) into field(s) "
                                       f"{names}; before, allocations went into {was}"))
    return out


def ownership_evidence(table: FunctionTable, function: Function) -> OwnershipEvidence:
    allocators, deallocators = _heap_functions(table)
    if not _reaches_heap(table, function, allocators, deallocators):
        return OwnershipEvidence({}, {})  # no call or jump to an allocator or deallocator: nothing to find
    frees: dict[int, int] = {}
    allocations: dict[int, set[int]] = {}
    for tag, site in _scan(table, function, allocators, deallocators, {}, allocations):
        if tag[0] == "field":
            frees.setdefault(tag[1], site)
    return OwnershipEvidence(frees, {frozenset(fields): site for site, fields in allocations.items() if fields})


def _reaches_heap(table: FunctionTable, function: Function, allocators: frozenset[int],
                  deallocators: dict[int, int]) -> bool:
    """Whether a reference of the function's code designates an allocator or a deallocator (a function RVA,
    or an IAT slot, negated): ``_scan`` reports calls to nothing else, so without one it finds nothing."""
    for ref in table.analysis_of(function).raw_refs:
        target = ref[4]
        if target in allocators or target in deallocators or -target in allocators or -target in deallocators:
            return True
    return False


_Tag = tuple[str, int]  # ("field", displacement) | ("alloc", call RVA) | ("arg", register)
_Tags = dict[object, frozenset[_Tag]]  # register id or ("rsp", displacement) -> what it may hold


def _scan(table: FunctionTable, function: Function, allocators: frozenset[int], deallocators: dict[int, int],
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
    budget = _SCAN_BUDGET
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
                for register in _VOLATILE:
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
    if insn.id in _ENDS:
        return _Step(insn.size, ends=True)
    operands = insn.operands
    if insn.group(capstone.CS_GRP_JUMP):
        direct = len(operands) == 1 and operands[0].type == x86.X86_OP_IMM
        return _Step(insn.size, jump=int(operands[0].imm) if direct else -1,
                     unconditional=insn.id == x86.X86_INS_JMP)
    writes = tuple(_TO_64.get(r, r) for r in insn.regs_access()[1])
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


def _heap_functions(table: FunctionTable) -> tuple[frozenset[int], dict[int, int]]:
    """Allocators, and deallocators with the register their pointer is passed in: function RVAs, and IAT
    slots negated (``-rva``)."""
    memo = cache_of(table, "heap_functions")
    if "found" in memo:
        return memo["found"]
    image = table.image
    allocators = {-i.iat_rva for i in image.imports if i.name in _ALLOCATORS}
    deallocators = {-i.iat_rva: _DEALLOCATORS[i.name] for i in image.imports if i.name in _DEALLOCATORS}
    small = [(f, a) for f, a in zip(table.functions, table.analyses) if f.size <= _WRAPPER_BYTES]
    for _ in range(_WRAPPER_ROUNDS):
        grown = False
        for function, analysis in small:
            if function.rva in allocators or function.rva in deallocators:
                continue
            targets = {-t if kind in (IAT_CALL, IAT_JUMP) else t
                       for kind, _, _, _, t in analysis.raw_refs if kind in _CALLS}
            if targets & allocators:
                allocators.add(function.rva)
                grown = True
            elif targets & deallocators.keys():
                # which of its own arguments the wrapper hands on as the pointer to free
                entry: _Tags = {r: frozenset({("arg", r)}) for r in _ARGUMENTS}
                passed = {tag[1] for tag, _ in _scan(table, function, frozenset(allocators), deallocators, entry, {})
                          if tag[0] == "arg"}
                if len(passed) == 1:
                    deallocators[function.rva] = passed.pop()
                    grown = True
        if not grown:
            break
    found = (frozenset(allocators), deallocators)
    memo["found"] = found
    return found


_TO_64 = {
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
