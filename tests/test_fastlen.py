"""The native fast length decoder against capstone, on random and biased byte strings."""

from __future__ import annotations

import random

import capstone
from capstone import x86_const as x86

from hotpatch.analysis import _core

PREFIXES = [0x48, 0x4C, 0x41, 0x66, 0x0F, 0x40]


def _needs_full_decode(insn: capstone.CsInsn) -> bool:
    """What the analysis reads from an instruction: it must never be hidden from it."""
    if capstone.CS_GRP_BRANCH_RELATIVE in insn.groups or insn.id == x86.X86_INS_CMP:
        return True
    for op in insn.operands:
        if op.type == x86.X86_OP_MEM:
            if op.mem.base == x86.X86_REG_RIP or insn.disp_size == 4:
                return True
            if op.mem.scale == 4 and insn.id in (x86.X86_INS_MOV, x86.X86_INS_MOVSXD):
                return True
    return False


def test_fast_lengths_match_capstone_and_flag_every_reference() -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    rng = random.Random(20261127)
    known = 0
    for _ in range(60000):
        code = bytes(rng.randrange(256) for _ in range(15))
        if rng.random() < 0.5:
            code = bytes([rng.choice(PREFIXES)]) + code[:14]
        length, interesting = _core.fast_length(code)
        if not length:
            continue
        known += 1
        decoded = list(md.disasm(code, 0x1000, 1))
        assert decoded, f"fast decoder accepted bytes capstone rejects: {code.hex()}"
        insn = decoded[0]
        assert insn.size == length, f"{code.hex()}: {insn.mnemonic} {insn.op_str}"
        if _needs_full_decode(insn):
            assert interesting, f"{code.hex()}: {insn.mnemonic} {insn.op_str} needs a full decode"
    assert known > 20000, "the fast path should recognise a good share of encodings"


def test_fast_decoder_leaves_truncated_instructions_to_capstone() -> None:
    assert _core.fast_length(bytes.fromhex("48 8b 05 00 00"))[0] == 0   # mov rax,[rip+disp32] cut short
    assert _core.fast_length(bytes.fromhex("48 8b 05 00 00 00 00")) == (7, True)
    assert _core.fast_length(bytes.fromhex("48 89 c8")) == (3, False)    # mov rax, rcx
    assert _core.fast_length(bytes.fromhex("e8 00 00 00 00")) == (0, True)  # call: always full decode
