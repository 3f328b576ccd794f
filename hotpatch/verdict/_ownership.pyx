# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled ownership scan: ``scan`` follows one function's control flow over capstone's C API.

Line for line the same contract as ``hotpatch.verdict._ownership_reference``
(read its docstring); the tests check that both give identical evidence. Its
constants (the budget, the volatile registers, the instructions that end a
path, the sub-register map) are read from there, so the twins cannot drift.

What each location may hold is a sorted array of ``location << 32 | tag``
codes (tags and stack slots are numbered as the scan meets them), so the
join of paths is a merge of two sorted arrays instead of sets of tuples; each
instruction is decoded and summarised once per scan, and the whole walk runs
without the GIL.
"""

import threading


from cython.operator cimport dereference as deref
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from libcpp.unordered_map cimport unordered_map
from libcpp.algorithm cimport sort, unique
from libcpp.vector cimport vector

from hotpatch.analysis.includes.capstone cimport *
from hotpatch.analysis._capstone_api cimport load_entry_points, open_x86
from hotpatch.analysis._reflist cimport PackedRef, RefList
from hotpatch.verdict._tagsets cimport _drop, _has, _held, _lower, _set, _sorted_has, _subset_of, _union_of

from . import _ownership_reference as _twin

# ── capstone entry points, taken from the library the Python binding loaded ──

cdef CapstoneAPI cs
load_entry_points(&cs, "hotpatch.verdict._ownership")


# ── the twin's constants, as tables ───────────────────────────────────────────

cdef int REG_RAX = X86_REG_RAX
cdef int REG_RSP = X86_REG_RSP
cdef uint16_t TO_64[1024]
cdef uint8_t ENDS[4096]
cdef int VOLATILE[16]
cdef int VOLATILE_COUNT = len(_twin.VOLATILE)
if X86_REG_ENDING > 1024 or X86_INS_ENDING > 4096 or VOLATILE_COUNT > 16:
    raise ImportError("capstone's numbering changed; rebuild hotpatch.verdict._ownership")
for _reg in range(X86_REG_ENDING):
    TO_64[_reg] = _twin.TO_64.get(_reg, _reg)
memset(ENDS, 0, sizeof(ENDS))
for _id in _twin.ENDS:
    ENDS[_id] = 1
for _i, _reg in enumerate(_twin.VOLATILE):
    VOLATILE[_i] = _reg

# a location: a register id, or SLOTS + the number of a stack slot ([rsp+disp])
cdef uint64_t SLOTS = 1 << 16
# tag kinds, numbered as in KIND_NAMES
cdef enum:
    FIELD = 0
    ALLOC = 1
    ARG = 2
KIND_NAMES = ("field", "alloc", "arg")
_KIND_NUMBERS = {name: number for number, name in enumerate(KIND_NAMES)}
# what a call or jump does, and the shape of a 64-bit move (the twin's _Step.call and _Step.move)
cdef enum:
    C_NONE = 0
    C_ALLOC
    C_FREE
    C_CALL
cdef enum:
    M_NONE = 0
    M_SPILL
    M_STORE
    M_LOAD
    M_MOVE


cdef struct Step:
    # (ordered and sized to fit a cache line: most steps walk a place again and read only its summary)
    int64_t target
    int64_t jump  # -1: through a table
    int64_t slot
    int64_t field
    uint32_t writes_at  # into _Scan.writes
    uint32_t writes_count
    # this scan's number of the slot and tag number of the field, 1 + each once asked (0: not yet), so that a
    # place walked again does not look them up again; never taken from a remembered summary
    uint32_t slot_number
    uint32_t field_tag
    uint16_t reg
    uint16_t source
    uint8_t size  # 0: nothing decodes here
    uint8_t call
    uint8_t move
    uint8_t is_call
    uint8_t ends
    uint8_t is_jump
    uint8_t unconditional
    uint8_t has_slot
    uint8_t has_field


# Summaries remembered by the instruction's bytes, across scans: an instruction that is not a call or a jump
# summarises the same wherever it is (its target is the only part that depends on the address, and the heap
# functions only matter to calls), and capstone's detail decode is most of the scan. A conditional jump is
# remembered too, its target as a distance from the instruction (jmp is not: it may be a tail call to a heap
# function).
cdef enum:
    REMEMBERED_BITS = 12
    REMEMBERED = 1 << REMEMBERED_BITS  # slots, hashed on the first four bytes
    REMEMBERED_WRITES = 8


cdef struct Remembered:
    uint8_t size  # 0: empty slot
    uint8_t code[16]
    Step step  # writes_at unused; a jump's target is ``rva + step.jump``
    uint16_t writes[REMEMBERED_WRITES]


cdef inline bint _has_group(cs_detail *detail, int group) noexcept nogil:
    cdef int i
    for i in range(detail.groups_count):
        if detail.groups[i] == group:
            return True
    return False


cdef inline bint _is_slot(const cs_x86_op *op) noexcept nogil:
    return op.mem.base == REG_RSP and op.mem.index == 0


cdef inline bint _is_field(const cs_x86_op *op) noexcept nogil:
    """``[base+disp]`` addresses a field of an object (not the stack or the image)."""
    return op.mem.base != 0 and op.mem.base != REG_RSP and op.mem.base != X86_REG_RIP and op.mem.index == 0


# ── the scan ───────────────────────────────────────────────────────────────────

cdef class _Scan:
    """One function's scan: its inputs, the instructions it summarised, and what it found."""

    cdef csh handle
    cdef cs_insn *insn
    cdef object owner  # keeps the image's memory alive while the scan reads it without the GIL
    cdef const uint8_t *memory
    cdef size_t memory_size
    cdef int64_t budget
    cdef vector[int64_t] ranges  # begin, end, begin, end, ...
    cdef vector[int64_t] switch_targets
    cdef object allocators_of  # the heap functions the three below were made from
    cdef dict deallocators_of
    cdef vector[int64_t] allocators  # sorted
    cdef vector[int64_t] deallocators  # sorted
    cdef unordered_map[int64_t, int] freed_in  # deallocator -> the register its pointer is passed in
    # the heap functions used before the current ones: the verdict alternates between the baseline's and the
    # patched image's, and making the three above again (sorting ~1,600 allocators) costs more than a scan
    cdef object other_allocators_of
    cdef dict other_deallocators_of
    cdef vector[int64_t] other_allocators
    cdef vector[int64_t] other_deallocators
    cdef unordered_map[int64_t, int] other_freed_in
    # per byte of the function's ranges (``place``): 1 + the index of its summary in ``steps``, and
    # 1 + the index of what reached it in ``seen`` (0: nothing yet)
    cdef vector[uint32_t] step_at
    cdef vector[uint32_t] seen_at
    cdef vector[Step] steps
    cdef vector[uint16_t] writes
    cdef unordered_map[int64_t, uint32_t] slot_numbers
    cdef unordered_map[int64_t, uint32_t] field_tags
    cdef unordered_map[int64_t, uint32_t] alloc_tags
    cdef unordered_map[int64_t, uint32_t] arg_tags
    cdef vector[uint8_t] tag_kind
    cdef vector[int64_t] tag_value
    # What reached each place, and the paths waiting to be walked, as slices of two pools rather than a vector
    # each: one allocation per place the scan walks was most of its time after capstone's. A place's slice is
    # (seen_begin, seen_size) in seen_pool; a union that grows it is appended, the old slice left unused. The
    # waiting paths are a stack, so the last one's tags are always at the end of work_pool.
    cdef vector[uint64_t] seen_pool
    cdef vector[size_t] seen_begin
    cdef vector[size_t] seen_size
    cdef vector[int64_t] work_rva
    cdef vector[size_t] work_begin
    cdef vector[uint64_t] work_pool
    cdef vector[uint64_t] frees  # rva << 32 | tag
    cdef vector[int64_t] alloc_order  # allocation calls in the order the scan met them
    cdef unordered_map[int64_t, vector[int64_t]] alloc_fields
    cdef vector[Remembered] remembered

    def __cinit__(self):
        self.handle = 0
        self.insn = NULL
        cdef Remembered empty
        memset(&empty, 0, sizeof(Remembered))
        self.remembered.assign(REMEMBERED, empty)
        open_x86(&cs, &self.handle, &self.insn, True)

    def __dealloc__(self):
        if self.insn != NULL:
            cs.free(self.insn, 1)
        if self.handle:
            cs.close(&self.handle)

    cdef int open(self, object memory, object ranges, object jump_tables, object allocators,
                  object deallocators, int64_t budget) except -1:
        """Ready for a new function: what the last scan left is dropped, the heap functions kept when they
        are the same (a table's verdict scans every changed function with one set)."""
        cdef const uint8_t[::1] view = memory
        self.owner = memory
        self.memory_size = view.shape[0]
        self.memory = &view[0] if self.memory_size else NULL
        self.budget = budget
        # fresh maps rather than clear(), which zeroes every bucket a large function left behind
        cdef unordered_map[int64_t, uint32_t] no_slots, no_fields, no_allocs, no_args
        cdef unordered_map[int64_t, vector[int64_t]] no_alloc_fields
        cdef size_t places = 0
        self.steps.clear()
        self.seen_pool.clear()
        self.seen_begin.clear()
        self.seen_size.clear()
        self.slot_numbers.swap(no_slots)
        self.field_tags.swap(no_fields)
        self.alloc_tags.swap(no_allocs)
        self.arg_tags.swap(no_args)
        self.alloc_fields.swap(no_alloc_fields)
        self.ranges.clear()
        self.switch_targets.clear()
        self.writes.clear()
        self.tag_kind.clear()
        self.tag_value.clear()
        self.work_rva.clear()
        self.work_begin.clear()
        self.work_pool.clear()
        self.frees.clear()
        self.alloc_order.clear()
        for begin, end in ranges:
            self.ranges.push_back(begin)
            self.ranges.push_back(end)
            if end > begin:
                places += end - begin
        self.step_at.assign(places, 0)
        self.seen_at.assign(places, 0)
        for jump_table in jump_tables:  # (…, targets) each: the places a jump through a table may go
            for target in jump_table[3]:
                self.switch_targets.push_back(target)
        if not self.heap_is(allocators, deallocators, self.allocators_of, self.deallocators_of):
            # the ones before become the other ones, and the other ones are taken back when they fit
            self.allocators.swap(self.other_allocators)
            self.deallocators.swap(self.other_deallocators)
            self.freed_in.swap(self.other_freed_in)
            self.allocators_of, self.other_allocators_of = self.other_allocators_of, self.allocators_of
            self.deallocators_of, self.other_deallocators_of = self.other_deallocators_of, self.deallocators_of
        if not self.heap_is(allocators, deallocators, self.allocators_of, self.deallocators_of):
            self.allocators.clear()
            self.deallocators.clear()
            self.freed_in.clear()
            # sorted in C: Python's sort of ~1,600 large ints was most of the wrapper search's rebuilds
            for target in allocators:
                self.allocators.push_back(target)
            sort(self.allocators.begin(), self.allocators.end())
            for target, register in deallocators.items():
                self.deallocators.push_back(target)
                self.freed_in[target] = register
            sort(self.deallocators.begin(), self.deallocators.end())
            self.allocators_of = frozenset(allocators)
            self.deallocators_of = dict(deallocators)
        if type(allocators) is frozenset:
            # kept as it is (when only equal to the one the tables were made from), so that the next scan with the
            # same one (the verdict's) finds it by identity instead of comparing ~1,600 members: the wrapper search
            # leaves an equal copy behind
            self.allocators_of = allocators
        return 0

    cdef bint heap_is(self, object allocators, object deallocators, object allocators_of,
                      dict deallocators_of) except -1:
        """Whether the given heap functions are those ``*_of`` (the wrapper search passes a new, equal set each
        time; the verdict the same frozenset)."""
        if allocators_of is None or deallocators_of is None:
            return False
        return (allocators is allocators_of or allocators == allocators_of) and deallocators == deallocators_of

    cdef void close(self):
        self.owner = None  # the image's memory is not kept alive by this thread's scanner

    cdef int64_t tag(self, int kind, int64_t value) except -1 nogil:
        """The number of the tag (kind, value), given when first asked for."""
        cdef unordered_map[int64_t, uint32_t] *numbers = (
            &self.field_tags if kind == FIELD else &self.alloc_tags if kind == ALLOC else &self.arg_tags)
        cdef unordered_map[int64_t, uint32_t].iterator it = numbers.find(value)
        if it != numbers.end():
            return deref(it).second
        cdef uint32_t number = self.tag_kind.size()
        numbers[0][value] = number
        self.tag_kind.push_back(kind)
        self.tag_value.push_back(value)
        return number

    cdef int64_t slot(self, int64_t disp) except -1 nogil:
        cdef unordered_map[int64_t, uint32_t].iterator it = self.slot_numbers.find(disp)
        if it != self.slot_numbers.end():
            return SLOTS + deref(it).second
        cdef uint32_t number = self.slot_numbers.size()
        self.slot_numbers[disp] = number
        return SLOTS + number

    cdef int64_t place(self, int64_t rva) noexcept nogil:
        """Where ``rva`` is in the function's ranges laid end to end; -1 outside them."""
        cdef size_t i = 0
        cdef int64_t before = 0
        while i < self.ranges.size():
            if self.ranges[i] <= rva < self.ranges[i + 1]:
                return before + rva - self.ranges[i]
            if self.ranges[i + 1] > self.ranges[i]:
                before += self.ranges[i + 1] - self.ranges[i]
            i += 2
        return -1

    cdef int start(self, int64_t rva, object entry) except -1:
        cdef vector[uint64_t] tags
        cdef uint64_t loc
        for where, held in entry.items():
            loc = <uint64_t>self.slot(where[1]) if isinstance(where, tuple) else <uint64_t>where
            for kind, value in held:
                tags.push_back((loc << 32) | self.tag(_KIND_NUMBERS[kind], value))
        sort(tags.begin(), tags.end())
        tags.erase(unique(tags.begin(), tags.end()), tags.end())
        self.wait(rva, tags)
        return 0

    cdef Step *step(self, int64_t rva, int64_t place) except NULL nogil:
        """The summary of the instruction at ``rva`` (at ``place``), decoded on first use (``size`` 0: none
        decodes); valid until the next call."""
        cdef Step blank
        if self.step_at[place]:
            return &self.steps[self.step_at[place] - 1]
        memset(&blank, 0, sizeof(Step))
        self.steps.push_back(blank)
        self.step_at[place] = self.steps.size()
        cdef Step *st = &self.steps.back()
        if rva < 0 or <uint64_t>rva >= self.memory_size:
            return st
        cdef const uint8_t *code = self.memory + rva
        cdef size_t size = self.memory_size - <size_t>rva
        cdef uint64_t address = <uint64_t>rva
        if size > 16:
            size = 16
        cdef Remembered *known = NULL
        cdef uint32_t i, key
        if size >= 4:
            key = (code[0] | <uint32_t>code[1] << 8 | <uint32_t>code[2] << 16 | <uint32_t>code[3] << 24)
            known = &self.remembered[(key * 2654435761u) >> (32 - REMEMBERED_BITS)]
            if known.size and known.size <= size and memcmp(known.code, code, known.size) == 0:
                memcpy(st, &known.step, sizeof(Step))
                st.slot_number = st.field_tag = 0
                if st.is_jump:
                    st.jump += rva
                st.writes_at = self.writes.size()
                for i in range(st.writes_count):
                    self.writes.push_back(known.writes[i])
                return st
        cdef const uint8_t *start = code
        if cs.disasm_iter(self.handle, &code, &size, &address, self.insn):
            self.summarise(st)
            # a jump's target only when it is one (a negative one goes through the tables, and might not elsewhere)
            if known != NULL and st.call == C_NONE and (not st.is_jump or st.jump >= 0) \
                    and st.writes_count <= REMEMBERED_WRITES and self.insn.id != X86_INS_CALL \
                    and self.insn.id != X86_INS_JMP and st.size <= 16:
                known.size = <uint8_t>st.size
                memcpy(known.code, start, st.size)
                memcpy(&known.step, st, sizeof(Step))
                if st.is_jump:
                    known.step.jump -= rva
                for i in range(st.writes_count):
                    known.writes[i] = self.writes[st.writes_at + i]
        return st

    cdef int summarise(self, Step *st) except -1 nogil:
        cdef cs_insn *insn = self.insn
        cdef cs_x86 *x = &insn.detail.x86
        cdef cs_x86_op *op0 = &x.operands[0]
        cdef cs_x86_op *op1 = &x.operands[1]
        cdef bint known = False
        cdef int64_t target = 0
        cdef uint16_t regs_read[64]
        cdef uint16_t regs_write[64]
        cdef uint8_t read_count = 0, write_count = 0, i
        st.size = insn.size
        if insn.id == X86_INS_CALL or insn.id == X86_INS_JMP:  # the twin's _call_kind
            if x.op_count == 1 and op0.type == X86_OP_IMM:
                target, known = op0.imm, True
            elif x.op_count == 1 and op0.type == X86_OP_MEM and op0.mem.base == X86_REG_RIP:
                target, known = -(<int64_t>insn.address + insn.size + op0.mem.disp), True  # an IAT slot, negated
            if known and _sorted_has(self.allocators, target):
                st.call = C_ALLOC
            elif known and _sorted_has(self.deallocators, target):
                st.call = C_FREE
            elif insn.id == X86_INS_CALL:
                st.call = C_CALL
            if st.call != C_NONE:
                st.target = target
                st.is_call = insn.id == X86_INS_CALL
                return 0
        if ENDS[insn.id]:
            st.ends = True
            return 0
        if _has_group(insn.detail, CS_GRP_JUMP):
            st.is_jump = True
            st.jump = op0.imm if x.op_count == 1 and op0.type == X86_OP_IMM else -1
            st.unconditional = insn.id == X86_INS_JMP
            return 0
        if cs.regs_access(self.handle, insn, regs_read, &read_count, regs_write, &write_count) != CS_ERR_OK:
            write_count = 0
        st.writes_at = self.writes.size()
        st.writes_count = write_count
        for i in range(write_count):
            self.writes.push_back(TO_64[regs_write[i]])
        if insn.id == X86_INS_MOV and x.op_count == 2 and op0.size == 8:
            if op0.type == X86_OP_MEM and op1.type == X86_OP_REG:
                st.reg = op1.reg
                if _is_slot(op0):
                    st.move, st.has_slot, st.slot = M_SPILL, True, op0.mem.disp
                else:
                    st.move, st.has_field, st.field = M_STORE, _is_field(op0), op0.mem.disp
                return 0
            if op0.type == X86_OP_REG and op1.type == X86_OP_MEM:
                st.move, st.reg = M_LOAD, op0.reg
                st.has_slot, st.has_field, st.slot, st.field = _is_slot(op1), _is_field(op1), op1.mem.disp, op1.mem.disp
                return 0
            if op0.type == X86_OP_REG and op1.type == X86_OP_REG:
                st.move, st.reg, st.source = M_MOVE, op0.reg, op1.reg
                return 0
        if x.op_count >= 1 and op0.type == X86_OP_MEM and _is_slot(op0):
            st.has_slot, st.slot = True, op0.mem.disp
        return 0

    cdef inline void written(self, const Step *st, vector[uint64_t] &tags) noexcept nogil:
        cdef uint32_t i
        if tags.empty():
            return
        for i in range(st.writes_count):  # a write to a part of a register ends its tag
            _drop(tags, self.writes[st.writes_at + i])

    cdef inline uint64_t slot_of(self, Step *st) except -1 nogil:
        """The location of the step's stack slot (``slot``, asked once per step)."""
        if not st.slot_number:
            st.slot_number = <uint32_t>(self.slot(st.slot) - SLOTS) + 1
        return SLOTS + st.slot_number - 1

    cdef inline int64_t field_tag_of(self, Step *st) except -1 nogil:
        """The tag of the step's field (``tag(FIELD, ...)``, asked once per step)."""
        if not st.field_tag:
            st.field_tag = <uint32_t>self.tag(FIELD, st.field) + 1
        return st.field_tag - 1

    cdef int track(self, Step *st, vector[uint64_t] &tags, vector[uint32_t] &held,
                   vector[uint64_t] &scratch) except -1 nogil:
        """The twin's ``_track``: what a non-branching instruction does to the tags."""
        cdef size_t i
        cdef uint64_t loc
        cdef vector[int64_t] *fields
        cdef int64_t site
        if tags.empty() and st.move != M_LOAD:
            # nothing held, and only a load makes a tag: what is left of the below is the slot's number, asked as
            # there (most steps of a scan hold nothing)
            if st.has_slot:
                self.slot_of(st)
            return 0
        if st.move == M_SPILL:  # the value comes back with its tags
            _held(tags, st.reg, held)
            _set(tags, self.slot_of(st), held, scratch)
        elif st.move == M_STORE:
            if st.has_field:
                _held(tags, st.reg, held)
                for i in range(held.size()):
                    if self.tag_kind[held[i]] == ALLOC:
                        site = self.tag_value[held[i]]
                        fields = &self.alloc_fields[site]
                        if not _has(fields[0], st.field):
                            fields.push_back(st.field)
        elif st.move == M_LOAD:
            self.written(st, tags)
            loc = self.slot_of(st) if st.has_slot else 0
            if st.has_slot and _lower(tags, loc << 32) != _lower(tags, (loc + 1) << 32):
                _held(tags, loc, held)
                _set(tags, st.reg, held, scratch)
            elif st.has_field:
                held.clear()
                held.push_back(self.field_tag_of(st))
                _set(tags, st.reg, held, scratch)
        elif st.move == M_MOVE:
            _held(tags, st.source, held)
            self.written(st, tags)
            if not held.empty():
                _set(tags, st.reg, held, scratch)
        else:
            if st.has_slot:
                _drop(tags, self.slot_of(st))
            self.written(st, tags)
        return 0

    cdef int run(self) except -1 nogil:
        cdef int64_t budget = self.budget, rva, target
        cdef vector[uint64_t] tags, merged, scratch
        cdef vector[uint32_t] held
        cdef const uint64_t *known
        cdef size_t known_size, entry, begin
        cdef Step *st
        cdef int64_t place
        cdef int64_t primary_begin = self.ranges[0] if self.ranges.size() else 0
        cdef int64_t primary_end = self.ranges[1] if self.ranges.size() else 0
        cdef size_t i
        cdef int r
        while not self.work_rva.empty() and budget > 0:
            rva = self.work_rva.back()
            self.work_rva.pop_back()
            begin = self.work_begin.back()
            self.work_begin.pop_back()
            tags.assign(self.work_pool.begin() + begin, self.work_pool.end())
            self.work_pool.resize(begin)
            while budget > 0:
                budget -= 1
                # the primary range is the first place() tries: most steps stay in it
                place = rva - primary_begin if primary_begin <= rva < primary_end else self.place(rva)
                if place < 0:
                    break  # (the twin records what reached a place outside first: nothing reads it)
                if not self.seen_at[place]:
                    self.seen_begin.push_back(self.seen_pool.size())
                    self.seen_size.push_back(tags.size())
                    self.seen_pool.insert(self.seen_pool.end(), tags.begin(), tags.end())
                    self.seen_at[place] = self.seen_begin.size()
                else:
                    entry = self.seen_at[place] - 1
                    known_size = self.seen_size[entry]
                    if known_size:
                        known = self.seen_pool.const_data() + self.seen_begin[entry]
                        if _subset_of(tags, known, known_size):
                            break
                        # what other paths brought here joins this one
                        _union_of(known, known_size, tags, merged)
                        tags.swap(merged)
                    if known_size or not tags.empty():  # (nothing to nothing: the place's record stays empty)
                        # the place's tags become these, appended (``known`` is not read again: the pool may move)
                        self.seen_begin[entry] = self.seen_pool.size()
                        self.seen_size[entry] = tags.size()
                        self.seen_pool.insert(self.seen_pool.end(), tags.begin(), tags.end())
                # the summary made when the place was first walked, if it was (most steps walk a place again)
                st = &self.steps[self.step_at[place] - 1] if self.step_at[place] else self.step(rva, place)
                if st.size == 0:
                    break
                if st.call != C_NONE:
                    if st.call == C_FREE:
                        _held(tags, self.freed_in[st.target], held)
                        for i in range(held.size()):
                            self.frees.push_back((<uint64_t>rva << 32) | held[i])
                    if not tags.empty():
                        for r in range(VOLATILE_COUNT):
                            _drop(tags, VOLATILE[r])
                    if st.call == C_ALLOC and st.is_call:
                        held.clear()
                        held.push_back(self.tag(ALLOC, rva))
                        _set(tags, REG_RAX, held, scratch)
                        if self.alloc_fields.find(rva) == self.alloc_fields.end():
                            self.alloc_order.push_back(rva)
                            self.alloc_fields[rva].clear()
                    if not st.is_call:
                        break  # a tail jump
                elif st.ends:
                    break
                elif st.is_jump:
                    if st.jump >= 0:
                        self.push(st.jump, tags)
                    else:
                        for i in range(self.switch_targets.size()):
                            self.push(self.switch_targets[i], tags)
                    if st.unconditional:
                        break
                else:
                    self.track(st, tags, held, scratch)
                rva += st.size
        return 0

    cdef int push(self, int64_t target, const vector[uint64_t] &tags) except -1 nogil:
        if self.place(target) >= 0:
            self.wait(target, tags)
        return 0

    cdef int wait(self, int64_t rva, const vector[uint64_t] &tags) except -1 nogil:
        """A path to walk from ``rva`` with ``tags``, on top of the stack."""
        self.work_rva.push_back(rva)
        self.work_begin.push_back(self.work_pool.size())
        self.work_pool.insert(self.work_pool.end(), tags.begin(), tags.end())
        return 0

    cdef list results(self, dict allocations):
        cdef size_t i
        cdef uint64_t code
        cdef uint32_t number
        sort(self.frees.begin(), self.frees.end())
        self.frees.erase(unique(self.frees.begin(), self.frees.end()), self.frees.end())
        out = []
        for code in self.frees:
            number = <uint32_t>(code & 0xffffffffu)
            out.append(((KIND_NAMES[self.tag_kind[number]], self.tag_value[number]), <int64_t>(code >> 32)))
        for i in range(self.alloc_order.size()):
            fields = allocations.setdefault(self.alloc_order[i], set())
            fields.update(self.alloc_fields[self.alloc_order[i]])
        return out


# Allocations the scan's C++ containers make without Cython's checks (a map's operator[], a vector's copy)
# throw std::bad_alloc past its functions: caught here, it becomes MemoryError instead of an abort.
cdef extern from *:
    """
    #include <new>
    static int hp_no_bad_alloc(int (*body)(void *), void *state) {
        try {
            return body(state);
        } catch (const std::bad_alloc &) {
            PyGILState_STATE gil = PyGILState_Ensure();
            PyErr_NoMemory();
            PyGILState_Release(gil);
            return -1;
        }
    }
    """
    int _no_bad_alloc "hp_no_bad_alloc"(int (*body)(void *) except -1 nogil, void *state) except -1 nogil


cdef int _run(void *state) except -1 nogil:
    return (<_Scan>state).run()


_local = threading.local()


def scan(table, function, allocators, deallocators, dict entry, dict allocations):
    """The tags of the pointers passed to deallocators, with the call's RVA, ordered by RVA; ``allocations``
    gets, per allocation call, the fields its result is stored into (the twin's ``scan``)."""
    analysis = table.analysis_of(function)
    # one scanner per thread: a capstone handle must not be shared between threads, and making one per
    # function (with the heap functions sorted again) costs more than a small function's scan
    cdef _Scan state = getattr(_local, "scan", None)
    if state is None:
        state = _local.scan = _Scan()
    state.open(table.image.memory, function.ranges, analysis.raw_tables, allocators, deallocators,
               _twin.SCAN_BUDGET)
    try:
        state.start(function.rva, entry)
        with nogil:
            _no_bad_alloc(_run, <void *>state)
        return state.results(allocations)
    finally:
        state.close()


def call_targets(refs, calls, through_iat):
    """The targets of the references of kind ``calls``; those of kind ``through_iat`` are IAT slots, negated
    (the twin's ``call_targets``, read from a ``RefList``'s packed records)."""
    cdef uint8_t wanted[256]
    _wanted(wanted, calls, through_iat)
    return _call_targets(refs, wanted, calls, through_iat)


def reaches(refs, frozenset targets):
    """Whether a reference's target is one of ``targets`` (the twin's ``reaches``, read from a ``RefList``'s packed
    records without making a tuple per reference)."""
    cdef RefList packed
    cdef const PackedRef *ref
    cdef Py_ssize_t index
    if type(refs) is not RefList:
        return _twin.reaches(refs, targets)
    packed = <RefList>refs
    for index in range(packed.count):
        ref = (<const PackedRef *><const char *>packed.packed) + index
        target = ref.target if packed.wide is None or index not in packed.wide else packed.wide[index]
        if target in targets:
            return True
    return False


def small_callers(functions, analyses, Py_ssize_t max_bytes, calls, through_iat):
    """The functions of at most ``max_bytes`` bytes that call or jump somewhere, with the targets (as
    ``call_targets``), and per target the indices into that list of the ones reaching it, in order (the twin's
    ``small_callers``: the wrapper search's starting point, over every function of a table)."""
    cdef uint8_t wanted[256]
    cdef list small = []
    cdef dict callers = {}
    cdef set targets
    cdef Py_ssize_t index
    _wanted(wanted, calls, through_iat)
    for function, analysis in zip(functions, analyses):
        if function.end_rva - function.rva > max_bytes:  # Function.size, without a call to the property
            continue
        targets = _call_targets(analysis.raw_refs, wanted, calls, through_iat)
        if not targets:
            continue
        index = len(small)
        small.append((function, targets))
        for target in targets:
            found = callers.get(target)
            if found is None:
                callers[target] = [index]
            else:
                (<list>found).append(index)
    return small, callers


cdef void _wanted(uint8_t *wanted, object calls, object through_iat):
    """``wanted[kind]``: 0 not read, 1 a target, 2 an IAT slot (negated)."""
    memset(wanted, 0, 256)
    for kind in calls:
        wanted[<uint8_t>kind] = 2 if kind in through_iat else 1


cdef set _call_targets(object refs, const uint8_t *wanted, object calls, object through_iat):
    cdef RefList packed
    cdef const PackedRef *ref
    cdef Py_ssize_t index
    cdef set out = set()
    if type(refs) is not RefList:
        return _twin.call_targets(refs, calls, through_iat)
    packed = <RefList>refs
    for index in range(packed.count):
        ref = (<const PackedRef *><const char *>packed.packed) + index
        if wanted[ref.kind]:
            target = ref.target if packed.wide is None or index not in packed.wide else packed.wide[index]
            out.add(-target if wanted[ref.kind] == 2 else target)
    return out
