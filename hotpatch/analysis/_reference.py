"""Pure-Python reference implementation of the analysis core.

``hotpatch/analysis/_core.pyx`` (with ``_decode.pyx``) implements exactly the same functions against
capstone's C API; this module is the oracle the tests compare it with, and
the fallback only when ``HOTPATCH_PURE_PYTHON=1`` asks for it.

The contract (both implementations):

``decode(ctx, items, cls=None)``
    ``items`` is a list of ``(rva, ranges)``; ``ranges`` a tuple of
    ``(begin_rva, end_rva)``. Each range is swept linearly; a byte capstone
    cannot decode is skipped. Returns, per item, ``(insn_rvas, refs, tables)``:
    ``insn_rvas`` an ``array('I')``; ``refs`` a list of
    ``(kind, insn_rva, operand_offset, operand_size, target_rva)`` in
    instruction order (within one instruction: branch or RIP operand, then
    jump-table records, then relocations by address); ``tables`` a list of
    ``(insn_rva, table_rva, entry_kind, targets)``. With ``cls`` (``api.FunctionAnalysis``),
    each is instead a ``cls`` object of ``(rva, ranges, insn_rvas, refs, tables, "")``, its slots filled
    without its ``__init__`` (the compiled core builds them in C).

``fingerprint(ctx, rva, ranges, refs, tables, function_starts)``
    BLAKE2b-128 (hex) of the function's bytes with every reference operand
    zeroed, then ``b"|"``, then per reference ``bytes([kind]) + descriptor +
    b";"`` where the descriptor names what the target *is* (see
    ``describe``), never where it is. ``fingerprint_many(ctx, items,
    function_starts)`` gives it for each ``(rva, ranges, refs, tables)``;
    ``fingerprinted(ctx, analyses, function_starts, cls)`` gives copies of ``cls`` objects with it.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_left
from typing import Any

import capstone
from capstone import x86_const as x86

from ..x86 import disassembler
from .flow import is_nop, terminates
from .refkinds import (
    ABS64,
    BRANCH_REL8,
    BRANCH_REL32,
    CALL_REL32,
    IAT_CALL,
    IAT_JUMP,
    IMAGE_REL32,
    JUMP_TABLE,
    MAX_TABLE_ENTRIES,
    RIP_RELATIVE,
    TABLE_IMAGE_REL32,
    TABLE_SELF_REL32,
)

__all__ = ["decode", "fingerprint", "fingerprint_many", "fingerprinted", "instruction_text", "IMPLEMENTATION"]

#: a FunctionAnalysis's slots in field order, the order ``_made`` takes the values in
_FIELDS = ("rva", "ranges", "insn_rvas", "raw_refs", "raw_tables", "fingerprint")

IMPLEMENTATION = "python"

_GRP_JUMP = capstone.CS_GRP_JUMP
_GRP_CALL = capstone.CS_GRP_CALL
_GRP_BRANCH_RELATIVE = capstone.CS_GRP_BRANCH_RELATIVE


def instruction_text(memory: bytes, begin: int, end: int) -> list[tuple[int, str, str]]:
    end = min(end, len(memory))
    if begin < 0 or begin >= end:
        return []
    return [(rva, mnemonic, operands) for rva, _, mnemonic, operands
            in disassembler().disasm_lite(memory[begin:end], begin)]


def decode(ctx: Any, items: list[tuple[int, tuple[tuple[int, int], ...]]], cls: Any = None) -> list[Any]:
    md = disassembler(detail=True)
    decoded = [_decode_one(md, ctx, ranges) for _, ranges in items]
    if cls is None:
        return decoded
    return [_made(cls, rva, ranges, *parts, "") for (rva, ranges), parts in zip(items, decoded)]


def _made(cls: Any, *values: Any) -> Any:
    """A ``cls`` object of ``values`` by ``_FIELDS``, its slots set as the compiled core sets them."""
    if getattr(cls, "__slots__", None) != _FIELDS:
        raise TypeError(f"{cls!r} is not a class with the slots {_FIELDS}")
    made = object.__new__(cls)
    for name, value in zip(_FIELDS, values):
        cls.__dict__[name].__set__(made, value)
    return made


def _decode_one(md: capstone.Cs, ctx: Any, ranges: tuple[tuple[int, int], ...]) -> tuple[Any, list, list]:
    memory = ctx.memory
    relocations = ctx.relocations
    iat = ctx.iat
    insn_rvas = array("I")
    refs: list[tuple[int, int, int, int, int]] = []
    tables: list[tuple[int, int, int, tuple[int, ...]]] = []
    skips: list[tuple[int, int]] = []  # jump tables found ahead in this function: data, not code
    reads: set[int] = set()  # places inside the function its instructions read (not lea): data
    lea_targets: dict[int, int] = {}
    base_seen: set[int] = set()  # registers that held the image base earlier in the sweep
    last_cmp = -1
    for range_index, (begin, end) in enumerate(ranges):
        if range_index == 0 or begin != ranges[range_index - 1][1]:
            # a range that does not continue the last one starts with nothing known (see the compiled decoder)
            lea_targets, base_seen = {}, set()
            last_cmp = -1
        end = min(end, len(memory))
        offset = begin
        after_end = False  # the last instruction swept does not fall through
        while offset < end:
            offset = _past_data(skips, reads, refs, tables, offset, end, after_end)
            if offset >= end:
                break
            for insn in md.disasm(memory[offset:end], offset):
                rva = insn.address
                size = insn.size
                offset = rva + size
                insn_rvas.append(rva)
                if terminates(memory, rva, offset):
                    after_end = True
                elif not (after_end and is_nop(memory, rva, offset)):
                    after_end = False
                groups = insn.groups
                is_call = _GRP_CALL in groups
                if _GRP_BRANCH_RELATIVE in groups and insn.imm_offset and insn.imm_size in (1, 4):
                    target = insn.operands[0].imm
                    kind = BRANCH_REL8 if insn.imm_size == 1 else (CALL_REL32 if is_call else BRANCH_REL32)
                    refs.append((kind, rva, insn.imm_offset, insn.imm_size, target))
                elif insn.disp_offset:
                    for op in insn.operands:
                        if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                            target = rva + size + op.mem.disp
                            kind = RIP_RELATIVE
                            if target in iat:
                                kind = IAT_CALL if is_call else (IAT_JUMP if _GRP_JUMP in groups else RIP_RELATIVE)
                            # a RIP-relative displacement is always 32 bits; capstone 5 says 2 after a
                            # 66 prefix (movdqa xmm0, [rip+X] is 66 0F 6F 05 disp32)
                            refs.append((kind, rva, insn.disp_offset, 4, target))
                            if insn.id == x86.X86_INS_LEA:
                                lea_targets[insn.operands[0].reg] = target
                                if target == 0:
                                    base_seen.add(insn.operands[0].reg)
                            elif _in_ranges(target, ranges):
                                reads.add(target)
                            break
                        if op.type == x86.X86_OP_MEM and insn.disp_size == 4 \
                                and _image_base(lea_targets, base_seen, ranges, op.mem.base, op.mem.disp) \
                                and ctx.first_section_rva <= op.mem.disp < len(memory):
                            # MSVC addresses tables as [image base register + index + RVA]
                            refs.append((IMAGE_REL32, rva, insn.disp_offset, 4, op.mem.disp))
                            if insn.id != x86.X86_INS_LEA and _in_ranges(op.mem.disp, ranges):
                                reads.add(op.mem.disp)
                            break
                insn_id = insn.id
                if insn_id == x86.X86_INS_CMP:
                    ops = insn.operands
                    last_cmp = ops[1].imm if len(ops) == 2 and ops[0].type == x86.X86_OP_REG \
                        and ops[1].type == x86.X86_OP_IMM else -1
                elif insn_id == x86.X86_INS_MOVSXD or insn_id == x86.X86_INS_MOV:
                    found = len(tables)
                    _jump_table(ctx, insn, lea_targets, base_seen, last_cmp, ranges, refs, tables)
                    if len(tables) > found:
                        _skip_table(skips, tables[-1], rva, ranges, range_index)
                index = bisect_left(relocations, rva)
                while index < len(relocations) and relocations[index] < rva + size:
                    reloc = relocations[index]
                    value = struct.unpack_from("<Q", memory, reloc)[0] if reloc + 8 <= len(memory) else 0
                    refs.append((ABS64, rva, reloc - rva, 8, value - ctx.image_base))
                    index += 1
                if _past_data(skips, reads, refs, tables, offset, end, after_end) != offset:
                    break  # resume the sweep after the data
            else:
                if offset < end:
                    offset += 1  # capstone stopped on a byte it cannot decode: skip it and resume
                    after_end = False
    return insn_rvas, refs, tables


def _skip_table(skips: list[tuple[int, int]], table: tuple[int, int, int, tuple[int, ...]], rva: int,
                ranges: tuple[tuple[int, int], ...], range_index: int) -> None:
    """A table ahead of the instruction that reads it, inside the function's ranges (this one or one swept
    later), is not code (MSVC puts switch tables right after the function's code, in .pdata fragments too,
    and a leaf without .pdata runs over them)."""
    if not table[3]:
        return
    for index, (begin, end) in enumerate(ranges):
        if begin <= table[1] < end and (index > range_index or index == range_index and table[1] > rva):
            skips.append((table[1], table[1] + 4 * len(table[3])))
            return


def _past_data(skips: list[tuple[int, int]], reads: set[int], refs: list, tables: list, offset: int,
               end: int, after_end: bool) -> int:
    """``offset``, or past the data it lies at: jump tables ahead (they can follow each other), and a
    place the function reads that comes right after an instruction that does not fall through (MSVC's
    byte index tables of two-level switches), up to the next branch target ahead or the range end."""
    moved = True
    while moved:
        moved = False
        for begin, stop in skips:
            if begin <= offset < stop:
                offset, moved = stop, True
        if after_end and offset in reads and offset < end:
            offset, moved = _next_target(refs, tables, offset, end), True
    return offset


def _next_target(refs: list, tables: list, offset: int, end: int) -> int:
    """The first branch or jump-table target in ``(offset, end)``, else ``end``."""
    best = end
    for kind, _, _, _, target in refs:
        if (kind == BRANCH_REL8 or kind == BRANCH_REL32) and offset < target < best:
            best = target
    for table in tables:
        for target in table[3]:
            if offset < target < best:
                best = target
    return best


def _in_ranges(target: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(begin <= target < end for begin, end in ranges)


def _image_base(lea_targets: dict[int, int], base_seen: set[int], ranges: tuple[tuple[int, int], ...],
                reg: int, disp: int) -> bool:
    """Whether ``[reg + .. + disp]`` addresses from the image base: ``reg`` holds it now, or held it before and
    ``disp`` lies in the function (LLVM loads the base once; a linear sweep meets code reusing the register
    before the switch that reads through it)."""
    return lea_targets.get(reg) == 0 or reg in base_seen and _in_ranges(disp, ranges)


def _jump_table(ctx: Any, insn: Any, lea_targets: dict[int, int], base_seen: set[int], last_cmp: int,
                ranges: tuple[tuple[int, int], ...], refs: list, tables: list) -> None:
    """Recognise the indexed load of a switch: GCC (table-relative) or MSVC and LLVM (image-relative)."""
    ops = insn.operands
    if len(ops) != 2 or ops[1].type != x86.X86_OP_MEM:
        return
    mem = ops[1].mem
    if mem.index == 0 or mem.scale != 4:
        return
    if insn.id == x86.X86_INS_MOVSXD and mem.disp == 0 and mem.base in lea_targets:
        table, entry_kind = lea_targets[mem.base], TABLE_SELF_REL32
    elif insn.id == x86.X86_INS_MOV and mem.disp > 0 and ops[0].size == 4 \
            and _image_base(lea_targets, base_seen, ranges, mem.base, mem.disp):
        table, entry_kind = mem.disp, TABLE_IMAGE_REL32
    else:
        return
    targets = _table_targets(ctx, table, entry_kind, last_cmp, ranges)
    refs.append((JUMP_TABLE, insn.address, 0, 0, table))
    tables.append((insn.address, table, entry_kind, targets))


def _table_targets(ctx: Any, table: int, entry_kind: int, last_cmp: int,
                   ranges: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Entries of the table, up to the bounds check, while they land in the function.

    The bound is only an upper limit: in MSVC's two-level switches it counts
    the byte index table in front of the jump table.
    """
    memory = ctx.memory
    count = last_cmp + 1 if 0 <= last_cmp < MAX_TABLE_ENTRIES else MAX_TABLE_ENTRIES
    out = []
    for index in range(count):
        at = table + 4 * index
        if at < 0 or at + 4 > len(memory):
            break
        if entry_kind == TABLE_SELF_REL32:
            target = table + struct.unpack_from("<i", memory, at)[0]
        else:
            target = struct.unpack_from("<I", memory, at)[0]
        if not any(begin <= target < end for begin, end in ranges):
            break
        out.append(target)
    return tuple(out)


# ── fingerprint ────────────────────────────────────────────────────────────


def describe(ctx: Any, rva: int, ranges: tuple[tuple[int, int], ...], kind: int, target: int,
             table: tuple[int, int, int, tuple[int, ...]] | None, function_starts: Any) -> bytes:
    """What a reference's target is, independent of where things were placed."""
    label = ctx.iat.get(target)
    if label is not None:
        return b"I" + label
    if kind == JUMP_TABLE and table is not None:
        return b"J" + bytes([table[2]]) + ",".join(str(t - rva) for t in table[3]).encode()
    for begin, end in ranges:
        if begin <= target < end:
            return b"S" + str(target - rva).encode()
    index = bisect_left(function_starts, target)
    if index < len(function_starts) and function_starts[index] == target:
        return b"F"
    for begin, end, code in ctx.regions:
        if begin <= target < end:
            return b"D" + code
    return b"O"


def fingerprint(ctx: Any, rva: int, ranges: tuple[tuple[int, int], ...], refs: list, tables: list,
                function_starts: Any) -> str:
    memory = ctx.memory
    pieces = []
    for begin, end in ranges:
        masked = bytearray(memory[begin:end])
        for _, insn_rva, operand_offset, operand_size, _ in refs:
            at = insn_rva + operand_offset - begin
            if operand_size and 0 <= at < len(masked):
                masked[at:at + operand_size] = bytes(min(operand_size, len(masked) - at))
        pieces.append(bytes(masked))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"".join(pieces))
    digest.update(b"|")
    table_at = {t[0]: t for t in tables}
    for kind, insn_rva, _, _, target in refs:
        table = table_at.get(insn_rva) if kind == JUMP_TABLE else None
        digest.update(bytes([kind]) + describe(ctx, rva, ranges, kind, target, table, function_starts) + b";")
    return digest.hexdigest()


def fingerprint_many(ctx: Any, items: list, function_starts: Any) -> list[str]:
    return [fingerprint(ctx, rva, ranges, refs, tables, function_starts) for rva, ranges, refs, tables in items]


def fingerprinted(ctx: Any, analyses: list, function_starts: Any, cls: Any) -> list[Any]:
    return [_made(cls, a.rva, a.ranges, a.insn_rvas, a.raw_refs, a.raw_tables,
                  fingerprint(ctx, a.rva, a.ranges, a.raw_refs, a.raw_tables, function_starts)) for a in analyses]
