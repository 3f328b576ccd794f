"""Byte-level helpers the compiled analysis modules share (inline, so each module has its own copy)."""

from libc.stdint cimport int64_t, uint8_t, uint32_t


# ``flow.py``'s ``_PREFIXES`` and ``_TERMINATING`` as byte tables: the sweep asks for every instruction
cdef extern from *:
    """
    #ifndef HOTPATCH_FLOW_TABLES
    #define HOTPATCH_FLOW_TABLES
    static const unsigned char hp_skipped_prefix[256] = {
        [0x26] = 1, [0x2E] = 1, [0x36] = 1, [0x3E] = 1, [0x40] = 1, [0x41] = 1, [0x42] = 1, [0x43] = 1,
        [0x44] = 1, [0x45] = 1, [0x46] = 1, [0x47] = 1, [0x48] = 1, [0x49] = 1, [0x4A] = 1, [0x4B] = 1,
        [0x4C] = 1, [0x4D] = 1, [0x4E] = 1, [0x4F] = 1, [0x64] = 1, [0x65] = 1, [0x66] = 1, [0xF2] = 1,
        [0xF3] = 1
    };
    static const unsigned char hp_ends_flow[256] = {
        [0xC2] = 1, [0xC3] = 1, [0xCA] = 1, [0xCB] = 1, [0xCC] = 1, [0xE9] = 1, [0xEB] = 1, [0xF4] = 1
    };
    #endif
    """
    const uint8_t hp_skipped_prefix[256]
    const uint8_t hp_ends_flow[256]


cdef inline Py_ssize_t _opcode_at(const uint8_t *p, Py_ssize_t length) noexcept nogil:
    """Offset of the opcode byte (prefixes skipped) in an instruction of ``length`` bytes, or ``length``."""
    cdef Py_ssize_t at = 0
    while at < length and hp_skipped_prefix[p[at]]:
        at += 1
    return at


cdef inline bint _terminates(const uint8_t *p, Py_ssize_t length, Py_ssize_t readable) noexcept nogil:
    """Same as ``hotpatch.analysis.flow.terminates``: ret, jmp, ud2, int3, hlt never fall through. Prefixes
    and the opcode are looked for within ``length`` bytes, the opcode's second byte within ``readable``
    (discovery bounds the prefixes tighter than the code it may read: 15 bytes, as ``flow.terminates`` does)."""
    cdef Py_ssize_t at = _opcode_at(p, length)
    cdef uint8_t op
    if at >= length:
        return False
    op = p[at]
    if hp_ends_flow[op]:  # ret, jmp, int3, hlt
        return True
    if at + 1 >= readable:
        return False
    if op == 0x0F:
        return p[at + 1] == 0x0B
    return op == 0xFF and ((p[at + 1] >> 3) & 7 == 4 or (p[at + 1] >> 3) & 7 == 5)


cdef inline bint _is_nop(const uint8_t *p, Py_ssize_t length) noexcept nogil:
    """Same as ``hotpatch.analysis.flow.is_nop``."""
    cdef Py_ssize_t at = _opcode_at(p, length)
    if at >= length:
        return False
    return p[at] == 0x90 or (p[at] == 0x0F and at + 1 < length and p[at + 1] == 0x1F)


cdef inline size_t _lower_bound(const uint32_t *values, size_t count, int64_t key) noexcept nogil:
    cdef size_t lo = 0, hi = count, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if <int64_t>values[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo

