# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled analysis core: ``decode`` and ``fingerprint`` over capstone's C API.

Line for line the same contract as ``hotpatch.analysis._reference`` (read its
docstring); the tests check that both give identical results.
"""

import ctypes
import hashlib
from array import array

import capstone

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.stdio cimport snprintf
from libc.string cimport memcpy, memset, strstr
from cpython.bytes cimport PyBytes_FromStringAndSize

from hotpatch.analysis.includes.capstone cimport *


cdef extern from "x86_fastlen.h" nogil:
    int hp_fast_length(const uint8_t *code, size_t avail, int *interesting)

from .refkinds import (
    ABS64 as _ABS64, BRANCH_REL8 as _BRANCH_REL8, BRANCH_REL32 as _BRANCH_REL32, CALL_REL32 as _CALL_REL32,
    IAT_CALL as _IAT_CALL, IAT_JUMP as _IAT_JUMP, IMAGE_REL32 as _IMAGE_REL32, JUMP_TABLE as _JUMP_TABLE,
    MAX_TABLE_ENTRIES as _MAX_TABLE_ENTRIES, RIP_RELATIVE as _RIP_RELATIVE,
    TABLE_IMAGE_REL32 as _TABLE_IMAGE_REL32, TABLE_SELF_REL32 as _TABLE_SELF_REL32,
)

IMPLEMENTATION = "cython"

cdef int ABS64 = _ABS64
cdef int BRANCH_REL8 = _BRANCH_REL8
cdef int BRANCH_REL32 = _BRANCH_REL32
cdef int CALL_REL32 = _CALL_REL32
cdef int IAT_CALL = _IAT_CALL
cdef int IAT_JUMP = _IAT_JUMP
cdef int IMAGE_REL32 = _IMAGE_REL32
cdef int JUMP_TABLE = _JUMP_TABLE
cdef int RIP_RELATIVE = _RIP_RELATIVE
cdef int TABLE_SELF_REL32 = _TABLE_SELF_REL32
cdef int TABLE_IMAGE_REL32 = _TABLE_IMAGE_REL32
cdef int64_t MAX_TABLE_ENTRIES = _MAX_TABLE_ENTRIES


# ── capstone entry points, taken from the library the Python binding loaded ──

cdef cs_open_fn p_cs_open
cdef cs_option_fn p_cs_option
cdef cs_malloc_fn p_cs_malloc
cdef cs_disasm_iter_fn p_cs_disasm_iter
cdef cs_free_fn p_cs_free
cdef cs_close_fn p_cs_close


cdef size_t _symbol(str name) except 0:
    address = ctypes.cast(getattr(capstone._cs, name), ctypes.c_void_p).value
    if not address:
        raise ImportError(f"libcapstone has no {name}")
    return <size_t>address


p_cs_open = <cs_open_fn>_symbol("cs_open")
p_cs_option = <cs_option_fn>_symbol("cs_option")
p_cs_malloc = <cs_malloc_fn>_symbol("cs_malloc")
p_cs_disasm_iter = <cs_disasm_iter_fn>_symbol("cs_disasm_iter")
p_cs_free = <cs_free_fn>_symbol("cs_free")
p_cs_close = <cs_close_fn>_symbol("cs_close")

if capstone.cs_version()[:2] != (5, 0):
    raise ImportError(f"hotpatch.analysis._core was built for capstone 5.0, found {capstone.__version__}")


# ── growable C buffers (the decode loop runs without the GIL) ──────────────

cdef struct Ref:
    int64_t insn_rva
    int64_t target          # ABS64: the raw 64-bit value read (the image base is taken off with the GIL)
    int32_t kind
    int32_t operand_offset
    int32_t operand_size


cdef struct Table:
    int64_t insn_rva
    int64_t table_rva
    int32_t entry_kind
    size_t first            # its targets: Decoded.targets[first:first + count]
    size_t count


cdef struct Span:
    int64_t begin
    int64_t end


cdef struct Decoded:
    uint32_t *rvas
    Ref *refs
    Table *tables
    int64_t *targets
    Span *skips             # per function: jump tables found ahead (data, not code)
    int64_t *reads          # per function: places inside it its instructions read (data)
    size_t n_rvas, n_refs, n_tables, n_targets, n_skips, n_reads
    size_t c_rvas, c_refs, c_tables, c_targets, c_skips, c_reads


cdef int _grow(void **data, size_t *capacity, size_t wanted, size_t item) noexcept nogil:
    """Make room for ``wanted`` items; -1 when out of memory (the caller raises with the GIL)."""
    cdef size_t grown = capacity[0] * 2 if capacity[0] else 256
    cdef void *moved
    if wanted <= capacity[0]:
        return 0
    while grown < wanted:
        grown *= 2
    moved = realloc(data[0], grown * item)
    if moved == NULL:
        return -1
    data[0] = moved
    capacity[0] = grown
    return 0


cdef inline int _push_rva(Decoded *out, uint32_t value) noexcept nogil:
    if out.n_rvas == out.c_rvas and _grow(<void **>&out.rvas, &out.c_rvas, out.n_rvas + 1, sizeof(uint32_t)):
        return -1
    out.rvas[out.n_rvas] = value
    out.n_rvas += 1
    return 0


cdef inline int _push_ref(Decoded *out, int kind, int64_t rva, int offset, int size, int64_t target) noexcept nogil:
    cdef Ref *ref
    if out.n_refs == out.c_refs and _grow(<void **>&out.refs, &out.c_refs, out.n_refs + 1, sizeof(Ref)):
        return -1
    ref = &out.refs[out.n_refs]
    ref.kind, ref.insn_rva, ref.operand_offset, ref.operand_size, ref.target = kind, rva, offset, size, target
    out.n_refs += 1
    return 0


cdef void _free_decoded(Decoded *out) noexcept nogil:
    free(out.rvas)
    free(out.refs)
    free(out.tables)
    free(out.targets)
    free(out.skips)
    free(out.reads)
    memset(out, 0, sizeof(Decoded))


cdef inline bint _has_group(cs_detail *detail, int group) noexcept nogil:
    cdef int i
    for i in range(detail.groups_count):
        if detail.groups[i] == group:
            return True
    return False


cdef inline bint _in_ranges(int64_t target, int64_t[:, :] ranges) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(ranges.shape[0]):
        if ranges[i, 0] <= target < ranges[i, 1]:
            return True
    return False


# ── a function's references, packed ─────────────────────────────────────────

cdef packed struct PackedRef:
    int64_t target
    uint32_t insn_rva
    uint8_t kind
    uint8_t operand_offset
    uint8_t operand_size


cdef class RefList:
    """A function's references as packed records; reads as the list of ``(kind, insn_rva,
    operand_offset, operand_size, target)`` tuples the pure-Python twin returns (equal to it, item by
    item), at a tenth of the memory: a large image has millions of references, kept for the whole diff."""
    cdef bytes packed       # PackedRef records
    cdef Py_ssize_t count
    cdef dict wide          # index -> target for the rare targets outside int64 (an ABS64 of garbage)

    @staticmethod
    cdef RefList _of(bytes packed, dict wide):
        cdef RefList out = RefList.__new__(RefList)
        out.packed = packed
        out.count = len(packed) // sizeof(PackedRef)
        out.wide = wide
        return out

    cdef inline object _tuple(self, Py_ssize_t index):
        cdef const PackedRef *ref = (<const PackedRef *><const char *>self.packed) + index
        target = ref.target if self.wide is None or index not in self.wide else self.wide[index]
        return (ref.kind, ref.insn_rva, ref.operand_offset, ref.operand_size, target)

    cpdef list tolist(self):
        cdef Py_ssize_t index
        return [self._tuple(index) for index in range(self.count)]

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        cdef Py_ssize_t at
        if isinstance(index, slice):
            return self.tolist()[index]
        at = index
        if at < 0:
            at += self.count
        if not 0 <= at < self.count:
            raise IndexError("reference index out of range")
        return self._tuple(at)

    def __iter__(self):
        return iter(self.tolist())

    def __eq__(self, other):
        if isinstance(other, RefList):
            return self.packed == (<RefList>other).packed and self.wide == (<RefList>other).wide
        if isinstance(other, (list, tuple)):
            return self.tolist() == list(other)
        return NotImplemented

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None

    def __repr__(self):
        return repr(self.tolist())

    def __reduce__(self):
        return _reflist, (self.packed, self.wide)


def _reflist(bytes packed, dict wide):
    return RefList._of(packed, wide)


cdef object _pack_refs(const Ref *refs, Py_ssize_t count, object image_base):
    """The RefList of ``count`` decoded references (ABS64 values made image-relative here, with the GIL)."""
    cdef bytes packed = PyBytes_FromStringAndSize(NULL, count * sizeof(PackedRef))
    cdef PackedRef *out = <PackedRef *><char *>packed
    cdef Py_ssize_t index
    cdef dict wide = None
    for index in range(count):
        out[index].insn_rva = <uint32_t>refs[index].insn_rva
        out[index].kind = <uint8_t>refs[index].kind
        out[index].operand_offset = <uint8_t>refs[index].operand_offset
        out[index].operand_size = <uint8_t>refs[index].operand_size
        out[index].target = refs[index].target
        if refs[index].kind == ABS64:
            target = (<uint64_t>refs[index].target) - image_base
            if -(1 << 63) <= target < (1 << 63):
                out[index].target = target
            else:
                out[index].target = 0
                if wide is None:
                    wide = {}
                wide[index] = target
    return RefList._of(packed, wide)


# ── decode ─────────────────────────────────────────────────────────────────

# Instructions whose references need capstone's details: relative branches and
# the bounds check of a switch. Everything else is decoded without details
# (about three times faster) and re-decoded only if its text shows a RIP-relative
# operand or a scaled-by-4 index; the result is identical to decoding all with details.
cdef uint8_t WANTS_DETAIL[4096]
memset(WANTS_DETAIL, 0, sizeof(WANTS_DETAIL))
for _id in (X86_INS_CALL, X86_INS_JMP, X86_INS_JAE, X86_INS_JA, X86_INS_JBE, X86_INS_JB, X86_INS_JCXZ,
            X86_INS_JECXZ, X86_INS_JE, X86_INS_JGE, X86_INS_JG, X86_INS_JLE, X86_INS_JL, X86_INS_JNE,
            X86_INS_JNO, X86_INS_JNP, X86_INS_JNS, X86_INS_JO, X86_INS_JP, X86_INS_JRCXZ, X86_INS_JS,
            X86_INS_LOOP, X86_INS_LOOPE, X86_INS_LOOPNE, X86_INS_XBEGIN, X86_INS_CMP):
    WANTS_DETAIL[_id] = 1
if X86_INS_ENDING > 4096:
    raise ImportError("capstone instruction numbering changed; rebuild hotpatch.analysis._core")


cdef inline bint _needs_detail(cs_insn *insn) noexcept nogil:
    if WANTS_DETAIL[insn.id]:
        return True
    if strstr(insn.op_str, "rip") != NULL or strstr(insn.op_str, " + 0x") != NULL:
        return True
    return (insn.id == X86_INS_MOV or insn.id == X86_INS_MOVSXD) and strstr(insn.op_str, "*4") != NULL


cdef struct Function:
    const int64_t *ranges   # (begin, end) pairs
    size_t n_ranges
    size_t refs_begin       # its references and tables start here in the Decoded buffers
    size_t tables_begin


cdef inline bint _in_function(const Function *f, int64_t target) noexcept nogil:
    cdef size_t i
    for i in range(f.n_ranges):
        if f.ranges[2 * i] <= target < f.ranges[2 * i + 1]:
            return True
    return False


cdef int _skip_table(Decoded *out, const Function *f, const Table *table, int64_t rva,
                     size_t range_index) noexcept nogil:
    """A table ahead of the instruction that reads it, inside the function's ranges (this one or one swept
    later), is not code (MSVC puts switch tables right after the function's code, in .pdata fragments too,
    and a leaf without .pdata runs over them)."""
    cdef size_t index
    cdef int64_t start = table.table_rva
    if not table.count:
        return 0
    for index in range(f.n_ranges):
        if f.ranges[2 * index] <= start < f.ranges[2 * index + 1] and \
                (index > range_index or index == range_index and start > rva):
            if out.n_skips == out.c_skips and _grow(<void **>&out.skips, &out.c_skips, out.n_skips + 1,
                                                     sizeof(Span)):
                return -1
            out.skips[out.n_skips].begin = start
            out.skips[out.n_skips].end = start + 4 * <int64_t>table.count
            out.n_skips += 1
            return 0
    return 0


cdef inline bint _is_read(const Decoded *out, int64_t offset) noexcept nogil:
    cdef size_t i
    for i in range(out.n_reads):
        if out.reads[i] == offset:
            return True
    return False


cdef int _add_read(Decoded *out, int64_t target) noexcept nogil:
    if _is_read(out, target):
        return 0
    if out.n_reads == out.c_reads and _grow(<void **>&out.reads, &out.c_reads, out.n_reads + 1, sizeof(int64_t)):
        return -1
    out.reads[out.n_reads] = target
    out.n_reads += 1
    return 0


cdef int64_t _past_data(const Decoded *out, const Function *f, int64_t offset, int64_t end,
                        bint after_end) noexcept nogil:
    """``offset``, or past the data it lies at: jump tables ahead (they can follow each other), and a
    place the function reads that comes right after an instruction that does not fall through (MSVC's
    byte index tables of two-level switches), up to the next branch target ahead or the range end."""
    cdef bint moved = True
    cdef size_t i
    while moved:
        moved = False
        for i in range(out.n_skips):
            if out.skips[i].begin <= offset < out.skips[i].end:
                offset = out.skips[i].end
                moved = True
        if after_end and offset < end and _is_read(out, offset):
            offset = _next_target(out, f, offset, end)
            moved = True
    return offset


cdef int64_t _next_target(const Decoded *out, const Function *f, int64_t offset, int64_t end) noexcept nogil:
    """The first branch or jump-table target in ``(offset, end)``, else ``end``."""
    cdef int64_t best = end, target
    cdef size_t i, k
    for i in range(f.refs_begin, out.n_refs):
        if out.refs[i].kind == BRANCH_REL8 or out.refs[i].kind == BRANCH_REL32:
            target = out.refs[i].target
            if offset < target < best:
                best = target
    for i in range(f.tables_begin, out.n_tables):
        for k in range(out.tables[i].first, out.tables[i].first + out.tables[i].count):
            target = out.targets[k]
            if offset < target < best:
                best = target
    return best


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


cdef inline bint _terminates(const uint8_t *p, Py_ssize_t length) noexcept nogil:
    """Same as ``hotpatch.analysis.flow.terminates``: ret, jmp, ud2, int3, hlt never fall through."""
    cdef Py_ssize_t at = _opcode_at(p, length)
    cdef uint8_t op
    if at >= length:
        return False
    op = p[at]
    if op == 0xC3 or op == 0xC2 or op == 0xCB or op == 0xCA or op == 0xE9 or op == 0xEB or op == 0xCC \
            or op == 0xF4:
        return True
    if at + 1 >= length:
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


cdef int _plain_branch(Decoded *out, const uint8_t *p, size_t avail, int64_t rva) noexcept nogil:
    """Length of a prefix-free jcc/jmp/call with an 8- or 32-bit displacement at ``p`` (its reference
    appended, as capstone's details would give it), 0 for anything else, -1 when out of memory."""
    cdef int length, operand_offset, operand_size, kind
    cdef int32_t displacement32
    cdef int64_t displacement
    if avail >= 5 and (p[0] == 0xE8 or p[0] == 0xE9):
        kind, length, operand_offset, operand_size = (CALL_REL32 if p[0] == 0xE8 else BRANCH_REL32), 5, 1, 4
        memcpy(&displacement32, p + 1, 4)
        displacement = displacement32
    elif avail >= 2 and (p[0] == 0xEB or 0x70 <= p[0] <= 0x7F):
        kind, length, operand_offset, operand_size = BRANCH_REL8, 2, 1, 1
        displacement = <int8_t>p[1]
    elif avail >= 6 and p[0] == 0x0F and 0x80 <= p[1] <= 0x8F:
        kind, length, operand_offset, operand_size = BRANCH_REL32, 6, 2, 4
        memcpy(&displacement32, p + 2, 4)
        displacement = displacement32
    else:
        return 0
    if _push_ref(out, kind, rva, operand_offset, operand_size, rva + length + displacement):
        return -1
    return length


cdef inline size_t _lower_bound(const uint32_t *values, size_t count, int64_t key) noexcept nogil:
    cdef size_t lo = 0, hi = count, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if <int64_t>values[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef class _Decoder:
    """One thread's decoder: its own capstone handles and scratch state over one image's flat context."""
    cdef csh handle
    cdef cs_insn *insn
    cdef csh lite_handle
    cdef cs_insn *lite
    cdef object keep  # the Python objects the pointers below point into
    cdef const uint8_t *base
    cdef size_t memlen
    cdef const uint32_t *relocations
    cdef size_t nrelocs
    cdef const uint32_t *iat  # sorted IAT slot RVAs
    cdef size_t niat
    cdef int64_t first_section_rva
    cdef int64_t lea_value[512]
    cdef uint8_t lea_known[512]

    def __cinit__(self, ctx):
        cdef const uint8_t[:] memory = ctx.memory
        cdef const uint32_t[:] relocations = ctx.relocations
        cdef const uint32_t[:] iat
        if p_cs_open(CS_ARCH_X86, CS_MODE_64, &self.handle) != CS_ERR_OK:
            raise RuntimeError("cs_open failed")
        p_cs_option(self.handle, CS_OPT_DETAIL, CS_OPT_ON)
        self.insn = p_cs_malloc(self.handle)
        if p_cs_open(CS_ARCH_X86, CS_MODE_64, &self.lite_handle) != CS_ERR_OK:
            raise RuntimeError("cs_open failed")
        self.lite = p_cs_malloc(self.lite_handle)
        if self.insn == NULL or self.lite == NULL:
            raise MemoryError()
        if X86_REG_ENDING > 512:
            raise ImportError("capstone register numbering changed; rebuild hotpatch.analysis._core")
        iat_slots = array("I", sorted(ctx.iat))
        iat_slots.append(0)  # never empty, so a pointer to its first item always exists
        iat = iat_slots
        self.keep = (memory, relocations, iat)
        self.memlen = memory.shape[0]
        self.base = &memory[0] if self.memlen else NULL
        self.nrelocs = relocations.shape[0]
        self.relocations = &relocations[0] if self.nrelocs else NULL
        self.niat = iat.shape[0] - 1
        self.iat = &iat[0]
        self.first_section_rva = ctx.first_section_rva

    def __dealloc__(self):
        if self.insn != NULL:
            p_cs_free(self.insn, 1)
        if self.lite != NULL:
            p_cs_free(self.lite, 1)
        if self.handle:
            p_cs_close(&self.handle)
        if self.lite_handle:
            p_cs_close(&self.lite_handle)

    cdef inline bint _is_iat(self, int64_t target) noexcept nogil:
        cdef size_t index
        if self.niat == 0 or target < <int64_t>self.iat[0] or target > <int64_t>self.iat[self.niat - 1]:
            return False
        index = _lower_bound(self.iat, self.niat, target)
        return index < self.niat and <int64_t>self.iat[index] == target

    cdef int decode_one(self, Decoded *out, Function *f) noexcept nogil:
        """Instructions, references and jump tables of one function into ``out``; -1 when out of memory."""
        cdef const uint8_t *base = self.base
        cdef size_t memlen = self.memlen
        cdef int64_t begin, end, offset, rva, last_cmp, reloc
        cdef const uint8_t *code
        cdef size_t remaining, index, range_index, found
        cdef uint64_t address, value
        cdef int length, interesting
        cdef bint after_end
        out.n_skips = 0
        out.n_reads = 0
        if base == NULL:
            return 0
        for range_index in range(f.n_ranges):
            begin = f.ranges[2 * range_index]
            end = min(f.ranges[2 * range_index + 1], <int64_t>memlen)
            memset(self.lea_known, 0, sizeof(self.lea_known))
            last_cmp = -1
            offset = begin
            after_end = False  # the last instruction swept does not fall through
            while offset < end:
                if out.n_skips or after_end:
                    offset = _past_data(out, f, offset, end, after_end)
                    if offset >= end:
                        break
                length = hp_fast_length(base + offset, <size_t>(end - offset), &interesting)
                if length == 0 and interesting:
                    # a relative branch: without prefixes its target is all there is to know
                    length = _plain_branch(out, base + offset, <size_t>(end - offset), offset)
                    if length < 0:
                        return -1
                    interesting = length == 0
                if length == 0 and not interesting:
                    code = base + offset
                    remaining = <size_t>(end - offset)
                    address = <uint64_t>offset
                    if not p_cs_disasm_iter(self.lite_handle, &code, &remaining, &address, self.lite):
                        offset += 1  # an undecodable byte: skip it and resume
                        after_end = False
                        continue
                    length = self.lite.size
                    interesting = _needs_detail(self.lite)
                if interesting:
                    code = base + offset
                    remaining = <size_t>(end - offset)
                    address = <uint64_t>offset
                    if not p_cs_disasm_iter(self.handle, &code, &remaining, &address, self.insn):
                        offset += 1
                        after_end = False
                        continue
                    length = self.insn.size
                    found = out.n_tables
                    if self._detailed(out, f, self.insn, &last_cmp):
                        return -1
                    if out.n_tables > found and _skip_table(out, f, &out.tables[out.n_tables - 1], offset,
                                                            range_index):
                        return -1
                rva = offset
                if _push_rva(out, <uint32_t>rva):
                    return -1
                if _terminates(base + rva, length):
                    after_end = True
                elif not (after_end and _is_nop(base + rva, length)):
                    after_end = False
                index = _lower_bound(self.relocations, self.nrelocs, rva)
                while index < self.nrelocs and self.relocations[index] < rva + length:
                    reloc = self.relocations[index]
                    value = 0
                    if reloc + 8 <= <int64_t>memlen:
                        memcpy(&value, base + reloc, 8)
                    if _push_ref(out, ABS64, rva, <int>(reloc - rva), 8, <int64_t>value):
                        return -1
                    index += 1
                offset += length
        return 0

    cdef int _detailed(self, Decoded *out, const Function *f, cs_insn *insn, int64_t *last_cmp) noexcept nogil:
        """References of one instruction decoded with details (branch, RIP operand, switch)."""
        cdef cs_detail *detail = insn.detail
        cdef cs_x86 *x = &detail.x86
        cdef cs_x86_op *op
        cdef int64_t rva = <int64_t>insn.address, target
        cdef int size = insn.size, kind, i
        cdef bint is_call
        is_call = _has_group(detail, CS_GRP_CALL)
        if _has_group(detail, CS_GRP_BRANCH_RELATIVE) and x.encoding.imm_offset \
                and (x.encoding.imm_size == 1 or x.encoding.imm_size == 4):
            target = x.operands[0].imm
            if x.encoding.imm_size == 1:
                kind = BRANCH_REL8
            elif is_call:
                kind = CALL_REL32
            else:
                kind = BRANCH_REL32
            if _push_ref(out, kind, rva, x.encoding.imm_offset, x.encoding.imm_size, target):
                return -1
        elif x.encoding.disp_offset:
            for i in range(x.op_count):
                op = &x.operands[i]
                if op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP:
                    target = rva + size + op.mem.disp
                    kind = RIP_RELATIVE
                    if self._is_iat(target):
                        if is_call:
                            kind = IAT_CALL
                        elif _has_group(detail, CS_GRP_JUMP):
                            kind = IAT_JUMP
                    # a RIP-relative displacement is always 32 bits; capstone 5 says 2 after a 66 prefix
                    # (movdqa xmm0, [rip+X] is 66 0F 6F 05 disp32), which left half of it unmasked
                    if _push_ref(out, kind, rva, x.encoding.disp_offset, 4, target):
                        return -1
                    if insn.id == X86_INS_LEA:
                        self.lea_value[x.operands[0].reg] = target
                        self.lea_known[x.operands[0].reg] = 1
                    elif _in_function(f, target) and _add_read(out, target):
                        return -1
                    break
                if op.type == X86_OP_MEM and x.encoding.disp_size == 4 and 0 < op.mem.base < 512 \
                        and self.lea_known[op.mem.base] and self.lea_value[op.mem.base] == 0 \
                        and self.first_section_rva <= op.mem.disp < <int64_t>self.memlen:
                    # MSVC addresses tables as [image base register + index + RVA]
                    if _push_ref(out, IMAGE_REL32, rva, x.encoding.disp_offset, 4, op.mem.disp):
                        return -1
                    if insn.id != X86_INS_LEA and _in_function(f, op.mem.disp) and _add_read(out, op.mem.disp):
                        return -1
                    break
        if insn.id == X86_INS_CMP:
            if x.op_count == 2 and x.operands[0].type == X86_OP_REG \
                    and x.operands[1].type == X86_OP_IMM:
                last_cmp[0] = x.operands[1].imm
            else:
                last_cmp[0] = -1
        elif insn.id == X86_INS_MOVSXD or insn.id == X86_INS_MOV:
            return self._jump_table(out, f, insn, last_cmp[0])
        return 0

    cdef int _jump_table(self, Decoded *out, const Function *f, cs_insn *insn, int64_t last_cmp) noexcept nogil:
        cdef cs_x86 *x = &insn.detail.x86
        cdef x86_op_mem *mem
        cdef int64_t table, base_target
        cdef int entry_kind
        cdef Table *entry
        if x.op_count != 2 or x.operands[1].type != X86_OP_MEM:
            return 0
        mem = &x.operands[1].mem
        if mem.index == 0 or mem.scale != 4 or mem.base < 0 or mem.base >= 512 or not self.lea_known[mem.base]:
            return 0
        base_target = self.lea_value[mem.base]
        if insn.id == X86_INS_MOVSXD and mem.disp == 0:
            table = base_target
            entry_kind = TABLE_SELF_REL32
        elif insn.id == X86_INS_MOV and base_target == 0 and mem.disp > 0 and x.operands[0].size == 4:
            table = mem.disp
            entry_kind = TABLE_IMAGE_REL32
        else:
            return 0
        if out.n_tables == out.c_tables and _grow(<void **>&out.tables, &out.c_tables, out.n_tables + 1,
                                                   sizeof(Table)):
            return -1
        entry = &out.tables[out.n_tables]
        entry.insn_rva, entry.table_rva, entry.entry_kind = <int64_t>insn.address, table, entry_kind
        entry.first = out.n_targets
        if self._table_targets(out, f, table, entry_kind, last_cmp):
            return -1
        entry = &out.tables[out.n_tables]
        entry.count = out.n_targets - entry.first
        out.n_tables += 1
        return _push_ref(out, JUMP_TABLE, <int64_t>insn.address, 0, 0, table)

    cdef int _table_targets(self, Decoded *out, const Function *f, int64_t table, int entry_kind,
                            int64_t last_cmp) noexcept nogil:
        cdef const uint8_t *base = self.base
        cdef int64_t memlen = <int64_t>self.memlen
        cdef int64_t count = last_cmp + 1 if 0 <= last_cmp < MAX_TABLE_ENTRIES else MAX_TABLE_ENTRIES
        cdef int64_t index, at, target
        cdef int signed_entry
        cdef unsigned int unsigned_entry
        for index in range(count):
            at = table + 4 * index
            if at < 0 or at + 4 > memlen:
                break
            if entry_kind == TABLE_SELF_REL32:
                memcpy(&signed_entry, base + at, 4)
                target = table + signed_entry
            else:
                memcpy(&unsigned_entry, base + at, 4)
                target = unsigned_entry
            if not _in_function(f, target):
                break
            if out.n_targets == out.c_targets and _grow(<void **>&out.targets, &out.c_targets, out.n_targets + 1,
                                                         sizeof(int64_t)):
                return -1
            out.targets[out.n_targets] = target
            out.n_targets += 1
        return 0


cdef int64_t[:, :] _ranges_view(tuple ranges_tuple):
    flat = array("q")
    for r in ranges_tuple:
        flat.append(r[0])
        flat.append(r[1])
    return memoryview(flat).cast("B").cast("q", (len(ranges_tuple), 2))


def terminates(const uint8_t[:] code):
    """Whether the instruction filling ``code`` never falls through (``hotpatch.analysis.flow.terminates``). For tests."""
    return bool(_terminates(&code[0], code.shape[0])) if code.shape[0] else False


def fast_length(const uint8_t[:] code):
    """(length, interesting) from the native fast decoder; length 0 means "ask capstone". For tests."""
    cdef int interesting = 0
    cdef int length = hp_fast_length(&code[0], code.shape[0], &interesting) if code.shape[0] else 0
    return length, bool(interesting)


cdef csh _text_handle = 0
cdef cs_insn *_text_insn = NULL


def instruction_text(const uint8_t[:] memory, int64_t begin, int64_t end):
    """(rva, mnemonic, operands) of the instructions in [begin, end), up to the first undecodable byte."""
    global _text_handle, _text_insn
    cdef const uint8_t *code
    cdef size_t remaining
    cdef uint64_t address
    cdef list out = []
    if _text_insn == NULL:
        if p_cs_open(CS_ARCH_X86, CS_MODE_64, &_text_handle) != CS_ERR_OK:
            raise RuntimeError("cs_open failed")
        _text_insn = p_cs_malloc(_text_handle)
        if _text_insn == NULL:
            raise MemoryError()
    end = min(end, <int64_t>memory.shape[0])
    if begin < 0 or begin >= end:
        return out
    code = &memory[begin]
    remaining = <size_t>(end - begin)
    address = <uint64_t>begin
    while remaining and p_cs_disasm_iter(_text_handle, &code, &remaining, &address, _text_insn):
        out.append((_text_insn.address, (<bytes>_text_insn.mnemonic).decode(), (<bytes>_text_insn.op_str).decode()))
    return out


#: functions decoded per pass without the GIL (bounds the C buffers; Python objects are built between passes)
cdef Py_ssize_t BATCH = 2048


def decode(ctx, items):
    """(insn_rvas, refs, tables) of each ``(rva, ranges)`` item. The decode loop holds no GIL, so the
    two images of a diff decode in parallel threads."""
    cdef _Decoder decoder = _Decoder(ctx)
    cdef Decoded out
    cdef Function f
    cdef Py_ssize_t n = len(items), start, stop, i, k
    cdef size_t *ends
    cdef const int64_t[:] flat_view
    cdef const int64_t *flat
    cdef const Table *table
    cdef size_t r0, f0, t0
    cdef int failed = 0
    cdef object image_base = ctx.image_base
    flat_ranges = array("q")
    firsts = array("Q", bytes(8 * (n + 1)))  # item i's ranges: flat[2 * firsts[i]:2 * firsts[i + 1]]
    cdef uint64_t[:] first = firsts
    for i in range(n):
        for begin, stop_rva in items[i][1]:
            flat_ranges.append(begin)
            flat_ranges.append(stop_rva)
        first[i + 1] = len(flat_ranges) // 2
    flat_ranges.append(0)  # never empty
    flat_view = flat_ranges
    flat = &flat_view[0]
    results = []
    memset(&out, 0, sizeof(Decoded))
    ends = <size_t *>malloc(3 * (BATCH + 1) * sizeof(size_t))
    if ends == NULL:
        raise MemoryError()
    try:
        for start in range(0, n, BATCH):
            stop = min(start + BATCH, n)
            out.n_rvas = out.n_refs = out.n_tables = out.n_targets = 0
            ends[0] = ends[1] = ends[2] = 0
            with nogil:
                for i in range(start, stop):
                    f.ranges = flat + 2 * first[i]
                    f.n_ranges = first[i + 1] - first[i]
                    f.refs_begin = out.n_refs
                    f.tables_begin = out.n_tables
                    if decoder.decode_one(&out, &f):
                        failed = 1
                        break
                    k = 3 * (i - start + 1)
                    ends[k], ends[k + 1], ends[k + 2] = out.n_rvas, out.n_refs, out.n_tables
            if failed:
                raise MemoryError()
            for i in range(stop - start):
                k = 3 * i
                rvas = array("I")
                rvas.frombytes(PyBytes_FromStringAndSize(<char *>(out.rvas + ends[k]),
                                                         (ends[k + 3] - ends[k]) * sizeof(uint32_t)))
                refs = _pack_refs(out.refs + ends[k + 1], ends[k + 4] - ends[k + 1], image_base)
                tables = []
                for t0 in range(ends[k + 2], ends[k + 5]):
                    table = &out.tables[t0]
                    tables.append((table.insn_rva, table.table_rva, table.entry_kind,
                                   tuple([out.targets[f0] for f0 in range(table.first, table.first + table.count)])))
                results.append((rvas, refs, tables))
    finally:
        _free_decoded(&out)
        free(ends)
    return results


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
