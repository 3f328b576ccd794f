"""Byte-level helpers the compiled analysis modules share (inline, so each module has its own copy)."""

from libc.stdint cimport int64_t, uint8_t, uint32_t


cdef inline Py_ssize_t _opcode_at(const uint8_t *p, Py_ssize_t length) noexcept nogil:
    """Offset of the opcode byte (prefixes skipped) in an instruction of ``length`` bytes, or ``length``."""
    cdef Py_ssize_t at = 0
    cdef uint8_t b
    while at < length:
        b = p[at]
        if b == 0x66 or b == 0xF2 or b == 0xF3 or b == 0x2E or b == 0x3E or b == 0x26 or b == 0x36 \
                or b == 0x64 or b == 0x65 or 0x40 <= b <= 0x4F:
            at += 1
        else:
            break
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
    if op == 0xC3 or op == 0xC2 or op == 0xCB or op == 0xCA or op == 0xE9 or op == 0xEB or op == 0xCC \
            or op == 0xF4:
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

