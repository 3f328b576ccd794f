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


# ── a growable uint32 buffer for instruction RVAs ──────────────────────────

cdef struct U32Buffer:
    uint32_t *data
    size_t length
    size_t capacity


cdef int _push(U32Buffer *buf, uint32_t value) except -1:
    cdef uint32_t *grown
    if buf.length == buf.capacity:
        buf.capacity = buf.capacity * 2 if buf.capacity else 256
        grown = <uint32_t *>realloc(buf.data, buf.capacity * sizeof(uint32_t))
        if grown == NULL:
            raise MemoryError()
        buf.data = grown
    buf.data[buf.length] = value
    buf.length += 1
    return 0


cdef object _to_array(U32Buffer *buf):
    out = array("I")
    out.frombytes(PyBytes_FromStringAndSize(<char *>buf.data, buf.length * sizeof(uint32_t)))
    return out


cdef inline bint _has_group(cs_detail *detail, int group) noexcept nogil:
    cdef int i
    for i in range(detail.groups_count):
        if detail.groups[i] == group:
            return True
    return False


cdef inline size_t _lower_bound(const uint32_t[:] values, int64_t key) noexcept nogil:
    cdef size_t lo = 0, hi = values.shape[0], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if <int64_t>values[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline bint _in_ranges(int64_t target, int64_t[:, :] ranges) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(ranges.shape[0]):
        if ranges[i, 0] <= target < ranges[i, 1]:
            return True
    return False


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


cdef int _skip_table(list skips, tuple table, int64_t rva, int64_t[:, :] ranges, Py_ssize_t range_index) except -1:
    """A table ahead of the instruction that reads it, inside the function's ranges (this one or one swept
    later), is not code (MSVC puts switch tables right after the function's code, in .pdata fragments too,
    and a leaf without .pdata runs over them)."""
    cdef Py_ssize_t index
    cdef int64_t start = table[1]
    if not table[3]:
        return 0
    for index in range(ranges.shape[0]):
        if ranges[index, 0] <= start < ranges[index, 1] and \
                (index > range_index or index == range_index and start > rva):
            skips.append((start, start + 4 * len(table[3])))
            return 0
    return 0


cdef int64_t _past_data(list skips, set reads, list refs, list tables, int64_t offset, int64_t end,
                        bint after_end) except? -1:
    """``offset``, or past the data it lies at: jump tables ahead (they can follow each other), and a
    place the function reads that comes right after an instruction that does not fall through (MSVC's
    byte index tables of two-level switches), up to the next branch target ahead or the range end."""
    cdef bint moved = True
    while moved:
        moved = False
        for begin, stop in skips:
            if begin <= offset < stop:
                offset = stop
                moved = True
        if after_end and offset < end and offset in reads:
            offset = _next_target(refs, tables, offset, end)
            moved = True
    return offset


cdef int64_t _next_target(list refs, list tables, int64_t offset, int64_t end) except? -1:
    """The first branch or jump-table target in ``(offset, end)``, else ``end``."""
    cdef int64_t best = end, target
    for ref in refs:
        if ref[0] == BRANCH_REL8 or ref[0] == BRANCH_REL32:
            target = ref[4]
            if offset < target < best:
                best = target
    for table in tables:
        for target in table[3]:
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


cdef int _plain_branch(const uint8_t *p, size_t avail, int64_t rva, list refs) except -1:
    """Length of a prefix-free jcc/jmp/call with an 8- or 32-bit displacement at ``p`` (its reference
    appended, as capstone's details would give it), or 0 for anything else."""
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
    refs.append((kind, rva, operand_offset, operand_size, rva + length + displacement))
    return length


cdef class _Decoder:
    cdef csh handle
    cdef cs_insn *insn
    cdef csh lite_handle
    cdef cs_insn *lite
    cdef const uint8_t[:] memory
    cdef const uint32_t[:] relocations
    cdef object iat
    cdef object image_base
    cdef int64_t iat_low, iat_high, first_section_rva
    cdef int64_t lea_value[512]
    cdef uint8_t lea_known[512]

    def __cinit__(self, ctx):
        if p_cs_open(CS_ARCH_X86, CS_MODE_64, &self.handle) != CS_ERR_OK:
            raise RuntimeError("cs_open failed")
        p_cs_option(self.handle, CS_OPT_DETAIL, CS_OPT_ON)
        self.insn = p_cs_malloc(self.handle)
        if p_cs_open(CS_ARCH_X86, CS_MODE_64, &self.lite_handle) != CS_ERR_OK:
            raise RuntimeError("cs_open failed")
        self.lite = p_cs_malloc(self.lite_handle)
        if self.insn == NULL or self.lite == NULL:
            raise MemoryError()
        self.memory = ctx.memory
        self.relocations = ctx.relocations
        self.iat = ctx.iat
        self.image_base = ctx.image_base
        self.first_section_rva = ctx.first_section_rva
        self.iat_low = min(self.iat) if self.iat else 1
        self.iat_high = max(self.iat) if self.iat else 0
        if X86_REG_ENDING > 512:
            raise ImportError("capstone register numbering changed; rebuild hotpatch.analysis._core")

    def __dealloc__(self):
        if self.insn != NULL:
            p_cs_free(self.insn, 1)
        if self.lite != NULL:
            p_cs_free(self.lite, 1)
        if self.handle:
            p_cs_close(&self.handle)
        if self.lite_handle:
            p_cs_close(&self.lite_handle)

    cdef inline bint _is_iat(self, int64_t target):
        return self.iat_low <= target <= self.iat_high and target in self.iat

    cdef tuple decode_one(self, tuple ranges_tuple):
        cdef U32Buffer rvas
        cdef list refs = []
        cdef list tables = []
        cdef const uint8_t *base = &self.memory[0]
        cdef size_t memlen = self.memory.shape[0]
        cdef int64_t begin, end, offset, rva, last_cmp
        cdef const uint8_t *code
        cdef size_t remaining, index, nrelocs = self.relocations.shape[0]
        cdef uint64_t address, value
        cdef cs_insn *insn = self.insn
        cdef cs_insn *lite = self.lite
        cdef int length, interesting
        cdef int64_t[:, :] ranges = _ranges_view(ranges_tuple)
        cdef int64_t reloc
        cdef Py_ssize_t range_index
        cdef bint after_end
        rvas.data = NULL
        rvas.length = 0
        rvas.capacity = 0
        try:
            skips = []  # jump tables found ahead in this function: data, not code
            reads = set()  # places inside the function its instructions read (not lea): data
            for range_index in range(len(ranges_tuple)):
                r = ranges_tuple[range_index]
                begin = r[0]
                end = min(<int64_t>r[1], <int64_t>memlen)
                memset(self.lea_known, 0, sizeof(self.lea_known))
                last_cmp = -1
                offset = begin
                after_end = False  # the last instruction swept does not fall through
                while offset < end:
                    if skips or after_end:
                        offset = _past_data(skips, reads, refs, tables, offset, end, after_end)
                        if offset >= end:
                            break
                    length = hp_fast_length(base + offset, <size_t>(end - offset), &interesting)
                    if length == 0 and interesting:
                        # a relative branch: without prefixes its target is all there is to know
                        length = _plain_branch(base + offset, <size_t>(end - offset), offset, refs)
                        interesting = length == 0
                    if length == 0 and not interesting:
                        code = base + offset
                        remaining = <size_t>(end - offset)
                        address = <uint64_t>offset
                        if not p_cs_disasm_iter(self.lite_handle, &code, &remaining, &address, lite):
                            offset += 1  # an undecodable byte: skip it and resume
                            after_end = False
                            continue
                        length = lite.size
                        interesting = _needs_detail(lite)
                    if interesting:
                        code = base + offset
                        remaining = <size_t>(end - offset)
                        address = <uint64_t>offset
                        if not p_cs_disasm_iter(self.handle, &code, &remaining, &address, insn):
                            offset += 1
                            after_end = False
                            continue
                        length = insn.size
                        found = len(tables)
                        self._detailed(insn, &last_cmp, ranges, refs, tables, reads)
                        if len(tables) > found:
                            _skip_table(skips, tables[len(tables) - 1], offset, ranges, range_index)
                    rva = offset
                    _push(&rvas, <uint32_t>rva)
                    if _terminates(base + rva, length):
                        after_end = True
                    elif not (after_end and _is_nop(base + rva, length)):
                        after_end = False
                    index = _lower_bound(self.relocations, rva)
                    while index < nrelocs and self.relocations[index] < rva + length:
                        reloc = self.relocations[index]
                        value = 0
                        if reloc + 8 <= memlen:
                            memcpy(&value, base + reloc, 8)
                        refs.append((ABS64, rva, reloc - rva, 8, value - self.image_base))
                        index += 1
                    offset += length
            return (_to_array(&rvas), refs, tables)
        finally:
            free(rvas.data)

    cdef int _detailed(self, cs_insn *insn, int64_t *last_cmp, int64_t[:, :] ranges, list refs,
                       list tables, set reads) except -1:
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
            refs.append((kind, rva, x.encoding.imm_offset, x.encoding.imm_size, target))
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
                    refs.append((kind, rva, x.encoding.disp_offset, 4, target))
                    if insn.id == X86_INS_LEA:
                        self.lea_value[x.operands[0].reg] = target
                        self.lea_known[x.operands[0].reg] = 1
                    elif _in_ranges(target, ranges):
                        reads.add(target)
                    break
                if op.type == X86_OP_MEM and x.encoding.disp_size == 4 and 0 < op.mem.base < 512 \
                        and self.lea_known[op.mem.base] and self.lea_value[op.mem.base] == 0 \
                        and self.first_section_rva <= op.mem.disp < <int64_t>self.memory.shape[0]:
                    # MSVC addresses tables as [image base register + index + RVA]
                    refs.append((IMAGE_REL32, rva, x.encoding.disp_offset, 4, op.mem.disp))
                    if insn.id != X86_INS_LEA and _in_ranges(op.mem.disp, ranges):
                        reads.add(op.mem.disp)
                    break
        if insn.id == X86_INS_CMP:
            if x.op_count == 2 and x.operands[0].type == X86_OP_REG \
                    and x.operands[1].type == X86_OP_IMM:
                last_cmp[0] = x.operands[1].imm
            else:
                last_cmp[0] = -1
        elif insn.id == X86_INS_MOVSXD or insn.id == X86_INS_MOV:
            self._jump_table(insn, last_cmp[0], ranges, refs, tables)
        return 0

    cdef int _jump_table(self, cs_insn *insn, int64_t last_cmp, int64_t[:, :] ranges,
                         list refs, list tables) except -1:
        cdef cs_x86 *x = &insn.detail.x86
        cdef x86_op_mem *mem
        cdef int64_t table, base_target
        cdef int entry_kind
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
        targets = self._table_targets(table, entry_kind, last_cmp, ranges)
        refs.append((JUMP_TABLE, insn.address, 0, 0, table))
        tables.append((insn.address, table, entry_kind, targets))
        return 0

    cdef tuple _table_targets(self, int64_t table, int entry_kind, int64_t last_cmp, int64_t[:, :] ranges):
        cdef const uint8_t *base = &self.memory[0]
        cdef int64_t memlen = self.memory.shape[0]
        cdef int64_t count = last_cmp + 1 if 0 <= last_cmp < MAX_TABLE_ENTRIES else MAX_TABLE_ENTRIES
        cdef int64_t index, at, target
        cdef list out = []
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
            if not _in_ranges(target, ranges):
                break
            out.append(target)
        return tuple(out)


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


def decode(ctx, items):
    decoder = _Decoder(ctx)
    return [(<_Decoder>decoder).decode_one(ranges) for _, ranges in items]


# ── fingerprint ────────────────────────────────────────────────────────────

cdef struct Regions:
    int64_t begin[96]
    int64_t end[96]
    char code[96]
    int count


cdef int _append(bytearray out, const char *text, Py_ssize_t length) except -1:
    out.extend(PyBytes_FromStringAndSize(text, length))
    return 0


def fingerprint(ctx, int64_t rva, tuple ranges_tuple, list refs, list tables, function_starts):
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
                          int64_t rva, tuple ranges_tuple, list refs, list tables):
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
                index = _lower_bound(starts, target)
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
