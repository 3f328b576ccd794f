# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled x86-64 decoder: ``decode`` (instructions, references, jump tables of each function) and
``instruction_text`` over capstone's C API; ``_core`` gives them with the fingerprints.

Line for line the same contract as ``hotpatch.analysis._reference`` (read its
docstring); the tests check that both give identical results.
"""

from array import array


from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strstr
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython cimport array as carray

from hotpatch.analysis.includes.capstone cimport *
from hotpatch.analysis._capstone_api cimport load_entry_points, open_x86

from hotpatch.analysis._buffers cimport Decoded, Ref, Span, Table, _free_decoded, _grow, _push_ref, _push_rva
from hotpatch.analysis._reflist cimport pack_refs
from hotpatch.analysis._shared cimport _is_nop, _lower_bound, _terminates
from hotpatch.analysis._slots cimport Maker, make_analysis, maker_of


cdef extern from "x86_fastlen.h" nogil:
    int hp_fast_length(const uint8_t *code, size_t avail, int *interesting)
    ctypedef struct hp_fast_insn:
        int reasons
        int64_t bound
        int modrm_offset
        int base_reg
        uint8_t rex
        uint8_t opsize16
        uint8_t two_byte
        uint8_t opcode
    int hp_fast_decode(const uint8_t *code, size_t avail, hp_fast_insn *insn)
    enum:
        HP_BRANCH
        HP_RIP
        HP_DISP32
        HP_ABSOLUTE
        HP_SCALE4
        HP_COMPARE
        HP_BOUND

from hotpatch.analysis._refkinds cimport (
    ABS64, BRANCH_REL8, BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP, IMAGE_REL32, JUMP_TABLE, MAX_TABLE_ENTRIES,
    RIP_RELATIVE, TABLE_IMAGE_REL32, TABLE_SELF_REL32,
)

# ── capstone entry points, taken from the library the Python binding loaded ──

cdef CapstoneAPI cs
load_entry_points(&cs, "hotpatch.analysis._decode")


cdef inline bint _has_group(cs_detail *detail, int group) noexcept nogil:
    cdef int i
    for i in range(detail.groups_count):
        if detail.groups[i] == group:
            return True
    return False


# ── decode ─────────────────────────────────────────────────────────────────

#: capstone's x86 numbers (registers, instructions, operand types, groups) by their names in the binding's
#: ``capstone.x86_const``, as the header the compiled modules are built against defines them: the verdict
#: reads them here (``hotpatch.analysis.api.x86_numbers``) rather than import the binding for a few numbers
X86_NUMBERS = {
    "X86_REG_RAX": X86_REG_RAX, "X86_REG_RBX": X86_REG_RBX, "X86_REG_RCX": X86_REG_RCX, "X86_REG_RDX": X86_REG_RDX,
    "X86_REG_RSI": X86_REG_RSI, "X86_REG_RDI": X86_REG_RDI, "X86_REG_RBP": X86_REG_RBP, "X86_REG_RSP": X86_REG_RSP,
    "X86_REG_R8": X86_REG_R8, "X86_REG_R9": X86_REG_R9, "X86_REG_R10": X86_REG_R10, "X86_REG_R11": X86_REG_R11,
    "X86_REG_R12": X86_REG_R12, "X86_REG_R13": X86_REG_R13, "X86_REG_R14": X86_REG_R14, "X86_REG_R15": X86_REG_R15,
    "X86_REG_EAX": X86_REG_EAX, "X86_REG_EBX": X86_REG_EBX, "X86_REG_ECX": X86_REG_ECX, "X86_REG_EDX": X86_REG_EDX,
    "X86_REG_ESI": X86_REG_ESI, "X86_REG_EDI": X86_REG_EDI, "X86_REG_EBP": X86_REG_EBP, "X86_REG_ESP": X86_REG_ESP,
    "X86_REG_AX": X86_REG_AX, "X86_REG_BX": X86_REG_BX, "X86_REG_CX": X86_REG_CX, "X86_REG_DX": X86_REG_DX,
    "X86_REG_SI": X86_REG_SI, "X86_REG_DI": X86_REG_DI, "X86_REG_BP": X86_REG_BP, "X86_REG_SP": X86_REG_SP,
    "X86_REG_AL": X86_REG_AL, "X86_REG_AH": X86_REG_AH, "X86_REG_BL": X86_REG_BL, "X86_REG_BH": X86_REG_BH,
    "X86_REG_CL": X86_REG_CL, "X86_REG_CH": X86_REG_CH, "X86_REG_DL": X86_REG_DL, "X86_REG_DH": X86_REG_DH,
    "X86_REG_SIL": X86_REG_SIL, "X86_REG_DIL": X86_REG_DIL, "X86_REG_BPL": X86_REG_BPL, "X86_REG_SPL": X86_REG_SPL,
    "X86_REG_R8D": X86_REG_R8D, "X86_REG_R9D": X86_REG_R9D, "X86_REG_R10D": X86_REG_R10D,
    "X86_REG_R11D": X86_REG_R11D, "X86_REG_R12D": X86_REG_R12D, "X86_REG_R13D": X86_REG_R13D,
    "X86_REG_R14D": X86_REG_R14D, "X86_REG_R15D": X86_REG_R15D, "X86_REG_R8W": X86_REG_R8W,
    "X86_REG_R9W": X86_REG_R9W, "X86_REG_R10W": X86_REG_R10W, "X86_REG_R11W": X86_REG_R11W,
    "X86_REG_R12W": X86_REG_R12W, "X86_REG_R13W": X86_REG_R13W, "X86_REG_R14W": X86_REG_R14W,
    "X86_REG_R15W": X86_REG_R15W, "X86_REG_R8B": X86_REG_R8B, "X86_REG_R9B": X86_REG_R9B,
    "X86_REG_R10B": X86_REG_R10B, "X86_REG_R11B": X86_REG_R11B, "X86_REG_R12B": X86_REG_R12B,
    "X86_REG_R13B": X86_REG_R13B, "X86_REG_R14B": X86_REG_R14B, "X86_REG_R15B": X86_REG_R15B,
    "X86_REG_RIP": X86_REG_RIP, "X86_REG_ENDING": X86_REG_ENDING, "X86_INS_RET": X86_INS_RET,
    "X86_INS_RETF": X86_INS_RETF, "X86_INS_INT3": X86_INS_INT3, "X86_INS_UD2": X86_INS_UD2,
    "X86_INS_HLT": X86_INS_HLT, "X86_INS_CALL": X86_INS_CALL, "X86_INS_JMP": X86_INS_JMP, "X86_INS_MOV": X86_INS_MOV,
    "X86_INS_LEA": X86_INS_LEA, "X86_INS_CMP": X86_INS_CMP, "X86_INS_MOVSXD": X86_INS_MOVSXD,
    "X86_INS_XOR": X86_INS_XOR, "X86_INS_SUB": X86_INS_SUB, "X86_INS_PXOR": X86_INS_PXOR, "X86_INS_SBB": X86_INS_SBB,
    "X86_INS_ENDING": X86_INS_ENDING, "X86_OP_REG": X86_OP_REG, "X86_OP_IMM": X86_OP_IMM, "X86_OP_MEM": X86_OP_MEM,
    "X86_GRP_JUMP": X86_GRP_JUMP
}


# capstone's numbers of the registers lea writes, by operand size (16, 32, 64 bits) and ModRM.reg + 8 * REX.R
cdef int LEA_REGISTER[3][16]
LEA_REGISTER[:] = [
    [X86_REG_AX, X86_REG_CX, X86_REG_DX, X86_REG_BX, X86_REG_SP, X86_REG_BP, X86_REG_SI, X86_REG_DI,
     X86_REG_R8W, X86_REG_R9W, X86_REG_R10W, X86_REG_R11W, X86_REG_R12W, X86_REG_R13W, X86_REG_R14W, X86_REG_R15W],
    [X86_REG_EAX, X86_REG_ECX, X86_REG_EDX, X86_REG_EBX, X86_REG_ESP, X86_REG_EBP, X86_REG_ESI, X86_REG_EDI,
     X86_REG_R8D, X86_REG_R9D, X86_REG_R10D, X86_REG_R11D, X86_REG_R12D, X86_REG_R13D, X86_REG_R14D, X86_REG_R15D],
    [X86_REG_RAX, X86_REG_RCX, X86_REG_RDX, X86_REG_RBX, X86_REG_RSP, X86_REG_RBP, X86_REG_RSI, X86_REG_RDI,
     X86_REG_R8, X86_REG_R9, X86_REG_R10, X86_REG_R11, X86_REG_R12, X86_REG_R13, X86_REG_R14, X86_REG_R15],
]

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
    raise ImportError("capstone instruction numbering changed; rebuild hotpatch.analysis._decode")


cdef inline bint _needs_detail(cs_insn *insn) noexcept nogil:
    if WANTS_DETAIL[insn.id]:
        return True
    if strstr(insn.op_str, "rip") != NULL or strstr(insn.op_str, " + 0x") != NULL:
        return True
    return (insn.id == X86_INS_MOV or insn.id == X86_INS_MOVSXD) and strstr(insn.op_str, "*4") != NULL


# what the lite decode of an instruction's bytes gave (its length and whether it needs details): neither
# depends on where it lies, and the same encodings come back thousands of times in vector code
cdef struct LiteEntry:
    uint8_t code[16]
    uint8_t length          # 0: empty slot
    uint8_t needs_detail


cdef enum:
    LITE_SLOTS = 4096


cdef inline size_t _lite_slot(const uint8_t *p) noexcept nogil:
    cdef uint32_t word
    memcpy(&word, p, 4)
    return ((word * <uint32_t>2654435761u) >> 20) & (LITE_SLOTS - 1)


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
    # in the range being swept: whether any register holds an address taken with lea, and how many
    # hold the image base (only then can a [reg + disp32] or a scaled index carry a reference)
    cdef bint lea_any
    cdef int image_base_regs
    # registers that held the image base earlier in the sweep: LLVM loads it once and a linear sweep
    # meets other code that reuses the register before the switch that reads through it
    cdef uint8_t base_seen[512]
    cdef bint base_seen_any
    cdef LiteEntry lite_seen[LITE_SLOTS]

    def __cinit__(self, ctx):
        cdef const uint8_t[:] memory = ctx.memory
        cdef const uint32_t[:] relocations = ctx.relocations
        cdef const uint32_t[:] iat
        open_x86(&cs, &self.handle, &self.insn, True)
        open_x86(&cs, &self.lite_handle, &self.lite, False)
        if X86_REG_ENDING > 512:
            raise ImportError("capstone register numbering changed; rebuild hotpatch.analysis._decode")
        # sorted once per context where it keeps them (discovery decodes hundreds of batches of one image)
        ordered = getattr(ctx, "iat_order", None)
        iat = ordered if ordered is not None else array("I", sorted(ctx.iat))
        self.keep = (memory, relocations, iat)
        self.memlen = memory.shape[0]
        self.base = &memory[0] if self.memlen else NULL
        self.nrelocs = relocations.shape[0]
        self.relocations = &relocations[0] if self.nrelocs else NULL
        self.niat = iat.shape[0]
        self.iat = &iat[0] if self.niat else NULL
        self.first_section_rva = ctx.first_section_rva

    def __dealloc__(self):
        if self.insn != NULL:
            cs.free(self.insn, 1)
        if self.lite != NULL:
            cs.free(self.lite, 1)
        if self.handle:
            cs.close(&self.handle)
        if self.lite_handle:
            cs.close(&self.lite_handle)

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
        cdef hp_fast_insn fast
        cdef LiteEntry *seen
        cdef bint after_end
        out.n_skips = 0
        out.n_reads = 0
        if base == NULL:
            return 0
        last_cmp = -1
        for range_index in range(f.n_ranges):
            begin = f.ranges[2 * range_index]
            end = min(f.ranges[2 * range_index + 1], <int64_t>memlen)
            # a range that starts where the last one ended continues its code (chained unwind entries split
            # a function at prologue boundaries): the table base loaded before the split is still there
            if range_index == 0 or begin != f.ranges[2 * range_index - 1]:
                memset(self.lea_known, 0, sizeof(self.lea_known))
                memset(self.base_seen, 0, sizeof(self.base_seen))
                self.lea_any, self.image_base_regs, self.base_seen_any = False, 0, False
                last_cmp = -1
            offset = begin
            # the sweep only moves forward: the first relocation at or after each instruction is found by
            # moving this cursor, not by a search per instruction
            index = _lower_bound(self.relocations, self.nrelocs, begin)
            after_end = False  # the last instruction swept does not fall through
            while offset < end:
                if out.n_skips or after_end:
                    offset = _past_data(out, f, offset, end, after_end)
                    if offset >= end:
                        break
                length = hp_fast_decode(base + offset, <size_t>(end - offset), &fast)
                interesting = fast.reasons
                if length and interesting and not self._needs_capstone(interesting & ~HP_RIP, &fast):
                    # what capstone's details would give, the bytes tell
                    if interesting & HP_RIP and self._rip_operand(out, f, base + offset, offset, length, &fast):
                        return -1
                    if interesting & HP_COMPARE:
                        last_cmp = fast.bound
                    interesting = 0
                if length == 0 and interesting:
                    # a relative branch: without prefixes its target is all there is to know
                    length = _plain_branch(out, base + offset, <size_t>(end - offset), offset)
                    if length < 0:
                        return -1
                    interesting = length == 0
                if length == 0 and not interesting:
                    remaining = <size_t>(end - offset)
                    seen = NULL
                    if remaining >= 4:
                        seen = &self.lite_seen[_lite_slot(base + offset)]
                        if seen.length and seen.length <= remaining \
                                and memcmp(seen.code, base + offset, seen.length) == 0:
                            length, interesting = seen.length, seen.needs_detail
                    if length == 0:
                        code = base + offset
                        address = <uint64_t>offset
                        if not cs.disasm_iter(self.lite_handle, &code, &remaining, &address, self.lite):
                            offset += 1  # an undecodable byte: skip it and resume
                            after_end = False
                            continue
                        length = self.lite.size
                        interesting = _needs_detail(self.lite)
                        if seen != NULL and length <= 16:
                            memcpy(seen.code, base + offset, length)
                            seen.length, seen.needs_detail = length, interesting
                if interesting:
                    code = base + offset
                    remaining = <size_t>(end - offset)
                    address = <uint64_t>offset
                    if not cs.disasm_iter(self.handle, &code, &remaining, &address, self.insn):
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
                if _terminates(base + rva, length, length):
                    after_end = True
                elif not (after_end and _is_nop(base + rva, length)):
                    after_end = False
                while index < self.nrelocs and self.relocations[index] < rva:
                    index += 1
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

    cdef inline bint _needs_capstone(self, int reasons, const hp_fast_insn *fast) noexcept nogil:
        """Whether a fast-decoded instruction flagged for ``reasons`` (``HP_*``) can give a reference or a
        switch bound the bytes alone do not tell: without details it would give none (the twin decodes
        all with details; the tests hold both equal). A [reg + disp32] operand is an image-relative address
        only when that base register holds the image base, and a scaled index reads a switch table only in
        ``mov r32, [..]`` (8A/8B) or ``movsxd`` (63)."""
        cdef int base
        if reasons & HP_RIP or (reasons & HP_COMPARE and not reasons & HP_BOUND):
            return True
        if reasons & HP_DISP32 and (self.image_base_regs > 0 or self.base_seen_any):
            base = LEA_REGISTER[2][fast.base_reg] if 0 <= fast.base_reg < 16 else 0
            if base == 0 or self.lea_known[base] and self.lea_value[base] == 0 or self.base_seen[base]:
                return True
        return reasons & HP_SCALE4 and self.lea_any and not fast.two_byte \
            and (fast.opcode == 0x8B or fast.opcode == 0x8A or fast.opcode == 0x63)

    cdef int _rip_operand(self, Decoded *out, const Function *f, const uint8_t *p, int64_t rva, int length,
                          const hp_fast_insn *fast) noexcept nogil:
        """``_detailed``'s RIP-relative branch for an instruction the fast decoder sized: its ``[rip + disp32]``
        follows the ModRM byte, ``call``/``jmp [rip + X]`` are FF /2 and /4, ``lea``'s register is ModRM.reg
        (REX.R extends it) at the operand size; -1 when out of memory."""
        cdef int disp_offset = fast.modrm_offset + 1, kind = RIP_RELATIVE, reg = (p[fast.modrm_offset] >> 3) & 7
        cdef int32_t displacement
        cdef int64_t target
        memcpy(&displacement, p + disp_offset, 4)
        target = rva + length + displacement
        if self._is_iat(target) and not fast.two_byte and fast.opcode == 0xFF:
            kind = IAT_CALL if reg == 2 else IAT_JUMP if reg == 4 else RIP_RELATIVE
        if _push_ref(out, kind, rva, disp_offset, 4, target):
            return -1
        if not fast.two_byte and fast.opcode == 0x8D:
            reg |= (fast.rex & 4) << 1
            self._lea(LEA_REGISTER[2 if fast.rex & 8 else 0 if fast.opsize16 else 1][reg], target)
        elif _in_function(f, target) and _add_read(out, target):
            return -1
        return 0

    cdef inline void _lea(self, int reg, int64_t target) noexcept nogil:
        if self.lea_known[reg] and self.lea_value[reg] == 0:
            self.image_base_regs -= 1
        if target == 0:
            self.image_base_regs += 1
            self.base_seen[reg] = 1
            self.base_seen_any = True
        self.lea_value[reg] = target
        self.lea_known[reg] = 1
        self.lea_any = True

    cdef inline bint _image_base(self, const Function *f, int reg, int64_t disp) noexcept nogil:
        """Whether ``[reg + .. + disp]`` addresses from the image base: ``reg`` holds it now, or held it before
        and ``disp`` lies in the function (its own switch tables; the twin's ``_image_base``)."""
        if self.lea_known[reg] and self.lea_value[reg] == 0:
            return True
        return self.base_seen[reg] and _in_function(f, disp)

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
                        self._lea(x.operands[0].reg, target)
                    elif _in_function(f, target) and _add_read(out, target):
                        return -1
                    break
                if op.type == X86_OP_MEM and x.encoding.disp_size == 4 and 0 < op.mem.base < 512 \
                        and self._image_base(f, op.mem.base, op.mem.disp) \
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
        cdef int64_t table
        cdef int entry_kind
        cdef Table *entry
        if x.op_count != 2 or x.operands[1].type != X86_OP_MEM:
            return 0
        mem = &x.operands[1].mem
        if mem.index == 0 or mem.scale != 4 or mem.base < 0 or mem.base >= 512:
            return 0
        if insn.id == X86_INS_MOVSXD and mem.disp == 0 and self.lea_known[mem.base]:
            table = self.lea_value[mem.base]
            entry_kind = TABLE_SELF_REL32
        elif insn.id == X86_INS_MOV and mem.disp > 0 and x.operands[0].size == 4 \
                and self._image_base(f, mem.base, mem.disp):
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


def terminates(const uint8_t[:] code):
    """Whether the instruction filling ``code`` never falls through (``hotpatch.analysis.flow.terminates``). For tests."""
    return bool(_terminates(&code[0], code.shape[0], code.shape[0])) if code.shape[0] else False


def is_nop(const uint8_t[:] code):
    """Whether the instruction filling ``code`` is a nop (``hotpatch.analysis.flow.is_nop``). For tests."""
    return bool(_is_nop(&code[0], code.shape[0])) if code.shape[0] else False


def fast_length(const uint8_t[:] code):
    """(length, interesting) from the native fast decoder; length 0 means "ask capstone". For tests."""
    cdef int interesting = 0
    cdef int length = hp_fast_length(&code[0], code.shape[0], &interesting) if code.shape[0] else 0
    return length, bool(interesting)


def fast_decode(const uint8_t[:] code):
    """(length, reasons, bound, modrm_offset) from the native fast decoder: ``reasons`` the names of its
    ``HP_*`` bits (``FAST_REASONS``), ``bound`` the compare's bound when "bound" is among them, else None.
    For tests."""
    cdef hp_fast_insn fast
    cdef int length = hp_fast_decode(&code[0], code.shape[0], &fast) if code.shape[0] else 0
    reasons = {name for name, bit in FAST_REASONS.items() if fast.reasons & bit} if code.shape[0] else set()
    return length, reasons, fast.bound if reasons and fast.reasons & HP_BOUND else None


def rip_operand(ctx, const uint8_t[:] code, int64_t rva, ranges):
    """(refs, lea register or None, reads) of the fast decoder's reading of one RIP-relative instruction at
    ``rva`` (``_rip_operand``), inside a function of ``ranges``; None if it does not decode it so. For tests."""
    cdef _Decoder decoder = _Decoder(ctx)
    cdef hp_fast_insn fast
    cdef Decoded out
    cdef Function f
    cdef int length
    flat = array("q", [bound for span in ranges for bound in span] or [0])
    cdef const int64_t[:] flat_view = flat
    if not code.shape[0]:
        return None
    length = hp_fast_decode(&code[0], code.shape[0], &fast)
    if not length or not fast.reasons & HP_RIP:
        return None
    f.ranges, f.n_ranges, f.refs_begin, f.tables_begin = &flat_view[0], len(ranges), 0, 0
    memset(&out, 0, sizeof(Decoded))
    memset(decoder.lea_known, 0, sizeof(decoder.lea_known))
    try:
        if decoder._rip_operand(&out, &f, &code[0], rva, length, &fast):
            raise MemoryError()
        refs = [(out.refs[i].kind, out.refs[i].insn_rva, out.refs[i].operand_offset, out.refs[i].operand_size,
                 out.refs[i].target) for i in range(out.n_refs)]
        lea = [reg for reg in range(512) if decoder.lea_known[reg]]
        return refs, (lea[0] if lea else None), [out.reads[i] for i in range(out.n_reads)]
    finally:
        _free_decoded(&out)


#: the fast decoder's reasons for a full decode (``x86_fastlen.h``)
FAST_REASONS = {"branch": HP_BRANCH, "rip": HP_RIP, "disp32": HP_DISP32, "absolute": HP_ABSOLUTE,
                "scale4": HP_SCALE4, "compare": HP_COMPARE, "bound": HP_BOUND}


cdef csh _text_handle = 0
cdef cs_insn *_text_insn = NULL


def instruction_text(const uint8_t[:] memory, int64_t begin, int64_t end):
    """(rva, mnemonic, operands) of the instructions in [begin, end), up to the first undecodable byte."""
    cdef const uint8_t *code
    cdef size_t remaining
    cdef uint64_t address
    cdef list out = []
    open_x86(&cs, &_text_handle, &_text_insn, False)
    end = min(end, <int64_t>memory.shape[0])
    if begin < 0 or begin >= end:
        return out
    code = &memory[begin]
    remaining = <size_t>(end - begin)
    address = <uint64_t>begin
    while remaining and cs.disasm_iter(_text_handle, &code, &remaining, &address, _text_insn):
        out.append((_text_insn.address, (<bytes>_text_insn.mnemonic).decode(), (<bytes>_text_insn.op_str).decode()))
    return out


#: functions decoded per pass without the GIL (bounds the C buffers; Python objects are built between passes)
cdef Py_ssize_t BATCH = 2048


cdef int64_t *_flat_ranges(list items, uint64_t *first) except NULL:
    """Every item's ranges as (begin, end) pairs in one malloc'd array (the caller frees it): item i's are
    at ``2 * first[i]`` to ``2 * first[i + 1]``."""
    cdef Py_ssize_t n = len(items), i, count = 0, at = 0
    cdef int64_t *flat
    for i in range(n):
        count += len(items[i][1])
    flat = <int64_t *>malloc((2 * count + 2) * sizeof(int64_t))  # never empty
    if flat == NULL:
        raise MemoryError()
    try:
        first[0] = 0
        for i in range(n):
            ranges = items[i][1]
            if type(ranges) is tuple:  # what discovery gives: read without the iterator protocol
                for span in <tuple>ranges:
                    if type(span) is tuple and len(<tuple>span) == 2:
                        flat[at], flat[at + 1] = (<tuple>span)[0], (<tuple>span)[1]
                    else:
                        flat[at], flat[at + 1] = span
                    at += 2
            else:
                for begin, end in ranges:
                    flat[at], flat[at + 1] = begin, end
                    at += 2
            first[i + 1] = at // 2
    except BaseException:
        free(flat)
        raise
    return flat


def decode(ctx, items, cls=None):
    """(insn_rvas, refs, tables) of each ``(rva, ranges)`` item; with ``cls`` (``api.FunctionAnalysis``),
    that class's objects instead (``rva`` and ``ranges`` the item's, no fingerprint yet), built here rather
    than by a Python call each. The decode loop holds no GIL, so the two images of a diff decode in
    parallel threads."""
    cdef _Decoder decoder = _Decoder(ctx)
    cdef Decoded out
    cdef Function f
    cdef list item_list = items if type(items) is list else list(items)
    cdef Py_ssize_t n = len(item_list), start, stop, i, k
    cdef size_t *ends = NULL
    cdef int64_t *flat = NULL
    cdef const Table *table
    cdef size_t f0, t0, count
    cdef int failed = 0
    cdef object image_base = ctx.image_base
    cdef Maker maker
    cdef tuple empty = ()
    cdef carray.array rvas
    cdef carray.array rvas_template = array("I")
    firsts = array("Q", bytes(8 * (n + 1)))  # item i's ranges: flat[2 * firsts[i]:2 * firsts[i + 1]]
    cdef uint64_t[:] first = firsts
    if cls is not None:
        maker_of(&maker, cls, empty)
    results = []
    memset(&out, 0, sizeof(Decoded))
    try:
        flat = _flat_ranges(item_list, &first[0])
        ends = <size_t *>malloc(3 * (BATCH + 1) * sizeof(size_t))
        if ends == NULL:
            raise MemoryError()
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
                count = ends[k + 3] - ends[k]
                rvas = carray.clone(rvas_template, count, False)
                if count:
                    memcpy(rvas.data.as_uints, out.rvas + ends[k], count * sizeof(uint32_t))
                refs = pack_refs(out.refs + ends[k + 1], ends[k + 4] - ends[k + 1], image_base)
                tables = []
                for t0 in range(ends[k + 2], ends[k + 5]):
                    table = &out.tables[t0]
                    tables.append((table.insn_rva, table.table_rva, table.entry_kind,
                                   tuple([out.targets[f0] for f0 in range(table.first, table.first + table.count)])))
                if cls is None:
                    results.append((rvas, refs, tables))
                else:
                    item = item_list[start + i]
                    results.append(make_analysis(&maker, item[0], item[1], rvas, refs, tables, ""))
    finally:
        _free_decoded(&out)
        free(ends)
        free(flat)
    return results
