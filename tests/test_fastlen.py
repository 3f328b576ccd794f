"""The native fast length decoder against capstone, on random and biased byte strings."""

from __future__ import annotations

import random
import struct
from array import array
from types import SimpleNamespace

import capstone
import pytest
from capstone import x86_const as x86

from hotpatch.analysis import _core, _decode, refkinds
from tests.support.realbins import real_binary

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


def test_prefixed_sse_and_lock_forms_match_capstone() -> None:
    # F2/F3/F0 (and 66 before SSE) take only the listed two-byte opcodes: every one accepted must be sized
    # and flagged as capstone decodes it, the same opcode behind another prefix left to capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    rng = random.Random(20261202)
    known = {0x66: 0, 0xF2: 0, 0xF3: 0, 0xF0: 0}
    for _ in range(80000):
        prefix = rng.choice(list(known))
        rex = bytes([rng.choice([0x40, 0x41, 0x44, 0x48, 0x4C, 0x49])]) if rng.random() < 0.3 else b""
        opcode = b"\x0f" + bytes([rng.randrange(256)]) if rng.random() < 0.9 else bytes([rng.randrange(256)])
        code = (bytes([prefix]) + rex + opcode + bytes(rng.randrange(256) for _ in range(13)))[:15]
        length, reasons, _ = _decode.fast_decode(code)
        if not length:
            continue
        known[prefix] += 1
        decoded = list(md.disasm(code, 0x1000, 1))
        assert decoded, f"fast decoder accepted bytes capstone rejects: {code.hex()}"
        insn = decoded[0]
        text = f"{code.hex()}: {insn.mnemonic} {insn.op_str}"
        assert insn.size == length, text
        assert _capstone_reasons(insn)[0] <= reasons, text
        if prefix != 0x66:  # (66 before a one-byte opcode is the operand size, read as before)
            assert "compare" not in reasons and insn.id not in (x86.X86_INS_CMP, x86.X86_INS_LEA), text
    assert min(known.values()) > 50 and sum(known.values()) > 5000, known


def test_padding_nops_with_operand_size_prefixes_match_capstone() -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for code in ("6690", "66660f1f840000000000", "6666660f1f840000000000", "666666660f1f840000000000",
                 "660f1f440000"):
        raw = bytes.fromhex(code)
        insn = next(md.disasm(raw, 0, 1))
        assert _core.fast_length(raw)[0] == insn.size, code
    # five 66s, or 66 66 before anything but a nop, stay capstone's
    assert _core.fast_length(bytes.fromhex("66666666660f1f840000000000"))[0] == 0
    assert _core.fast_length(bytes.fromhex("666689c8"))[0] == 0


def _capstone_reasons(insn: capstone.CsInsn) -> tuple[set[str], int | None]:
    """The fast decoder's reasons as capstone's details show them, and the switch bound the analysis takes
    from a compare (the immediate of cmp reg, imm; -1 otherwise)."""
    reasons = set()
    for op in insn.operands:
        if op.type != x86.X86_OP_MEM:
            continue
        if op.mem.base == x86.X86_REG_RIP:
            reasons.add("rip")
        elif insn.disp_size == 4:
            reasons.add("disp32" if op.mem.base else "absolute")
        if op.mem.scale == 4:
            reasons.add("scale4")
    bound = None
    if insn.id == x86.X86_INS_CMP:
        reasons.add("compare")
        ops = insn.operands
        bound = ops[1].imm if len(ops) == 2 and ops[0].type == x86.X86_OP_REG and ops[1].type == x86.X86_OP_IMM else -1
    return reasons, bound


def test_fast_reasons_and_compare_bounds_match_capstone() -> None:
    # the decoder skips capstone's details where no reason it gives can matter: none may be missing
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    rng = random.Random(20261202)
    compares = bounds = 0
    for _ in range(60000):
        code = bytes(rng.randrange(256) for _ in range(15))
        if rng.random() < 0.5:
            code = bytes([rng.choice(PREFIXES)]) + code[:14]
        if rng.random() < 0.25:  # compares are rare in random bytes: make more of them
            code = code[:1] + bytes([rng.choice([0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D, 0x80, 0x81, 0x83])]) \
                + bytes([rng.randrange(256) | (0x38 if rng.random() < 0.5 else 0)]) + code[3:]
        length, reasons, bound = _decode.fast_decode(code)
        if not length:
            continue
        insn = next(md.disasm(code, 0x1000, 1))
        expected, expected_bound = _capstone_reasons(insn)
        text = f"{code[:length].hex()}: {insn.mnemonic} {insn.op_str}"
        # never a reason hidden (one more costs only a full decode: capstone 5 gives disp_size 2 after 66)
        assert expected <= reasons, text
        if "compare" in reasons:
            compares += 1
            if "bound" in reasons:
                bounds += 1
                assert bound == expected_bound, text
            else:  # left to capstone only for a negative immediate, whose value depends on the operand size
                assert expected_bound is not None and expected_bound != -1, text
    assert compares > 2000 and bounds > compares // 2


def test_rip_operands_read_from_the_bytes_match_capstones_details() -> None:
    # instructions the decoder reads without capstone's details: what _detailed would make of them
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    rng = random.Random(3)
    rva, iat_slot = 0x2000, 0x2100
    ctx = SimpleNamespace(memory=bytes(0x3000), relocations=array("I"), iat={iat_slot: b"k32!Sleep"},
                          first_section_rva=0x1000, image_base=0x180000000)
    ranges = ((0x1F00, 0x2080),)
    opcodes = [b"\x8b", b"\x89", b"\x8d", b"\xff", b"\x3b", b"\x39", b"\x80", b"\x83", b"\xc7", b"\x0f\x10",
               b"\x0f\xb6", b"\x63", b"\x85", b"\x0f\x28", b"\x0f\x6f", b"\x0f\x7f", b"\x0f\x7e", b"\x0f\x2a",
               b"\x0f\xc1", b"\x0f\xb1"]
    decoded = kinds = leas = 0
    for _ in range(30000):
        prefix = rng.choice([b"", b"\x48", b"\x4c", b"\x44", b"\x41", b"\x66", b"\x66\x48", b"\x49", b"\x40",
                             b"\xf2", b"\xf3", b"\xf0", b"\xf2\x48", b"\xf0\x48"])
        modrm = (rng.randrange(8) << 3) | 0x05
        head = prefix + rng.choice(opcodes) + bytes([modrm])
        tail = bytes(rng.randrange(256) for _ in range(6))
        length = _decode.fast_decode(head + bytes(4) + tail)[0]
        if not length:
            continue
        # the IAT slot, the function itself, the image base, anywhere near
        wanted = rng.choice([iat_slot, 0x1F80, 0, rva + rng.randrange(-0x400, 0x400)])
        code = head + struct.pack("<i", wanted - rva - length) + tail
        found = _decode.rip_operand(ctx, code, rva, ranges)
        if found is None:
            continue
        insn = next(md.disasm(code, rva, 1))
        refs, lea, reads = found
        decoded += 1
        text = f"{code[:insn.size].hex()}: {insn.mnemonic} {insn.op_str}"
        memory_ops = [op for op in insn.operands if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP]
        assert len(memory_ops) == 1 and len(refs) == 1, text
        target = rva + insn.size + memory_ops[0].mem.disp
        kind = refkinds.RIP_RELATIVE
        if target == iat_slot and capstone.CS_GRP_CALL in insn.groups:
            kind = refkinds.IAT_CALL
        elif target == iat_slot and capstone.CS_GRP_JUMP in insn.groups:
            kind = refkinds.IAT_JUMP
        kinds += kind != refkinds.RIP_RELATIVE
        assert refs == [(kind, rva, insn.disp_offset, 4, target)], text
        if insn.id == x86.X86_INS_LEA:
            leas += 1
            assert lea == insn.operands[0].reg and reads == [], text
        else:
            assert lea is None and reads == ([target] if ranges[0][0] <= target < ranges[0][1] else []), text
    assert decoded > 5000 and kinds > 30 and leas > 500


def test_lite_decodes_remembered_by_their_bytes_decode_as_the_twin() -> None:
    # the decoder remembers what capstone's lite decode said of an encoding: encodings that share their
    # first bytes (one slot) but differ after, RIP-relative or not, must still decode as the twin decodes
    from hotpatch.analysis import _reference

    pool = [bytes.fromhex(h) for h in (
        "c5f96f05", "c5f96f0424", "c5f96f4424", "62f17d486f05", "62f17d486f4424", "62f17d486fc1",
        "c4e37944c100", "c4e2795c0d", "c5f9efc1", "c4e27900c1", "660f6f05", "660fefc1", "f30f6f0424")]
    rng = random.Random(5)
    references = instructions = 0
    for _ in range(40):
        code = b""
        for _ in range(rng.randrange(20, 120)):
            head = rng.choice(pool)
            if head.endswith((b"\x05", b"\x0d")):  # [rip + disp32]
                head += struct.pack("<i", rng.randrange(-0x800, 0x800))
            elif head.endswith(b"\x44\x24"):
                head += bytes([rng.randrange(256)])
            code += head + (bytes([rng.randrange(256)]) if head.startswith(b"\xc4\xe3") else b"")
        memory = bytes(0x1000) + code + bytes(64)
        ctx = SimpleNamespace(memory=memory, relocations=array("I"), iat={}, first_section_rva=0x1000,
                              image_base=0x180000000)
        items = [(0x1000, ((0x1000, 0x1000 + len(code)),)), (0x1000 + 7, ((0x1000 + 7, 0x1000 + len(code)),))]
        for fast, slow in zip(_core.decode(ctx, items), _reference.decode(ctx, items)):
            assert fast[0] == slow[0] and fast[1] == slow[1] and fast[2] == slow[2]
            references += len(slow[1])
            instructions += len(slow[0])
    assert references > 500 and instructions > 4000


def test_compiled_terminates_reads_its_tables_as_flow_does() -> None:
    """The compiled ``_terminates`` (the sweep's and discovery's, over the prefix and flow-ending byte tables in
    ``_shared.pxd``) equals ``flow.terminates`` and ``flow.is_nop`` on every opcode pair behind prefixes
    (skipped or not, up to a run of 15), at every length an instruction can have."""
    from hotpatch.analysis.flow import is_nop, terminates

    heads = [b"", b"\x48", b"\x66", b"\xf3", b"\xf0", b"\x41\x2e", b"\x65\x48", b"\x66" * 13]
    ends = nops = 0
    for head in heads:
        for first in range(256):
            for second in range(256) if first in (0x0F, 0xFF, 0x48, 0x66, 0xF3) else (0x00, 0x0B, 0x1F, 0x28):
                code = head + bytes((first, second))
                for length in range(1, min(len(code), 15) + 1):
                    expected = terminates(code, 0, length)
                    assert _decode.terminates(code[:length]) is expected, code[:length].hex()
                    assert _decode.is_nop(code[:length]) is is_nop(code, 0, length), code[:length].hex()
                    ends += expected
                    nops += is_nop(code, 0, length)
    assert ends > 1000 and nops > 50


@pytest.mark.realbins
@pytest.mark.parametrize(("name", "version", "glob"), [
    ("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd"),
    ("numpy", "2.1.0", "numpy/_core/_multiarray_umath*.pyd"),
])
def test_prefixed_instructions_of_real_binaries_decode_as_capstone_decodes(name: str, version: str,
                                                                           glob: str) -> None:
    # every distinct instruction behind a 66/F2/F3/F0 prefix that the analysis swept in a real MSVC or LLVM
    # binary: where the fast decoder sizes it, capstone gives the same length and no reason it hides
    from hotpatch.analysis.functions import discover
    from hotpatch.pe.image import Image

    image = Image.load_fast(real_binary(name, version, glob))
    memory = image.memory
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    seen: set[bytes] = set()
    for analysis in discover(image).analyses:
        for rva in analysis.insn_rvas:
            if memory[rva] in (0x66, 0xF2, 0xF3, 0xF0):
                seen.add(bytes(memory[rva:rva + 15]))
    accepted = 0
    for code in seen:
        length, reasons, _ = _decode.fast_decode(code)
        if not length:
            continue
        accepted += 1
        insn = next(md.disasm(code, 0x1000, 1))
        text = f"{code[:insn.size].hex()}: {insn.mnemonic} {insn.op_str}"
        assert insn.size == length and _capstone_reasons(insn)[0] <= reasons, text
    assert accepted > len(seen) // 2


def test_disp32_and_scaled_operands_beside_an_image_base_register_decode_as_the_twin() -> None:
    # with a register holding the image base, only operands based on that register (or a scaled mov/movsxd
    # load) need capstone's details: others based elsewhere must still decode exactly as the twin decodes
    from hotpatch.analysis import _reference

    rng = random.Random(11)
    memory_size = 0x3000
    references = image_relative = 0
    for _ in range(60):
        code = b""
        base = 0x1000
        for _ in range(rng.randrange(20, 80)):
            choice = rng.randrange(6)
            if choice == 0:  # lea REG, [rip + X] pointing at the image base (X = -rva - 7) or elsewhere
                reg = rng.randrange(8)
                rva = base + len(code)
                target = 0 if rng.random() < 0.7 else rng.randrange(0x1000, memory_size)
                code += bytes([0x48 | (rng.random() < 0.3) << 2, 0x8D, 0x05 | reg << 3]) + struct.pack(
                    "<i", target - rva - 7)
                continue
            rex = bytes([rng.choice([0x40, 0x41, 0x44, 0x48, 0x49, 0x4C])]) if rng.random() < 0.5 else b""
            opcode = rng.choice([b"\x8b", b"\x8a", b"\x63", b"\x03", b"\x89", b"\x8d", b"\x0f\xb6", b"\x3b",
                                 b"\x0f\x10"])
            if opcode == b"\x63":
                rex = bytes([0x48 | (rex[0] & 7 if rex else 0)])
            disp = struct.pack("<i", rng.choice([rng.randrange(0x1000, memory_size), rng.randrange(-64, 64)]))
            if rng.random() < 0.5:  # [base + index * 4 + disp32]
                sib = rng.choice([0x80, 0x40, 0xC0]) | rng.randrange(8) << 3 | rng.randrange(8)
                code += rex + opcode + bytes([0x84 | rng.randrange(8) << 3, sib]) + disp
            else:  # [base + disp32]
                code += rex + opcode + bytes([0x80 | rng.randrange(8) << 3 | rng.choice([0, 1, 2, 3, 5, 6, 7])]) \
                    + disp
        memory = bytes(0x1000) + code + bytes(memory_size - 0x1000 - len(code) + 64)
        ctx = SimpleNamespace(memory=memory, relocations=array("I"), iat={}, first_section_rva=0x1000,
                              image_base=0x180000000)
        items = [(0x1000, ((0x1000, 0x1000 + len(code)),))]
        for fast, slow in zip(_core.decode(ctx, items), _reference.decode(ctx, items)):
            assert fast[0] == slow[0] and list(fast[1]) == list(slow[1]) and fast[2] == slow[2]
            references += len(slow[1])
            image_relative += sum(ref[0] == refkinds.IMAGE_REL32 for ref in slow[1])
    assert references > 500 and image_relative > 100, (references, image_relative)


@pytest.mark.parametrize("image_base", [0x180000000, 0, 0xFFFF_8000_0000_0000, (1 << 64) - 0x1000])
def test_absolute_values_relative_to_the_image_base_as_the_twin_gives_them(image_base: int) -> None:
    # ABS64 targets are the value minus the image base, in C while that fits in 64 signed bits and through
    # Python's ints otherwise (kept aside as wide): every side of both edges, from mov rax, imm64 (48 B8)
    from hotpatch.analysis import _reference

    edges = [image_base + delta for delta in (0, 1, -1, 0x1234, -0x1234, (1 << 63) - 1, 1 << 63, -(1 << 63),
                                              -(1 << 63) - 1, (1 << 63) + 1)]
    rng = random.Random(image_base & 0xFFFF)
    values = [v & ((1 << 64) - 1) for v in edges] + [0, (1 << 64) - 1, 1 << 63, (1 << 63) - 1]
    values += [rng.randrange(1 << 64) for _ in range(200)]
    code = b"".join(b"\x48\xb8" + struct.pack("<Q", value) for value in values) + b"\xc3"
    memory = bytes(0x1000) + code + bytes(64)
    ctx = SimpleNamespace(memory=memory, relocations=array("I", [0x1000 + 10 * i + 2 for i in range(len(values))]),
                          iat={}, first_section_rva=0x1000, image_base=image_base)
    items = [(0x1000, ((0x1000, 0x1000 + len(code)),))]
    (fast,), (slow,) = _core.decode(ctx, items), _reference.decode(ctx, items)
    assert fast[1] == slow[1] and len(slow[1]) == len(values)
    assert {ref[4] for ref in slow[1]} >= {value - image_base for value in values[:6]}
