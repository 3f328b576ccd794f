"""What an instruction's first bytes say about control flow: does execution fall through it?

Discovery bounds functions without .pdata by reachability and the analysis
core stops sweeping at data that follows the last instruction of a path; both
need to know where a path ends. That is decided from the opcode bytes alone
(prefixes skipped), so the compiled modules (``_shared.pxd``: ``_terminates``) and
this module answer identically without asking capstone.
"""

from __future__ import annotations

__all__ = ["is_nop", "terminates"]

# Legacy prefixes (operand size, rep, segment overrides) and REX.
_PREFIXES = frozenset((0x66, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, *range(0x40, 0x50)))
# ret, ret imm16, far rets, jmp rel32, jmp rel8, int3, hlt
_TERMINATING = frozenset((0xC3, 0xC2, 0xCB, 0xCA, 0xE9, 0xEB, 0xCC, 0xF4))


def _opcode_at(memory: bytes, rva: int, end: int) -> int:
    """Offset of the opcode byte of the instruction at ``rva`` (its prefixes skipped), or ``end``."""
    limit = min(end, rva + 15, len(memory))
    while rva < limit and memory[rva] in _PREFIXES:
        rva += 1
    return rva if rva < limit else end


def terminates(memory: bytes, rva: int, end: int) -> bool:
    """Whether the instruction at ``rva`` (within ``[rva, end)``) never falls through: ret, jmp, ud2,
    int3, hlt. Calls fall through (even to functions that do not return)."""
    at = _opcode_at(memory, rva, end)
    if at >= end:
        return False
    opcode = memory[at]
    if opcode in _TERMINATING:
        return True
    if at + 1 >= end:
        return False
    if opcode == 0x0F:
        return memory[at + 1] == 0x0B  # ud2
    # jmp r/m64 (FF /4) and jmp m16:64 (FF /5)
    return opcode == 0xFF and (memory[at + 1] >> 3) & 7 in (4, 5)


def is_nop(memory: bytes, rva: int, end: int) -> bool:
    """Whether the instruction at ``rva`` is a nop (90, 0F 1F /0 with any prefixes): alignment fill."""
    at = _opcode_at(memory, rva, end)
    if at >= end:
        return False
    return memory[at] == 0x90 or (memory[at] == 0x0F and at + 1 < end and memory[at + 1] == 0x1F)
