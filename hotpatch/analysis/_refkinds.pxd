"""The reference kinds of ``hotpatch.analysis.refkinds`` as C constants, for every compiled module that
reads references (one declaration: ``_core.KINDS`` exposes them and a test holds them equal to the
Python module's, whose values are part of the on-disk contract)."""

cdef enum:
    BRANCH_REL8 = 1
    BRANCH_REL32 = 2
    CALL_REL32 = 3
    RIP_RELATIVE = 4
    ABS64 = 5
    IAT_CALL = 6
    IAT_JUMP = 7
    IMAGE_REL32 = 8
    JUMP_TABLE = 9

    TABLE_SELF_REL32 = 1
    TABLE_IMAGE_REL32 = 2

    MAX_TABLE_ENTRIES = 4096
