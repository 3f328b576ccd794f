"""The compiled fingerprints of packed references (``RefList``, hashed from its records in C) equal the
compiled per-tuple path and the pure-Python twin's, on real fixtures and on the rare cases fixtures lack."""

from __future__ import annotations

import struct
from array import array
from pathlib import Path
from types import SimpleNamespace

from hotpatch.analysis._reflist import RefList, _reflist

from hotpatch import Image, discover
from hotpatch.analysis import _core as core
from hotpatch.analysis import _reference as reference
from hotpatch.analysis.refkinds import ABS64, BRANCH_REL32, CALL_REL32, IAT_CALL, JUMP_TABLE, RIP_RELATIVE


def test_packed_fingerprints_equal_the_tuple_path_and_the_twin(built_fixtures: Path) -> None:
    kinds_seen: set[int] = set()
    for case in ("switch_table", "new_import", "const_table", "cpp_exception", "many_functions"):
        image = Image.load(built_fixtures / case / "patched.dll")
        table = discover(image)
        starts = array("I", sorted(f.rva for f in table))
        packed = [(a.rva, a.ranges, a.raw_refs, a.raw_tables) for a in table.analyses]
        assert all(isinstance(item[2], RefList) for item in packed)
        listed = [(rva, ranges, refs.tolist(), tables) for rva, ranges, refs, tables in packed]
        fast = core.fingerprint_many(table.context, packed, starts)
        assert fast == core.fingerprint_many(table.context, listed, starts), case
        assert fast == reference.fingerprint_many(table.context, listed, starts), case
        kinds_seen.update(ref[0] for item in listed for ref in item[2])
    # the descriptors the C path writes itself: IAT names, jump tables, own ranges, functions, data
    assert {IAT_CALL, JUMP_TABLE, BRANCH_REL32, CALL_REL32, RIP_RELATIVE} <= kinds_seen


def _packed(refs: list[tuple[int, int, int, int, int]], wide: dict[int, int] | None) -> RefList:
    records = b"".join(struct.pack("<qIBBB", target if index not in (wide or {}) else 0, insn_rva, kind,
                                   operand_offset, operand_size)
                       for index, (kind, insn_rva, operand_offset, operand_size, target) in enumerate(refs))
    return _reflist(records, wide)


def test_packed_fingerprint_of_wide_targets_missing_tables_and_edges() -> None:
    memory = bytes(range(256)) * 4
    far = (1 << 64) + 0x40  # an ABS64 of garbage, image base taken off: beyond int64, kept in ``wide``
    ctx = SimpleNamespace(memory=memory, iat={0x300: b"k32!Sleep", far: b"odd!slot"},
                          regions=((0x0, 0x200, b"X"), (0x200, 0x400, b"W")))
    refs = [
        (CALL_REL32, 0x10, 1, 4, 0x300),  # an IAT slot, even through a call
        (ABS64, 0x18, 2, 8, far),  # wide, named by the IAT
        (ABS64, 0x20, 2, 8, -far),  # wide, named by nothing
        (JUMP_TABLE, 0x28, 0, 0, 0x250),  # no table for it: described as where it points
        (BRANCH_REL32, 0x30, 1, 4, 0x12),  # inside the function's own ranges
        (BRANCH_REL32, 0x38, 1, 4, 0x1F8),  # inside its fragment
        (CALL_REL32, 0x40, 1, 4, 0x180),  # a function start
        (RIP_RELATIVE, 0x48, 3, 4, 0x210),  # data
        (RIP_RELATIVE, 0x50, 3, 4, (1 << 62) + 5),  # nowhere
        (RIP_RELATIVE, 0x3F0, 3, 4, -5),  # an operand cut by the range end: masked up to it
        (CALL_REL32, 0x58, 1, 4, 0x800),  # a start past the memory (the starts' bitmap ends there)
        (CALL_REL32, 0x5A, 1, 4, 0x808),  # and none
    ]
    wide = {1: far, 2: -far}
    ranges = ((0x0, 0x60), (0x1F0, 0x1FC), (0x3F0, 0x3F6))
    starts = array("I", [0x0, 0x180, 0x800])
    packed = _packed(refs, wide)
    assert packed == refs
    fast = core.fingerprint_many(ctx, [(0x0, ranges, packed, [])], starts)
    assert fast == reference.fingerprint_many(ctx, [(0x0, ranges, refs, [])], starts)
    # and each descriptor counts: dropping the IAT name of the wide slot changes the digest
    ctx.iat = {0x300: b"k32!Sleep"}
    assert core.fingerprint_many(ctx, [(0x0, ranges, packed, [])], starts) != fast
