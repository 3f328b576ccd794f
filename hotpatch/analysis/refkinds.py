"""Reference kinds: the ways an x86-64 instruction can point somewhere.

Small integers, shared by the compiled core and its pure-Python reference
(they enter fingerprints, so their values are part of the on-disk contract).
"""

from __future__ import annotations

__all__ = ["KIND_NAMES", "TABLE_KIND_NAMES"]

BRANCH_REL8 = 1      # jmp/jcc/loop with an 8-bit displacement
BRANCH_REL32 = 2     # jmp/jcc with a 32-bit displacement
CALL_REL32 = 3       # call rel32
RIP_RELATIVE = 4     # [rip + disp32] memory operand (lea, mov, cmp, ...)
ABS64 = 5            # 64-bit absolute address covered by a base relocation
IAT_CALL = 6         # call [rip + disp32] through an import address table slot
IAT_JUMP = 7         # jmp [rip + disp32] through an import address table slot
IMAGE_REL32 = 8      # 32-bit image-relative displacement (MSVC jump-table base)
JUMP_TABLE = 9       # indexed load of a switch table; the table is in ``tables``

KIND_NAMES = {
    BRANCH_REL8: "rel8",
    BRANCH_REL32: "rel32",
    CALL_REL32: "call_rel32",
    RIP_RELATIVE: "rip_relative",
    ABS64: "abs64",
    IAT_CALL: "iat_call",
    IAT_JUMP: "iat_jump",
    IMAGE_REL32: "image_rel32",
    JUMP_TABLE: "jump_table",
}

TABLE_SELF_REL32 = 1   # GCC: int32 entries relative to the table start
TABLE_IMAGE_REL32 = 2  # MSVC: uint32 entries relative to the image base

TABLE_KIND_NAMES = {TABLE_SELF_REL32: "table_rel32", TABLE_IMAGE_REL32: "image_rel32"}

#: upper bound on jump-table entries read, whatever the bounds check says
MAX_TABLE_ENTRIES = 4096
