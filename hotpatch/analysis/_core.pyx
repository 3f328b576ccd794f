# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled analysis core: ``decode`` (from ``_decode.pyx``, the x86-64 decoder over capstone's C API)
and ``fingerprint`` (here); the backend ``hotpatch.analysis.api`` hands out.

Line for line the same contract as ``hotpatch.analysis._reference`` (read its
docstring); the tests check that both give identical results.
"""

import hashlib
from array import array

from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.stdio cimport snprintf
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

from hotpatch.analysis._refkinds cimport (
    ABS64, BRANCH_REL8, BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP, IMAGE_REL32, JUMP_TABLE, MAX_TABLE_ENTRIES,
    RIP_RELATIVE, TABLE_IMAGE_REL32, TABLE_SELF_REL32,
)
from hotpatch.analysis._shared cimport _lower_bound

from ._decode import decode, fast_length, instruction_text, terminates
from ._reflist import RefList

__all__ = ["IMPLEMENTATION", "RefList", "decode", "fast_length", "fingerprint", "fingerprint_many",
           "instruction_text", "terminates"]

IMPLEMENTATION = "cython"

#: the constants every compiled module cimports from ``_refkinds.pxd``, as compiled (a test holds them
#: equal to ``refkinds.py``'s)
KINDS = {
    "BRANCH_REL8": BRANCH_REL8, "BRANCH_REL32": BRANCH_REL32, "CALL_REL32": CALL_REL32,
    "RIP_RELATIVE": RIP_RELATIVE, "ABS64": ABS64, "IAT_CALL": IAT_CALL, "IAT_JUMP": IAT_JUMP,
    "IMAGE_REL32": IMAGE_REL32, "JUMP_TABLE": JUMP_TABLE, "TABLE_SELF_REL32": TABLE_SELF_REL32,
    "TABLE_IMAGE_REL32": TABLE_IMAGE_REL32, "MAX_TABLE_ENTRIES": MAX_TABLE_ENTRIES,
}


cdef inline bint _in_ranges(int64_t target, int64_t[:, :] ranges) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(ranges.shape[0]):
        if ranges[i, 0] <= target < ranges[i, 1]:
            return True
    return False



cdef int64_t[:, :] _ranges_view(tuple ranges_tuple):
    flat = array("q")
    for r in ranges_tuple:
        flat.append(r[0])
        flat.append(r[1])
    return memoryview(flat).cast("B").cast("q", (len(ranges_tuple), 2))



# ── fingerprint ────────────────────────────────────────────────────────────

cdef struct Regions:
    int64_t begin[96]
    int64_t end[96]
    char code[96]
    int count


cdef int _append(bytearray out, const char *text, Py_ssize_t length) except -1:
    out.extend(PyBytes_FromStringAndSize(text, length))
    return 0


def fingerprint(ctx, int64_t rva, tuple ranges_tuple, refs, list tables, function_starts):
    return fingerprint_many(ctx, [(rva, ranges_tuple, refs, tables)], function_starts)[0]


def fingerprint_many(ctx, list items, function_starts):
    """``fingerprint`` of each ``(rva, ranges, refs, tables)`` item, with the image set up once."""
    cdef const uint8_t[:] memory = ctx.memory
    cdef const uint32_t[:] starts = function_starts
    cdef Regions regions
    regions.count = 0
    for begin, end, code in ctx.regions:
        if regions.count < 96:
            regions.begin[regions.count] = begin
            regions.end[regions.count] = end
            regions.code[regions.count] = (<bytes>code)[0]
            regions.count += 1
    iat = ctx.iat
    return [_fingerprint_one(memory, starts, &regions, iat, item[0], item[1], item[2], item[3]) for item in items]


cdef str _fingerprint_one(const uint8_t[:] memory, const uint32_t[:] starts, Regions *regions, dict iat,
                          int64_t rva, tuple ranges_tuple, refs, list tables):
    cdef int64_t[:, :] ranges = _ranges_view(ranges_tuple)
    cdef Py_ssize_t memlen = memory.shape[0]
    cdef Py_ssize_t total = 0, piece, at, i, r
    cdef int64_t begin, end, target
    cdef int operand_size, kind
    cdef size_t index
    cdef char text[32]
    cdef int length
    cdef uint8_t *masked
    for r in range(ranges.shape[0]):
        end = min(ranges[r, 1], <int64_t>memlen)
        if end > ranges[r, 0]:
            total += end - ranges[r, 0]
    masked = <uint8_t *>malloc(total + 1)
    if masked == NULL:
        raise MemoryError()
    try:
        piece = 0
        for r in range(ranges.shape[0]):
            begin = ranges[r, 0]
            end = min(ranges[r, 1], <int64_t>memlen)
            if end <= begin:
                continue
            memcpy(masked + piece, &memory[begin], end - begin)
            for ref in refs:
                operand_size = ref[3]
                at = <int64_t>ref[1] + <int64_t>ref[2] - begin
                if operand_size and 0 <= at < end - begin:
                    memset(masked + piece + at, 0, min(operand_size, end - begin - at))
            piece += end - begin
        digest = hashlib.blake2b(digest_size=16)
        digest.update(PyBytes_FromStringAndSize(<char *>masked, total))
    finally:
        free(masked)
    out = bytearray(b"|")
    table_at = None
    for ref in refs:
        kind = ref[0]
        target_obj = ref[4]
        label = iat.get(target_obj) if iat else None
        out.append(kind)
        if label is not None:
            out += b"I"
            out += label
        elif kind == JUMP_TABLE:
            if table_at is None:
                table_at = {t[0]: t for t in tables}
            table = table_at[ref[1]]
            out += b"J" + bytes([table[2]]) + ",".join([str(t - rva) for t in table[3]]).encode()
        elif not (-(1 << 62) < target_obj < (1 << 62)):
            out += b"O"
        else:
            target = target_obj
            if _in_ranges(target, ranges):
                length = snprintf(text, 32, "S%lld", <long long>(target - rva))
                _append(out, text, length)
            else:
                index = _lower_bound(&starts[0], starts.shape[0], target) if starts.shape[0] else 0
                if index < <size_t>starts.shape[0] and <int64_t>starts[index] == target:
                    out += b"F"
                else:
                    for i in range(regions[0].count):
                        if regions[0].begin[i] <= target < regions[0].end[i]:
                            text[0] = b"D"
                            text[1] = regions[0].code[i]
                            _append(out, text, 2)
                            break
                    else:
                        out += b"O"
        out += b";"
    digest.update(out)
    return digest.hexdigest()
