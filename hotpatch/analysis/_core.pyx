# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled analysis core: ``decode`` (from ``_decode.pyx``, the x86-64 decoder over capstone's C API)
and ``fingerprint`` (here); the backend ``hotpatch.analysis.api`` hands out.

Line for line the same contract as ``hotpatch.analysis._reference`` (read its
docstring); the tests check that both give identical results.
"""

import hashlib
from array import array

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.stdio cimport snprintf
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.buffer cimport PyBUF_READ
from cpython.memoryview cimport PyMemoryView_FromMemory

from hotpatch.analysis._refkinds cimport (
    ABS64, BRANCH_REL8, BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP, IMAGE_REL32, JUMP_TABLE, MAX_TABLE_ENTRIES,
    RIP_RELATIVE, TABLE_IMAGE_REL32, TABLE_SELF_REL32,
)
from hotpatch.analysis._reflist cimport PackedRef, RefList as PackedRefList
from hotpatch.analysis._shared cimport _lower_bound
from hotpatch.analysis._slots cimport Maker, field_of, make_analysis, maker_of

from ._decode import X86_NUMBERS, decode, fast_length, instruction_text, terminates
from ._reflist import RefList

__all__ = ["IMPLEMENTATION", "X86_NUMBERS", "RefList", "decode", "fast_length", "fingerprint", "fingerprint_many",
           "fingerprinted", "instruction_text", "terminates"]

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


cdef struct Buffer:
    uint8_t *data
    size_t size
    size_t capacity


cdef int _reserve(Buffer *buffer, size_t more) except -1:
    cdef size_t wanted = buffer.size + more, capacity = buffer.capacity
    cdef uint8_t *grown
    if wanted <= capacity:
        return 0
    capacity = max(2 * capacity, wanted, <size_t>4096)
    grown = <uint8_t *>realloc(buffer.data, capacity)
    if grown == NULL:
        raise MemoryError()
    buffer.data, buffer.capacity = grown, capacity
    return 0


cdef inline int _put(Buffer *buffer, const char *text, size_t length) except -1:
    _reserve(buffer, length)
    memcpy(buffer.data + buffer.size, text, length)
    buffer.size += length
    return 0


cdef inline int _put_keeping(Buffer *buffer, bytes text, size_t room) except -1:
    """``text``, with ``room`` bytes still free after it."""
    _reserve(buffer, len(text) + room)
    return _put(buffer, text, len(text))


# what every packed fingerprint reads, set up once: the memory, the final starts, the regions, the IAT
# slots (sorted; ``labels`` holds their names in the same order)
cdef struct Image:
    const uint8_t *memory
    Py_ssize_t memlen
    const uint32_t *starts
    size_t n_starts
    const uint8_t *start_bits  # bit t set when t is a start, for 0 <= t < bits_limit (the others bisect)
    int64_t bits_limit
    Regions regions
    const int64_t *iat
    size_t n_iat
    int64_t iat_low         # the lowest and highest slot (low > high when there is none)
    int64_t iat_high


cdef class _Hasher:
    """What every fingerprint of one image reads, set up once (the memory, the final starts, the regions, the
    IAT slots sorted with their names in ``labels``), and the scratch buffers they are written to."""
    cdef object keep  # the Python objects the pointers in ``image`` point into
    cdef object ctx
    cdef Image image
    cdef uint8_t *start_bits
    cdef Buffer buffer
    cdef Buffer spans
    cdef list labels
    cdef dict iat
    cdef object blake2b
    cdef const uint8_t[:] memory_view
    cdef const uint32_t[:] starts_view

    def __cinit__(self, ctx, function_starts):
        cdef const int64_t[:] iat_view
        cdef size_t i
        self.ctx = ctx
        self.memory_view = ctx.memory
        self.starts_view = function_starts
        memset(&self.buffer, 0, sizeof(Buffer))
        memset(&self.spans, 0, sizeof(Buffer))
        self.image.regions.count = 0
        for begin, end, code in ctx.regions:
            if self.image.regions.count < 96:
                self.image.regions.begin[self.image.regions.count] = begin
                self.image.regions.end[self.image.regions.count] = end
                self.image.regions.code[self.image.regions.count] = (<bytes>code)[0]
                self.image.regions.count += 1
        iat = ctx.iat
        self.iat = iat
        # the IAT by slot, for bisection; a key no int64 target can equal is left to the dict
        slots = sorted(slot for slot in iat if -(1 << 63) <= slot < (1 << 63)) if iat else []
        iat_slots = array("q", slots)
        iat_slots.append(0)  # never empty
        iat_view = iat_slots
        self.keep = iat_slots
        self.labels = [iat[slot] for slot in slots]
        self.image.memory = &self.memory_view[0] if self.memory_view.shape[0] else NULL
        self.image.memlen = self.memory_view.shape[0]
        self.image.starts = &self.starts_view[0] if self.starts_view.shape[0] else NULL
        self.image.n_starts = self.starts_view.shape[0]
        # most references name a function: one bit each over the image instead of a search each
        self.image.bits_limit = self.image.memlen
        self.start_bits = <uint8_t *>calloc((self.image.bits_limit >> 3) + 1, 1)
        if self.start_bits == NULL:
            raise MemoryError()
        for i in range(self.image.n_starts):
            if self.image.starts[i] < self.image.bits_limit:
                self.start_bits[self.image.starts[i] >> 3] |= 1 << (self.image.starts[i] & 7)
        self.image.start_bits = self.start_bits
        self.image.iat = &iat_view[0]
        self.image.n_iat = len(slots)
        self.image.iat_low = iat_view[0] if slots else 1
        self.image.iat_high = iat_view[len(slots) - 1] if slots else 0
        self.blake2b = hashlib.blake2b

    def __dealloc__(self):
        free(self.buffer.data)
        free(self.spans.data)
        free(self.start_bits)

    cdef str digest(self, rva, ranges, refs, tables):
        if type(refs) is PackedRefList and self.image.memory != NULL and type(ranges) is tuple \
                and type(tables) is list:
            return _fingerprint_packed(&self.image, self.labels, self.iat, rva, <tuple>ranges, <PackedRefList>refs,
                                       <list>tables, &self.buffer, &self.spans, self.blake2b)
        return _fingerprint_one(self.memory_view, self.starts_view, &self.image.regions, self.iat, rva, ranges,
                                refs, tables)


def fingerprint_many(ctx, list items, function_starts):
    """``fingerprint`` of each ``(rva, ranges, refs, tables)`` item, with the image set up once. Items whose
    references are a ``RefList`` (the decoder's) are hashed from its packed records in one C buffer."""
    cdef _Hasher hasher = _Hasher(ctx, function_starts)
    return [hasher.digest(item[0], item[1], item[2], item[3]) for item in items]


def fingerprinted(ctx, list analyses, function_starts, cls):
    """Copies of ``analyses`` (``cls`` objects: ``api.FunctionAnalysis``) with their fingerprints, built
    here: the same as ``fingerprint_many`` of their fields, then a new object each with its digest."""
    cdef _Hasher hasher = _Hasher(ctx, function_starts)
    cdef Maker maker
    cdef tuple empty = ()
    memset(&maker, 0, sizeof(Maker))  # (filled by maker_of; cleared so the compiler sees it set)
    maker_of(&maker, cls, empty)
    out = []
    for analysis in analyses:
        rva, ranges = field_of(&maker, 0, analysis), field_of(&maker, 1, analysis)
        refs, tables = field_of(&maker, 3, analysis), field_of(&maker, 4, analysis)
        out.append(make_analysis(&maker, rva, ranges, field_of(&maker, 2, analysis), refs, tables,
                                 hasher.digest(rva, ranges, refs, tables)))
    return out


cdef inline bint _in_spans(int64_t target, const int64_t *ranges, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(count):
        if ranges[2 * i] <= target < ranges[2 * i + 1]:
            return True
    return False


# room every reference's descriptor takes at most besides an IAT name or a jump table: its kind, "S" with a
# signed 64-bit number (20 characters) or "D" and a region code, and ";"
cdef enum:
    DESCRIPTOR_ROOM = 23


cdef inline void _add(Buffer *buffer, char c) noexcept nogil:
    """One character into room already reserved."""
    buffer.data[buffer.size] = <uint8_t>c
    buffer.size += 1


cdef inline void _add_signed(Buffer *buffer, char prefix, int64_t value) noexcept nogil:
    """``prefix`` then ``value`` in decimal (what ``b"%c%lld"`` gives, without printf's machinery), into room
    already reserved."""
    cdef char text[24]
    cdef int at = 24
    cdef uint64_t magnitude = <uint64_t>(-(value + 1)) + 1 if value < 0 else <uint64_t>value
    while True:
        at -= 1
        text[at] = <char>(48 + magnitude % 10)
        magnitude //= 10
        if magnitude == 0:
            break
    if value < 0:
        at -= 1
        text[at] = b"-"
    at -= 1
    text[at] = prefix
    memcpy(buffer.data + buffer.size, text + at, 24 - at)
    buffer.size += 24 - at


cdef inline bint _is_start(const Image *image, int64_t target) noexcept nogil:
    cdef size_t index
    if 0 <= target < image.bits_limit:
        return (image.start_bits[target >> 3] >> (target & 7)) & 1
    index = _lower_bound(image.starts, image.n_starts, target) if image.n_starts else 0
    return index < image.n_starts and <int64_t>image.starts[index] == target


cdef str _fingerprint_packed(const Image *image, list labels, dict iat, object rva_obj, tuple ranges_tuple,
                             PackedRefList refs, list tables, Buffer *buffer, Buffer *spans, object blake2b):
    """``_fingerprint_one`` of a packed reference list: the masked bytes and the descriptors written to one
    buffer and hashed once (BLAKE2b of the two parts in a row is that of their concatenation)."""
    cdef const PackedRef *packed = <const PackedRef *><const char *>refs.packed
    cdef Py_ssize_t count = refs.count, n_ranges = len(ranges_tuple), r, i, at, length
    cdef const uint8_t *memory = image.memory
    cdef int64_t rva = rva_obj
    cdef int64_t begin, end, target
    cdef int64_t *ranges
    cdef size_t index
    cdef uint8_t *piece
    cdef bint has_wide = refs.wide is not None
    cdef tuple span
    spans.size = 0
    _reserve(spans, 2 * n_ranges * sizeof(int64_t))
    ranges = <int64_t *>spans.data
    for r in range(n_ranges):
        span = <tuple>ranges_tuple[r]
        ranges[2 * r], ranges[2 * r + 1] = span[0], span[1]
    buffer.size = 0
    for r in range(n_ranges):
        begin = ranges[2 * r]
        end = min(ranges[2 * r + 1], <int64_t>image.memlen)
        if end <= begin:
            continue
        length = end - begin
        _reserve(buffer, length)
        piece = buffer.data + buffer.size
        memcpy(piece, memory + begin, length)
        for i in range(count):
            at = <int64_t>packed[i].insn_rva + packed[i].operand_offset - begin
            if packed[i].operand_size and 0 <= at < length:
                memset(piece + at, 0, min(<Py_ssize_t>packed[i].operand_size, length - at))
        buffer.size += length
    # room for every fixed-size descriptor; an IAT name or a jump table reserves its own and keeps this room
    _reserve(buffer, 1 + count * DESCRIPTOR_ROOM)
    _add(buffer, b"|")
    table_at = None
    for i in range(count):
        _add(buffer, <char>packed[i].kind)
        if has_wide and i in refs.wide:
            # a target beyond 64 bits (an ABS64 of garbage): only an IAT slot could name it
            label = iat.get(refs.wide[i])
            if label is not None:
                _add(buffer, b"I")
                _put_keeping(buffer, <bytes>label, (count - i) * DESCRIPTOR_ROOM)
            else:
                _add(buffer, b"O")
            _add(buffer, b";")
            continue
        target = packed[i].target
        # most targets are code, outside the IAT's span: no search for them
        if image.iat_low <= target <= image.iat_high:
            index = _lower_bound_64(image.iat, image.n_iat, target)
        else:
            index = image.n_iat
        if index < image.n_iat and image.iat[index] == target:
            _add(buffer, b"I")
            _put_keeping(buffer, <bytes>labels[index], (count - i) * DESCRIPTOR_ROOM)
        else:
            table = None
            if packed[i].kind == JUMP_TABLE:
                if table_at is None:
                    table_at = {t[0]: t for t in tables}
                table = table_at.get(packed[i].insn_rva)
            if table is not None:
                described = b"J" + bytes([table[2]]) + ",".join([str(t - rva) for t in table[3]]).encode()
                _put_keeping(buffer, <bytes>described, (count - i) * DESCRIPTOR_ROOM)
            elif _in_spans(target, ranges, n_ranges):
                _add_signed(buffer, b"S", target - rva)
            elif _is_start(image, target):
                _add(buffer, b"F")
            else:
                for r in range(image.regions.count):
                    if image.regions.begin[r] <= target < image.regions.end[r]:
                        _add(buffer, b"D")
                        _add(buffer, image.regions.code[r])
                        break
                else:
                    _add(buffer, b"O")
        _add(buffer, b";")
    # hashed in place: a read-only view of the buffer, not a copy of it
    return blake2b(PyMemoryView_FromMemory(<char *>buffer.data, buffer.size, PyBUF_READ),
                   digest_size=16).hexdigest()


cdef inline size_t _lower_bound_64(const int64_t *values, size_t count, int64_t key) noexcept nogil:
    cdef size_t lo = 0, hi = count, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if values[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


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
