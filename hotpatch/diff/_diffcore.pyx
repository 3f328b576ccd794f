# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled diff kernels: instruction tokens, similarity scores, alignments.

Line for line the same contract as ``hotpatch.diff._diffreference`` (read its
docstring); the tests check that both give identical results. Tokens are
small integers (ids of the masked instruction bytes, interned per diff), so
every kernel works on flat uint32 arrays.
"""

from array import array

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

from hotpatch.analysis._refkinds cimport BRANCH_REL8, BRANCH_REL32, CALL_REL32, JUMP_TABLE
from hotpatch.analysis._reflist cimport PackedRef, RefList

from hotpatch.diff.align import MAX_MIDDLE_WORK as _MAX_MIDDLE_WORK

IMPLEMENTATION = "cython"

#: gaps without unique anchors up to this many comparisons are aligned by longest matching blocks
cdef int64_t SMALL_GAP = 20000


# ── packed references ───────────────────────────────────────────────────────

cdef const PackedRef *_packed(object refs, Py_ssize_t *count):
    """The records of a ``RefList`` read in place (no tuple per reference), or NULL for anything else
    (a list of tuples, or a RefList with targets outside int64 kept apart): then the kernels read tuples."""
    if type(refs) is RefList and (<RefList>refs).wide is None:
        count[0] = (<RefList>refs).count
        return <const PackedRef *><const char *>(<RefList>refs).packed
    return NULL


# ── tokens ──────────────────────────────────────────────────────────────────

cdef struct Mask:
    uint32_t insn_rva
    int32_t offset
    int32_t size


cdef int _by_insn(const void *x, const void *y) noexcept nogil:
    cdef const Mask *a = <const Mask *>x
    cdef const Mask *b = <const Mask *>y
    return (a.insn_rva > b.insn_rva) - (a.insn_rva < b.insn_rva)


cdef class Interner:
    """Token ids by masked instruction bytes, kept in C: what ``token_ids`` would keep in a dict (a new token
    gets the count so far), without a bytes object and a dict lookup per instruction. A token is at most 15
    bytes, so its bytes and length fit two words: (bytes 0-7, bytes 8-14 and the length in the top byte)."""

    cdef uint64_t *keys      # two words per slot
    cdef int32_t *ids        # -1: an empty slot
    cdef Py_ssize_t capacity
    cdef Py_ssize_t count

    def __cinit__(self):
        self.capacity = 0
        self.count = 0
        self._grow()

    def __dealloc__(self):
        free(self.keys)
        free(self.ids)

    def __len__(self):
        return self.count

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old_capacity = self.capacity, i, slot
        cdef uint64_t *old_keys = self.keys
        cdef int32_t *old_ids = self.ids
        cdef Py_ssize_t capacity = old_capacity * 2 if old_capacity else 4096
        keys = <uint64_t *>malloc(2 * capacity * sizeof(uint64_t))
        ids = <int32_t *>malloc(capacity * sizeof(int32_t))
        if keys == NULL or ids == NULL:
            free(keys)
            free(ids)
            raise MemoryError()
        memset(ids, 0xFF, capacity * sizeof(int32_t))
        self.keys, self.ids, self.capacity = keys, ids, capacity
        for i in range(old_capacity):
            if old_ids[i] >= 0:
                slot = self._slot(old_keys[2 * i], old_keys[2 * i + 1])
                keys[2 * slot], keys[2 * slot + 1], ids[slot] = old_keys[2 * i], old_keys[2 * i + 1], old_ids[i]
        free(old_keys)
        free(old_ids)
        return 0

    cdef inline Py_ssize_t _slot(self, uint64_t k0, uint64_t k1) noexcept nogil:
        """The slot holding the key, or the empty one where it would go (linear probing)."""
        cdef uint64_t h = (k0 * <uint64_t>0x9E3779B97F4A7C15) ^ (k1 * <uint64_t>0xC2B2AE3D27D4EB4F)
        cdef Py_ssize_t mask = self.capacity - 1, slot
        h ^= h >> 29
        slot = <Py_ssize_t>(h & <uint64_t>mask)
        while self.ids[slot] >= 0 and (self.keys[2 * slot] != k0 or self.keys[2 * slot + 1] != k1):
            slot = (slot + 1) & mask
        return slot

    cdef int32_t id_of(self, const uint8_t *raw, int64_t length) except -1:
        cdef uint64_t k0 = 0, k1 = 0
        cdef Py_ssize_t slot
        cdef int64_t k
        for k in range(length if length < 8 else 8):
            k0 |= (<uint64_t>raw[k]) << (8 * k)
        for k in range(8, length):
            k1 |= (<uint64_t>raw[k]) << (8 * (k - 8))
        k1 |= (<uint64_t>length) << 56
        slot = self._slot(k0, k1)
        if self.ids[slot] < 0:
            if 2 * (self.count + 1) > self.capacity:  # at most half full: probes stay short
                self._grow()
                slot = self._slot(k0, k1)
            self.keys[2 * slot], self.keys[2 * slot + 1] = k0, k1
            self.ids[slot] = <int32_t>self.count
            self.count += 1
        return self.ids[slot]


def new_interner():
    """What ``InstructionStreams`` interns tokens in, shared by both images of a diff."""
    return Interner()


def token_ids(const uint8_t[:] memory, const uint32_t[:] insn_rvas, int64_t end_rva, refs, intern):
    """Each instruction's bytes with its reference operands zeroed, as ids interned in ``intern`` (a dict
    or an ``Interner``)."""
    cdef Interner interner = intern if type(intern) is Interner else None
    cdef dict by_bytes = None if interner is not None else <dict?>intern
    cdef Py_ssize_t count = insn_rvas.shape[0], n_masks = 0, m = 0, i, k
    cdef Py_ssize_t size_of_memory = memory.shape[0]
    cdef Py_ssize_t n_refs = 0
    cdef const PackedRef *packed = _packed(refs, &n_refs)
    cdef Mask *masks = <Mask *>malloc((len(refs) + 1) * sizeof(Mask))
    cdef uint8_t raw[16]
    cdef int64_t rva, end, length, begin_zero, end_zero
    out = array("I", bytes(4 * count))
    cdef uint32_t[:] ids = out
    if masks == NULL:
        raise MemoryError()
    try:
        if packed != NULL:
            for i in range(n_refs):
                if packed[i].operand_size:
                    masks[n_masks].insn_rva = packed[i].insn_rva
                    masks[n_masks].offset = packed[i].operand_offset
                    masks[n_masks].size = packed[i].operand_size
                    n_masks += 1
        else:
            for ref in refs:
                if ref[3]:
                    masks[n_masks].insn_rva = ref[1]
                    masks[n_masks].offset = ref[2]
                    masks[n_masks].size = ref[3]
                    n_masks += 1
        qsort(masks, n_masks, sizeof(Mask), _by_insn)
        for i in range(count):
            rva = insn_rvas[i]
            end = insn_rvas[i + 1] if i + 1 < count else end_rva
            if not (rva < end <= rva + 15):
                end = rva + 1  # the last instruction of a fragment, or undecodable bytes
            if end > size_of_memory:
                end = size_of_memory
            length = end - rva if end > rva else 0
            if length:
                memcpy(raw, &memory[rva], length)
            while m < n_masks and masks[m].insn_rva < rva:
                m += 1
            k = m
            while k < n_masks and masks[k].insn_rva == rva:
                begin_zero = masks[k].offset
                end_zero = begin_zero + masks[k].size
                if end_zero > length:
                    end_zero = length
                if begin_zero < end_zero:
                    memset(raw + begin_zero, 0, end_zero - begin_zero)
                k += 1
            if interner is not None:
                ids[i] = interner.id_of(raw, length)
                continue
            token = PyBytes_FromStringAndSize(<char *>raw, length)
            found = by_bytes.get(token)
            if found is None:
                found = len(by_bytes)
                by_bytes[token] = found
            ids[i] = found
    finally:
        free(masks)
    return out


# ── scratch tables indexed by token id (kept zeroed between calls) ──────────

cdef int32_t *_count = NULL
cdef int32_t *_where = NULL
cdef Py_ssize_t _capacity = 0


cdef int _reserve(const uint32_t[:] a, const uint32_t[:] b) except -1:
    global _count, _where, _capacity
    cdef uint32_t top = 0
    cdef Py_ssize_t i, wanted
    for i in range(a.shape[0]):
        if a[i] > top:
            top = a[i]
    for i in range(b.shape[0]):
        if b[i] > top:
            top = b[i]
    wanted = <Py_ssize_t>top + 1
    if wanted <= _capacity:
        return 0
    wanted = max(wanted, 2 * _capacity, 1024)
    new_count = <int32_t *>realloc(_count, wanted * sizeof(int32_t))
    if new_count == NULL:
        raise MemoryError()
    _count = new_count
    new_where = <int32_t *>realloc(_where, wanted * sizeof(int32_t))
    if new_where == NULL:
        raise MemoryError()
    _where = new_where
    memset(_count + _capacity, 0, (wanted - _capacity) * sizeof(int32_t))
    memset(_where + _capacity, 0, (wanted - _capacity) * sizeof(int32_t))
    _capacity = wanted
    return 0


# ── longest matching blocks (difflib.SequenceMatcher without junk) ──────────

cdef struct Blocks:
    const uint32_t *a
    const uint32_t *b
    Py_ssize_t b_offset        # b index of chain position 0
    int32_t *next_same         # per b position: the next position with the same id, or -1
    int32_t *first             # per a position: its id's first position in b, or -1
    int32_t *length            # two rows of run lengths, indexed by b position
    uint64_t *stamp            # the row each length belongs to
    uint64_t generation
    Py_ssize_t lb


cdef void _longest(Blocks *s, Py_ssize_t alo, Py_ssize_t ahi, Py_ssize_t blo, Py_ssize_t bhi,
                   Py_ssize_t *out_i, Py_ssize_t *out_j, Py_ssize_t *out_k) noexcept nogil:
    """SequenceMatcher.find_longest_match: earliest in a, then earliest in b, of the longest blocks."""
    cdef Py_ssize_t besti = alo, bestj = blo, bestsize = 0, i, j, k, row, previous
    cdef uint64_t gen_previous, gen_row
    s.generation += 2  # rows of earlier calls never count as the previous row
    for i in range(alo, ahi):
        row = (i & 1) * s.lb
        previous = ((i + 1) & 1) * s.lb
        gen_row = s.generation + <uint64_t>(i - alo) + 1
        gen_previous = gen_row - 1
        j = s.first[i]
        while j >= 0:
            if j < blo:
                j = s.next_same[j]
                continue
            if j >= bhi:
                break
            k = 1
            if j > 0 and s.stamp[previous + j - 1] == gen_previous:
                k = s.length[previous + j - 1] + 1
            s.length[row + j] = <int32_t>k
            s.stamp[row + j] = gen_row
            if k > bestsize:
                besti, bestj, bestsize = i - k + 1, j - k + 1, k
            j = s.next_same[j]
    s.generation += <uint64_t>(ahi - alo) + 2
    while besti > alo and bestj > blo and s.a[besti - 1] == s.b[bestj - 1]:
        besti, bestj, bestsize = besti - 1, bestj - 1, bestsize + 1
    while besti + bestsize < ahi and bestj + bestsize < bhi and s.a[besti + bestsize] == s.b[bestj + bestsize]:
        bestsize += 1
    out_i[0], out_j[0], out_k[0] = besti, bestj, bestsize


cdef struct PairBuffer:
    int32_t *data   # (i, j) interleaved
    Py_ssize_t count
    Py_ssize_t capacity


cdef int _push_pair(PairBuffer *buf, Py_ssize_t i, Py_ssize_t j) except -1 nogil:
    cdef int32_t *grown
    if buf.count == buf.capacity:
        buf.capacity = buf.capacity * 2 if buf.capacity else 256
        grown = <int32_t *>realloc(buf.data, 2 * buf.capacity * sizeof(int32_t))
        if grown == NULL:
            with gil:
                raise MemoryError()
        buf.data = grown
    buf.data[2 * buf.count] = <int32_t>i
    buf.data[2 * buf.count + 1] = <int32_t>j
    buf.count += 1
    return 0


cdef Py_ssize_t _matching_blocks(const uint32_t *a, Py_ssize_t a0, Py_ssize_t a1, const uint32_t *b, Py_ssize_t b0,
                                 Py_ssize_t b1, PairBuffer *pairs) except -1:
    """Matched (i, j) of SequenceMatcher(a[a0:a1], b[b0:b1]).get_matching_blocks(); returns how many."""
    cdef Py_ssize_t la = a1 - a0, lb = b1 - b0, i, j, k, m, total = 0, top = 0
    cdef Py_ssize_t alo, ahi, blo, bhi
    cdef Blocks s
    cdef Py_ssize_t *queue
    if la <= 0 or lb <= 0:
        return 0
    s.a = a + a0
    s.b = b + b0
    s.lb = lb
    s.generation = 0
    s.next_same = <int32_t *>malloc(lb * sizeof(int32_t))
    s.first = <int32_t *>malloc(la * sizeof(int32_t))
    s.length = <int32_t *>malloc(2 * lb * sizeof(int32_t))
    s.stamp = <uint64_t *>malloc(2 * lb * sizeof(uint64_t))
    queue = <Py_ssize_t *>malloc(4 * (la + lb + 2) * sizeof(Py_ssize_t))
    try:
        if not (s.next_same and s.first and s.length and s.stamp and queue):
            raise MemoryError()
        memset(s.stamp, 0, 2 * lb * sizeof(uint64_t))
        # b2j as chains: _where[id] holds the first position + 1 while the chain is built back to front
        for j in range(lb - 1, -1, -1):
            s.next_same[j] = _where[s.b[j]] - 1
            _where[s.b[j]] = <int32_t>(j + 1)
        for i in range(la):
            s.first[i] = _where[s.a[i]] - 1
        for j in range(lb):
            _where[s.b[j]] = 0
        queue[0], queue[1], queue[2], queue[3] = 0, la, 0, lb
        top = 1
        while top:
            top -= 1
            alo, ahi, blo, bhi = queue[4 * top], queue[4 * top + 1], queue[4 * top + 2], queue[4 * top + 3]
            _longest(&s, alo, ahi, blo, bhi, &i, &j, &k)
            if k:
                total += k
                if pairs != NULL:
                    for m in range(k):
                        _push_pair(pairs, a0 + i + m, b0 + j + m)
                if alo < i and blo < j:
                    queue[4 * top], queue[4 * top + 1], queue[4 * top + 2], queue[4 * top + 3] = alo, i, blo, j
                    top += 1
                if i + k < ahi and j + k < bhi:
                    queue[4 * top], queue[4 * top + 1] = i + k, ahi
                    queue[4 * top + 2], queue[4 * top + 3] = j + k, bhi
                    top += 1
    finally:
        free(s.next_same)
        free(s.first)
        free(s.length)
        free(s.stamp)
        free(queue)
    return total


# ── similarity ──────────────────────────────────────────────────────────────

cdef double _ratio(Py_ssize_t matches, Py_ssize_t length) noexcept nogil:
    return 2.0 * matches / length if length else 1.0


def similarity(const uint32_t[:] a, const uint32_t[:] b, double threshold, int64_t max_ratio_work):
    """SequenceMatcher's ratio() of the two token streams (its quick_ratio() past ``max_ratio_work``
    comparisons), or -1.0 when its cheap upper bounds are already below ``threshold``."""
    cdef Py_ssize_t la = a.shape[0], lb = b.shape[0], i, matches = 0
    if _ratio(min(la, lb), la + lb) < threshold:
        return -1.0
    _reserve(a, b)
    for i in range(lb):
        _count[b[i]] += 1
    for i in range(la):
        if _count[a[i]] > 0:
            _count[a[i]] -= 1
            matches += 1
    for i in range(lb):
        _count[b[i]] = 0
    quick = _ratio(matches, la + lb)
    if quick < threshold:
        return -1.0
    if la * lb > max_ratio_work:
        return quick
    if la == 0 or lb == 0:
        return _ratio(0, la + lb)
    return _ratio(_matching_blocks(&a[0], 0, la, &b[0], 0, lb, NULL), la + lb)


# ── patience alignment ──────────────────────────────────────────────────────

cdef struct Anchor:
    int32_t i
    int32_t j


cdef int _patience(const uint32_t *a, const uint32_t *b, Py_ssize_t a0, Py_ssize_t a1, Py_ssize_t b0, Py_ssize_t b1,
                   PairBuffer *pairs) except -1:
    cdef Py_ssize_t i, j, n, length, low, high, middle, previous_i, previous_j, index
    cdef Anchor *candidates
    cdef int32_t *tails
    cdef int32_t *tail_index
    cdef int32_t *back
    cdef Py_ssize_t n_tails = 0
    while a0 < a1 and b0 < b1 and a[a0] == b[b0]:
        _push_pair(pairs, a0, b0)
        a0 += 1
        b0 += 1
    while a0 < a1 and b0 < b1 and a[a1 - 1] == b[b1 - 1]:
        a1 -= 1
        b1 -= 1
        _push_pair(pairs, a1, b1)
    if a0 >= a1 or b0 >= b1:
        return 0
    # elements once on each side: _count counts a, _where counts b and remembers the last b position
    for i in range(a0, a1):
        _count[a[i]] += 1
    for j in range(b0, b1):
        _where[b[j]] += 1
    candidates = <Anchor *>malloc((a1 - a0) * sizeof(Anchor))
    if candidates == NULL:
        raise MemoryError()
    n = 0
    for i in range(a0, a1):
        if _count[a[i]] == 1 and _where[a[i]] == 1:
            candidates[n].i = <int32_t>i
            n += 1
    for j in range(b0, b1):
        if _where[b[j]] == 1 and _count[b[j]] == 1:
            _where[b[j]] = <int32_t>(-j - 2)  # position, told apart from counts by its sign
    for index in range(n):
        candidates[index].j = -_where[a[candidates[index].i]] - 2
    for i in range(a0, a1):
        _count[a[i]] = 0
    for j in range(b0, b1):
        _where[b[j]] = 0
    # longest run of candidates whose j increases (patience sorting)
    tails = <int32_t *>malloc((n + 1) * sizeof(int32_t))
    tail_index = <int32_t *>malloc((n + 1) * sizeof(int32_t))
    back = <int32_t *>malloc((n + 1) * sizeof(int32_t))
    try:
        if tails == NULL or tail_index == NULL or back == NULL:
            raise MemoryError()
        for index in range(n):
            low, high = 0, n_tails
            while low < high:
                middle = (low + high) // 2
                if tails[middle] < candidates[index].j:
                    low = middle + 1
                else:
                    high = middle
            length = low
            tails[length] = candidates[index].j
            tail_index[length] = <int32_t>index
            if length == n_tails:
                n_tails += 1
            back[index] = tail_index[length - 1] if length else -1
        if n_tails == 0:
            if (a1 - a0) * (b1 - b0) <= SMALL_GAP:
                _matching_blocks(a, a0, a1, b, b0, b1, pairs)
            return 0
        # walk the run back to front into tails[] (reused as the list of anchor indices)
        index = tail_index[n_tails - 1]
        length = n_tails
        while index >= 0:
            length -= 1
            tails[length] = <int32_t>index
            index = back[index]
        previous_i, previous_j = a0, b0
        for length in range(n_tails):
            i, j = candidates[tails[length]].i, candidates[tails[length]].j
            _patience(a, b, previous_i, i, previous_j, j, pairs)
            _push_pair(pairs, i, j)
            previous_i, previous_j = i + 1, j + 1
        _patience(a, b, previous_i, a1, previous_j, b1, pairs)
    finally:
        free(candidates)
        free(tails)
        free(tail_index)
        free(back)
    return 0


cdef int _by_first(const void *x, const void *y) noexcept nogil:
    cdef const int32_t *a = <const int32_t *>x
    cdef const int32_t *b = <const int32_t *>y
    return (a[0] > b[0]) - (a[0] < b[0])


cdef int _aligned(const uint32_t[:] a, const uint32_t[:] b, PairBuffer *pairs) except -1:
    """The sorted pairs of the patience alignment into ``pairs`` (the caller frees its data)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0
    _reserve(a, b)
    _patience(&a[0], &b[0], 0, a.shape[0], 0, b.shape[0], pairs)
    qsort(pairs.data, pairs.count, 2 * sizeof(int32_t), _by_first)
    return 0


def aligned_indices(const uint32_t[:] a, const uint32_t[:] b):
    """(i, j) for tokens of ``a`` aligned with equal tokens of ``b`` (patience diff), sorted."""
    cdef PairBuffer pairs
    cdef Py_ssize_t index
    pairs.data = NULL
    pairs.count = pairs.capacity = 0
    try:
        _aligned(a, b, &pairs)
        return [(pairs.data[2 * index], pairs.data[2 * index + 1]) for index in range(pairs.count)]
    finally:
        free(pairs.data)


def aligned_packed(const uint32_t[:] a, const uint32_t[:] b):
    """``aligned_indices`` flattened into one ``array('I')``: i0, j0, i1, j1, ..."""
    cdef PairBuffer pairs
    cdef uint32_t[:] view
    pairs.data = NULL
    pairs.count = pairs.capacity = 0
    try:
        _aligned(a, b, &pairs)
        out = array("I", bytes(8 * pairs.count))
        if pairs.count:
            view = out
            memcpy(&view[0], pairs.data, 8 * pairs.count)  # indices are never negative: int32 reads as uint32
        return out
    finally:
        free(pairs.data)


# ── callee lists ────────────────────────────────────────────────────────────

#: past this many comparisons the middle is one replacement (as in ``hotpatch.diff.align.opcodes``)
cdef int64_t MAX_MIDDLE_WORK = _MAX_MIDDLE_WORK


def equal_replacements(list a, list b):
    """``(a0, a1, b0, b1)`` of each "replace" opcode of ``hotpatch.diff.align.opcodes(a, b)`` whose two
    sides are as long, in order (any hashable elements: interned as ids here)."""
    cdef dict ids = {}
    key_a = array("I", [ids.setdefault(x, len(ids)) for x in a])
    key_b = array("I", [ids.setdefault(y, len(ids)) for y in b])
    return _equal_replacements(key_a, key_b)


cdef list _equal_replacements(const uint32_t[:] va, const uint32_t[:] vb):
    """``equal_replacements`` of two sequences of ids (equal elements, equal ids)."""
    cdef Py_ssize_t la = va.shape[0], lb = vb.shape[0], i, prefix = 0, suffix = 0, limit, ma, mb
    cdef Py_ssize_t previous_i, previous_j, next_i, next_j
    cdef list out = []
    cdef PairBuffer pairs
    limit = min(la, lb)
    while prefix < limit and va[prefix] == vb[prefix]:
        prefix += 1
    while suffix < limit - prefix and va[la - 1 - suffix] == vb[lb - 1 - suffix]:
        suffix += 1
    ma, mb = la - prefix - suffix, lb - prefix - suffix
    if ma == 0 or mb == 0:
        return out  # the middle is one insertion or deletion (or nothing)
    if <int64_t>ma * mb > MAX_MIDDLE_WORK:
        if ma == mb:
            out.append((prefix, prefix + ma, prefix, prefix + mb))
        return out
    pairs.data = NULL
    pairs.count = pairs.capacity = 0
    try:
        _reserve(va, vb)
        _matching_blocks(&va[0], prefix, prefix + ma, &vb[0], prefix, prefix + mb, &pairs)
        qsort(pairs.data, pairs.count, 2 * sizeof(int32_t), _by_first)
        # the matched elements rise on both sides: a gap on both sides between two of them is a replacement
        previous_i, previous_j = prefix, prefix
        for i in range(pairs.count + 1):
            if i < pairs.count:
                next_i, next_j = pairs.data[2 * i], pairs.data[2 * i + 1]
            else:
                next_i, next_j = prefix + ma, prefix + mb
            if next_i > previous_i and next_j > previous_j and next_i - previous_i == next_j - previous_j:
                out.append((previous_i, next_i, previous_j, next_j))
            previous_i, previous_j = next_i + 1, next_j + 1
    finally:
        free(pairs.data)
    return out


def aligned_callees(dict mapping, dict backward, list left, list right):
    """The unmatched callees of ``left`` and ``right`` that face each other between callees matched to each
    other (``mapping``: baseline -> patched of every pair, ``backward`` its inverse), then their ``lone_pair``;
    nothing when every one on one side is matched."""
    cdef dict ids = {}
    cdef Py_ssize_t i, j, n_left = len(left), n_right = len(right)
    cdef list out = []
    cdef uint32_t fresh = 0
    cdef object x, y
    if _all_in(mapping, left) or _all_in(backward, right):
        return out
    # a matched callee is its counterpart (interned), an unmatched one an id of its own
    key_a = array("I", bytes(4 * n_left))
    key_b = array("I", bytes(4 * n_right))
    cdef uint32_t[:] va = key_a
    cdef uint32_t[:] vb = key_b
    for i in range(n_left):
        y = mapping.get(left[i])
        if y is None:
            va[i] = fresh
            fresh += 1
        else:
            found = ids.get(y)
            if found is None:
                ids[y] = found = fresh
                fresh += 1
            va[i] = found
    for j in range(n_right):
        y = right[j]
        if y in backward:
            found = ids.get(y)
            if found is None:
                ids[y] = found = fresh
                fresh += 1
            vb[j] = found
        else:
            vb[j] = fresh
            fresh += 1
    for a0, a1, b0, b1 in _equal_replacements(va, vb):
        for i, j in zip(range(a0, a1), range(b0, b1)):
            x, y = left[i], right[j]
            if x not in mapping and y not in backward:
                out.append((x, y))
    out.extend(lone_pair(mapping, backward, left, right))
    return out


# ── uncovered bytes ─────────────────────────────────────────────────────────

def unfilled_gaps(const uint8_t[:] memory, list ranges, int64_t begin, int64_t limit):
    """The gaps of ``[begin, limit)`` between the sorted ``ranges`` ((begin, end, owner, index); index -1: a
    jump table, which keeps the key of the gap after it) that hold a byte other than int3/nop/zero or run
    past ``memory``: ``(anchor, part, gap_begin, gap_end)``, keyed by the last range that moved the cursor."""
    cdef list out = []
    cdef int64_t cursor = begin, start, end, stop, at, size = memory.shape[0]
    cdef Py_ssize_t i, n = len(ranges)
    cdef tuple item
    cdef uint8_t byte
    cdef bint filled
    anchor, part = None, 0
    for i in range(n + 1):
        if i < n:
            item = <tuple>ranges[i]
            start, end = item[0], item[1]
        else:
            start = end = limit
        if start > cursor:
            stop = start if start < limit else limit
            filled = stop <= size
            at = cursor
            while filled and at < stop:
                byte = memory[at]
                filled = byte == 0xCC or byte == 0x90 or byte == 0
                at += 1
            if not filled:
                out.append((anchor, part, cursor, stop))
        if end > cursor:
            cursor = end
            if i < n and item[3] != -1:
                anchor, part = item[2], item[3]
    return out


# ── reference pairs of aligned instructions ─────────────────────────────────

cdef struct Slot:
    uint32_t insn_rva
    int32_t index


cdef int _by_slot(const void *x, const void *y) noexcept nogil:
    cdef const Slot *a = <const Slot *>x
    cdef const Slot *b = <const Slot *>y
    if a.insn_rva != b.insn_rva:
        return (a.insn_rva > b.insn_rva) - (a.insn_rva < b.insn_rva)
    return (a.index > b.index) - (a.index < b.index)


cdef Slot *_slots(object refs, list listed, Py_ssize_t count) except NULL:
    """Each reference's instruction and index, sorted by both (a reference list is grouped by instruction
    with the references of one instruction in their order)."""
    cdef Slot *slots = <Slot *>malloc((count + 1) * sizeof(Slot))
    cdef const PackedRef *packed = NULL
    cdef Py_ssize_t i
    if slots == NULL:
        raise MemoryError()
    if listed is None:
        packed = <const PackedRef *><const char *>(<RefList>refs).packed
    for i in range(count):
        slots[i].insn_rva = packed[i].insn_rva if packed != NULL else <uint32_t>listed[i][1]
        slots[i].index = <int32_t>i
    qsort(slots, count, sizeof(Slot), _by_slot)
    return slots


cdef Py_ssize_t _first_at(const Slot *slots, Py_ssize_t count, uint32_t insn_rva) noexcept nogil:
    cdef Py_ssize_t low = 0, high = count, middle
    while low < high:
        middle = (low + high) // 2
        if slots[middle].insn_rva < insn_rva:
            low = middle + 1
        else:
            high = middle
    return low


def ref_pairs(refs_a, refs_b, const uint32_t[:] insn_rvas_a, const uint32_t[:] insn_rvas_b,
              const uint32_t[:] aligned):
    """The references of aligned instructions paired up: for each aligned (i, j) of ``aligned`` (flat),
    the references of instruction i zipped with those of instruction j when both have the same number."""
    cdef list out = []
    cdef list listed_a = None if type(refs_a) is RefList else list(refs_a)
    cdef list listed_b = None if type(refs_b) is RefList else list(refs_b)
    cdef Py_ssize_t count_a = len(refs_a), count_b = len(refs_b), k, at_a, at_b, end_a, end_b, m
    cdef uint32_t rva_a, rva_b
    cdef Slot *slots_a = NULL
    cdef Slot *slots_b = NULL
    if count_a == 0 or count_b == 0:
        return out
    try:
        slots_a = _slots(refs_a, listed_a, count_a)
        slots_b = _slots(refs_b, listed_b, count_b)
        for k in range(0, aligned.shape[0] - 1, 2):
            rva_a = insn_rvas_a[aligned[k]]
            at_a = _first_at(slots_a, count_a, rva_a)
            if at_a == count_a or slots_a[at_a].insn_rva != rva_a:
                continue
            rva_b = insn_rvas_b[aligned[k + 1]]
            at_b = _first_at(slots_b, count_b, rva_b)
            if at_b == count_b or slots_b[at_b].insn_rva != rva_b:
                continue
            end_a, end_b = at_a, at_b
            while end_a < count_a and slots_a[end_a].insn_rva == rva_a:
                end_a += 1
            while end_b < count_b and slots_b[end_b].insn_rva == rva_b:
                end_b += 1
            if end_a - at_a != end_b - at_b:
                continue
            for m in range(end_a - at_a):
                out.append((_ref(refs_a, listed_a, slots_a[at_a + m].index),
                            _ref(refs_b, listed_b, slots_b[at_b + m].index)))
    finally:
        free(slots_a)
        free(slots_b)
    return out


cdef inline object _ref(object refs, list listed, Py_ssize_t index):
    return listed[index] if listed is not None else (<RefList>refs)._tuple(index)


# ── reference scans ─────────────────────────────────────────────────────────

cdef inline bint _inside(tuple ranges, int64_t target):
    """Whether ``target`` lies in one of ``ranges`` (RVAs: compared as C integers, no Python int made)."""
    cdef tuple span
    cdef int64_t begin, end
    for span in ranges:
        begin, end = span[0], span[1]
        if begin <= target < end:
            return True
    return False


def callees(refs, tuple ranges, set starts, dict pointer_tables):
    """Functions a function reaches, in instruction order: direct call and branch targets outside
    its ``ranges`` that are function ``starts``, and the functions of ``pointer_tables`` it references."""
    cdef list out = []
    cdef tuple ref
    cdef int kind
    cdef object target
    cdef Py_ssize_t i, count = 0
    cdef const PackedRef *packed = _packed(refs, &count)
    if packed != NULL:
        for i in range(count):
            kind = packed[i].kind
            if kind == CALL_REL32 or kind == BRANCH_REL32 or kind == BRANCH_REL8:
                # most branches stay inside the function: told apart in C before any Python int is made
                if not _inside(ranges, packed[i].target):
                    target = packed[i].target
                    if target in starts:
                        out.append(target)
            elif pointer_tables:
                found = pointer_tables.get(packed[i].target)
                if found is not None:
                    out.extend(found)
        return out
    for ref in refs:
        target = ref[4]
        kind = ref[0]
        if kind == CALL_REL32 or kind == BRANCH_REL32 or kind == BRANCH_REL8:
            if target in starts and not _inside_any(ranges, target):
                out.append(target)
        else:
            found = pointer_tables.get(target)
            if found is not None:
                out.extend(found)
    return out


def targets_within(refs_lists, tuple spans):
    """The set of the targets of the given reference lists that lie in one of ``spans`` ((begin, end), ...)."""
    cdef set out = set()
    cdef Py_ssize_t i, k, count = 0, n_spans = len(spans)
    cdef const PackedRef *packed
    cdef int64_t target
    cdef int64_t *bounds = <int64_t *>malloc((2 * n_spans + 1) * sizeof(int64_t))
    if bounds == NULL:
        raise MemoryError()
    try:
        for k in range(n_spans):
            bounds[2 * k], bounds[2 * k + 1] = spans[k][0], spans[k][1]
        for refs in refs_lists:
            packed = _packed(refs, &count)
            if packed != NULL:
                for i in range(count):
                    target = packed[i].target
                    for k in range(n_spans):
                        if bounds[2 * k] <= target < bounds[2 * k + 1]:
                            out.add(target)
                            break
            else:
                for ref in refs:
                    if _inside_any(spans, ref[4]):
                        out.add(ref[4])
    finally:
        free(bounds)
    return out


cdef int _section_of(const int64_t *sections, Py_ssize_t n_sections, int64_t rva) noexcept nogil:
    """``TargetClassifier.section_flags``: the index of the last section starting at or before ``rva`` when
    ``rva`` lies before its end, else -1 (``sections``: begin, end, executable; sorted by begin)."""
    cdef Py_ssize_t low = 0, high = n_sections, middle
    while low < high:  # bisect_right on the begins
        middle = (low + high) // 2
        if rva < sections[3 * middle]:
            high = middle
        else:
            low = middle + 1
    if low == 0 or rva >= sections[3 * (low - 1) + 1]:
        return -1
    return <int>(low - 1)


cdef inline uint64_t _pointer_at(const uint8_t[:] memory, int64_t at) noexcept:
    """The little-endian pointer at ``at``; one cut short by the end of ``memory`` reads as the bytes there are."""
    cdef Py_ssize_t size = memory.shape[0], available = size - at if 0 <= at < size else 0, k
    cdef uint64_t value = 0
    if available > 8:
        available = 8
    for k in range(available):
        value |= (<uint64_t>memory[at + k]) << (8 * k)
    return value


def relocated_data(const uint8_t[:] memory, relocations, uint64_t image_base, tuple sections):
    """For each relocated slot in order: the pointer's target (its value less ``image_base``) when it lies
    in data, then the slot itself when it lies in data (``sections``: (begin, end, executable) sorted by
    begin; a pointer cut short by the end of ``memory`` reads as the bytes there are)."""
    cdef Py_ssize_t n_sections = len(sections), k
    cdef int64_t *bounds = <int64_t *>malloc((3 * n_sections + 1) * sizeof(int64_t))
    cdef list out = []
    cdef int64_t slot
    cdef uint64_t value
    cdef int found
    if bounds == NULL:
        raise MemoryError()
    try:
        for k in range(n_sections):
            bounds[3 * k], bounds[3 * k + 1], bounds[3 * k + 2] = sections[k][0], sections[k][1], sections[k][2]
        for item in relocations:
            slot = item
            value = _pointer_at(memory, slot)
            # below the image base the target is negative, far above it beyond every section: never data
            if value >= image_base and value - image_base < (<uint64_t>1 << 62):
                found = _section_of(bounds, n_sections, <int64_t>(value - image_base))
                if found >= 0 and not bounds[3 * found + 2]:
                    out.append(<int64_t>(value - image_base))
            found = _section_of(bounds, n_sections, slot)
            if found >= 0 and not bounds[3 * found + 2]:
                out.append(slot)
    finally:
        free(bounds)
    return out


# function starts by rva (open addressing, at most half full): a callee's index in a few probes, where a
# bisection among fifty thousand starts takes sixteen scattered reads
cdef struct StartSet:
    int64_t *rvas
    Py_ssize_t *indexes  # -1: an empty slot
    Py_ssize_t mask


cdef inline Py_ssize_t _start_slot(const StartSet *s, int64_t rva) noexcept nogil:
    cdef uint64_t h = <uint64_t>rva * <uint64_t>0x9E3779B97F4A7C15
    cdef Py_ssize_t slot = <Py_ssize_t>((h ^ (h >> 29)) & <uint64_t>s.mask)
    while s.indexes[slot] >= 0 and s.rvas[slot] != rva:
        slot = (slot + 1) & s.mask
    return slot


cdef int _start_set(StartSet *s, list rvas) except -1:
    """``s`` filled with ``rvas`` (distinct, each fitting int64) and their indexes; freed by ``_free_starts``."""
    cdef Py_ssize_t capacity = 16, n = len(rvas), i, slot
    cdef int64_t rva
    while capacity < 2 * n + 16:
        capacity *= 2
    s.mask = capacity - 1
    s.rvas = <int64_t *>malloc(capacity * sizeof(int64_t))
    s.indexes = <Py_ssize_t *>malloc(capacity * sizeof(Py_ssize_t))
    if s.rvas == NULL or s.indexes == NULL:
        raise MemoryError()
    memset(s.indexes, 0xff, capacity * sizeof(Py_ssize_t))
    for i in range(n):
        rva = rvas[i]
        slot = _start_slot(s, rva)
        s.rvas[slot], s.indexes[slot] = rva, i
    return 0


cdef inline Py_ssize_t _start_index(const StartSet *s, int64_t rva) noexcept nogil:
    """The function index of the start at ``rva``, or -1."""
    return s.indexes[_start_slot(s, rva)]


cdef void _free_starts(StartSet *s) noexcept:
    free(s.rvas)
    free(s.indexes)


cdef bint _is_key(const int64_t *keys, Py_ssize_t count, int64_t value) noexcept nogil:
    """Whether ``value`` is one of the sorted ``keys``."""
    cdef Py_ssize_t low = 0, high = count, middle
    while low < high:
        middle = (low + high) // 2
        if keys[middle] < value:
            low = middle + 1
        else:
            high = middle
    return low < count and keys[low] == value


cdef int _by_int64(const void *x, const void *y) noexcept nogil:
    cdef int64_t a = (<const int64_t *>x)[0], b = (<const int64_t *>y)[0]
    return (a > b) - (a < b)


cdef inline bint _fits_int64(object value):
    return -(<object>1 << 63) <= value < (<object>1 << 63)


cdef inline Py_ssize_t _reached(Py_ssize_t callee, Py_ssize_t caller, list rvas, list by_index, Py_ssize_t *last,
                                Py_ssize_t *first_met, Py_ssize_t n_first) except -1:
    """Function ``caller`` reaches ``callee``: its rva goes once onto the callee's callers list (made when
    first met, its index noted in ``first_met``); the new count of ``first_met``."""
    cdef list callers
    if last[callee] == caller:
        return n_first  # reached already from this function
    last[callee] = caller
    callers = by_index[callee]
    if callers is None:
        by_index[callee] = [rvas[caller]]
        first_met[n_first] = callee
        return n_first + 1
    callers.append(rvas[caller])
    return n_first


def call_graph(list refs_lists, list ranges_list, list rvas, set starts, dict pointer_tables, dict callees_out,
               callers_out):
    """``callees`` of every function (``refs_lists``, ``ranges_list`` and ``rvas`` side by side) into
    ``callees_out`` (rva -> callees), and each function's rva appended once to the list of every function
    it reaches in ``callers_out`` (in function order)."""
    if not _call_graph_indexed(refs_lists, ranges_list, rvas, starts, pointer_tables, callees_out, callers_out):
        _call_graph_by_dict(refs_lists, ranges_list, rvas, starts, pointer_tables, callees_out, callers_out)


cdef _call_graph_by_dict(list refs_lists, list ranges_list, list rvas, set starts, dict pointer_tables,
                         dict callees_out, callers_out):
    """The general case: ``callees`` per function, callers found by value."""
    cdef Py_ssize_t index
    cdef list out, found
    for index in range(len(rvas)):
        rva = rvas[index]
        out = callees(refs_lists[index], <tuple>ranges_list[index], starts, pointer_tables)
        callees_out[rva] = out
        for target in (dict.fromkeys(out) if len(out) > 1 else out):
            found = callers_out.get(target)
            if found is None:
                callers_out[target] = [rva]
            else:
                found.append(rva)


cdef bint _call_graph_indexed(list refs_lists, list ranges_list, list rvas, set starts, dict pointer_tables,
                              dict callees_out, callers_out) except -1:
    """``call_graph`` when ``starts`` is the set of ``rvas`` and every RefList is packed (the case of an
    image's table): a callee is looked up by bisection among the starts and each one's rva object taken
    from ``rvas`` (no Python int made per reference); a function's callers are deduplicated by index, and
    a data reference is looked up in ``pointer_tables`` only when it is one of its keys (sorted in C).
    Everything is built aside and written out at the end; False (nothing written) when a pointer table
    holds something other than a start, or the case does not apply."""
    cdef Py_ssize_t n = len(rvas), n_keys = len(pointer_tables), i, k, count, callee, n_first = 0
    cdef StartSet by_rva
    cdef int64_t *keys = NULL
    cdef Py_ssize_t *last = NULL
    cdef Py_ssize_t *first_met = NULL
    cdef const PackedRef *packed
    cdef int kind
    cdef int64_t target, begin, end
    cdef bint fragments
    cdef tuple ranges
    cdef list out, all_callees, by_index
    cdef object rva, found
    if n == 0 or len(starts) != n:
        return False
    for rva in rvas:
        if rva not in starts:
            return False
    for refs in refs_lists:
        if _packed(refs, &count) == NULL:
            return False
    by_rva.rvas = NULL
    by_rva.indexes = NULL
    keys = <int64_t *>malloc((n_keys + 1) * sizeof(int64_t))
    last = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    first_met = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    try:
        if keys == NULL or last == NULL or first_met == NULL:
            raise MemoryError()
        _start_set(&by_rva, rvas)
        for i in range(n):
            last[i] = -1
        k = 0
        for key in pointer_tables:
            if not _fits_int64(key):
                return False  # a key no packed target can equal: the general case says the same, slower
            keys[k] = key
            k += 1
        qsort(keys, n_keys, sizeof(int64_t), _by_int64)
        all_callees = [None] * n
        by_index = [None] * n  # each function's callers list, made when it is first reached
        for i in range(n):
            packed = _packed(refs_lists[i], &count)
            ranges = <tuple>ranges_list[i]
            begin, end = ranges[0] if ranges else (0, 0)
            fragments = len(ranges) > 1  # the own range was checked already
            out = []
            for k in range(count):
                kind = packed[k].kind
                target = packed[k].target
                if kind == CALL_REL32 or kind == BRANCH_REL32 or kind == BRANCH_REL8:
                    if begin <= target < end:
                        continue  # most branches stay in the function's own range: no look-up
                    callee = _start_index(&by_rva, target)
                    if callee < 0 or (fragments and _inside(ranges, target)):
                        continue
                    out.append(rvas[callee])
                    n_first = _reached(callee, i, rvas, by_index, last, first_met, n_first)
                elif n_keys and _is_key(keys, n_keys, target):
                    for found in pointer_tables[target]:
                        callee = _start_index(&by_rva, found) if _fits_int64(found) else -1
                        if callee < 0:
                            return False
                        out.append(found)
                        n_first = _reached(callee, i, rvas, by_index, last, first_met, n_first)
            all_callees[i] = out
        for i in range(n):
            callees_out[rvas[i]] = all_callees[i]
        for k in range(n_first):
            callers_out[rvas[first_met[k]]] = by_index[first_met[k]]
        return True
    finally:
        _free_starts(&by_rva)
        free(keys)
        free(last)
        free(first_met)


cdef bint _in_last_span(tuple spans, int64_t rva) except -1:
    """Whether ``rva`` lies before the end of the last of ``spans`` (sorted by begin) beginning at or before it."""
    cdef tuple span, last = None
    cdef int64_t begin
    for span in spans:
        begin = span[0]
        if begin > rva:
            break
        last = span
    return last is not None and rva < <int64_t>last[1]


def pointer_tables(const uint8_t[:] memory, relocations, uint64_t image_base, tuple code_spans, set starts):
    """Data address -> the function ``starts`` pointed at by the run of relocated 8-byte slots that begins
    there (a slot starts a run when the one 8 bytes before is not relocated and it lies outside
    ``code_spans``); only runs that point at a start are kept, in the order of ``relocations``. A pointer
    cut short by the end of ``memory`` reads as the bytes there are; ``code_spans`` sorted by begin, a slot
    in code when the last span beginning at or before it ends after it (``Image.is_executable_rva``)."""
    cdef Py_ssize_t n = len(relocations), i
    cdef int64_t *slots = <int64_t *>malloc((n + 1) * sizeof(int64_t))
    cdef int64_t at
    cdef uint64_t value
    cdef dict out = {}
    cdef list run
    cdef object target
    if slots == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            slots[i] = relocations[i]
        qsort(slots, n, sizeof(int64_t), _by_int64)
        for slot in relocations:
            at = slot
            if _is_key(slots, n, at - 8) or _in_last_span(code_spans, at):
                continue  # not the first slot of a run
            run = None
            while _is_key(slots, n, at):
                value = _pointer_at(memory, at)
                # below the image base the target is negative, far above it past every RVA: never a start
                if value >= image_base and value - image_base < (<uint64_t>1 << 62):
                    target = <int64_t>(value - image_base)
                    if target in starts:
                        if run is None:
                            run = [target]
                        else:
                            run.append(target)
                at += 8
            if run is not None:
                out[slot] = run
    finally:
        free(slots)
    return out


def ref_targets(refs_lists):
    """The set of every target of the given reference lists."""
    cdef set out = set()
    cdef Py_ssize_t i, count = 0
    cdef const PackedRef *packed
    for refs in refs_lists:
        packed = _packed(refs, &count)
        if packed != NULL:
            for i in range(count):
                out.add(packed[i].target)
        else:
            for ref in refs:
                out.add(ref[4])
    return out


cdef inline bint _inside_any(tuple ranges, object target):
    """``_inside`` for a target of any size (a RefList keeps targets outside int64 apart)."""
    cdef tuple span
    for span in ranges:
        if span[0] <= target < span[1]:
            return True
    return False


cdef inline bint _both_self(object target_a, object target_b, tuple ranges_a, tuple ranges_b, dict iat_a,
                            dict iat_b):
    """Both targets inside their own function (and no import slot): ``TargetClassifier.classify`` says
    ``self`` on both sides, which no pair is judged on."""
    return (_inside_any(ranges_a, target_a) and _inside_any(ranges_b, target_b)
            and target_a not in iat_a and target_b not in iat_b)


cdef inline bint _to_classify(object target_a, object target_b, tuple ranges_a, tuple ranges_b, dict iat_a,
                              dict iat_b, dict function_map, frozenset data_a, frozenset data_b, list data):
    """Whether a pair of targets is left to classify: not when the baseline's maps to the patched one, nor
    when both are data (then the pair goes into ``data``), nor when both stay inside their function."""
    mapped = function_map.get(target_a)
    if mapped is not None and mapped == target_b:
        return False
    if target_a in data_a and target_b in data_b:
        data.append((target_a, target_b))
        return False
    return not _both_self(target_a, target_b, ranges_a, ranges_b, iat_a, iat_b)


def triage_refs(refs_a, refs_b, list pairs, tuple ranges_a, tuple ranges_b, dict iat_a, dict iat_b,
                dict function_map, frozenset data_a, frozenset data_b):
    """Sort the reference pairs of two matched functions into (data pairs, pairs left to classify)."""
    return _triage(refs_a, refs_b, pairs, ranges_a, ranges_b, iat_a, iat_b, function_map, data_a, data_b)


cdef class RvaMap:
    """A ``function_map`` (RVA -> RVA) kept in C for the triage's commonest question, whether a baseline
    target maps to the patched one, asked before any Python int is made (open addressing, at most half
    full). Entries outside int64 are left out: for those the dict answers."""

    cdef int64_t *keys
    cdef int64_t *values
    cdef uint8_t *used
    cdef Py_ssize_t mask

    def __cinit__(self, dict mapping):
        cdef Py_ssize_t capacity = 16, slot
        cdef int64_t key, value
        while capacity < 2 * len(mapping) + 16:
            capacity *= 2
        self.mask = capacity - 1
        self.keys = <int64_t *>malloc(capacity * sizeof(int64_t))
        self.values = <int64_t *>malloc(capacity * sizeof(int64_t))
        self.used = <uint8_t *>malloc(capacity)
        if self.keys == NULL or self.values == NULL or self.used == NULL:
            raise MemoryError()
        memset(self.used, 0, capacity)
        for item_key, item_value in mapping.items():
            try:
                key, value = item_key, item_value
            except OverflowError:
                continue
            slot = self._slot(key)
            self.keys[slot], self.values[slot], self.used[slot] = key, value, 1

    def __dealloc__(self):
        free(self.keys)
        free(self.values)
        free(self.used)

    cdef inline Py_ssize_t _slot(self, int64_t key) noexcept nogil:
        cdef uint64_t h = <uint64_t>key * <uint64_t>0x9E3779B97F4A7C15
        cdef Py_ssize_t slot = <Py_ssize_t>((h ^ (h >> 31)) & <uint64_t>self.mask)
        while self.used[slot] and self.keys[slot] != key:
            slot = (slot + 1) & self.mask
        return slot

    cdef inline bint maps_to(self, int64_t key, int64_t value) noexcept nogil:
        cdef Py_ssize_t slot = self._slot(key)
        return self.used[slot] and self.values[slot] == value


def rva_map(dict function_map):
    """What ``triage_block`` takes as ``rva_map``: the function map kept in C."""
    return RvaMap(function_map)


def triage_block(functions_a, analyses_a, functions_b, analyses_b, list at_b, Py_ssize_t start, Py_ssize_t stop,
                 dict iat_a, dict iat_b, dict function_map, frozenset data_a, frozenset data_b, RvaMap rva_map,
                 unequal):
    """Per baseline function ``index`` in ``[start, stop)``, whose counterpart is ``functions_b[at_b[index]]``
    (-1: none): ``unequal`` when it has none or their fingerprints differ, else ``triage_refs`` without pairs
    of their references: None where both lists come back empty (nothing left to judge), else ``(data, rest)``.
    ``rva_map``, when not None, is ``rva_map(function_map)``."""
    cdef list out = [], data, rest
    cdef Py_ssize_t index, at
    cdef object fa, fb
    for index in range(start, stop):
        at = at_b[index]
        if at < 0:
            out.append(unequal)
            continue
        fa = functions_a[index]
        fb = functions_b[at]
        if not (fa.fingerprint == fb.fingerprint):
            out.append(unequal)
            continue
        data, rest = _triage(analyses_a[index].raw_refs, analyses_b[at].raw_refs, None, <tuple>fa.ranges,
                             <tuple>fb.ranges, iat_a, iat_b, function_map, data_a, data_b, rva_map)
        out.append((data, rest) if data or rest else None)
    return out


cdef tuple _triage(refs_a, refs_b, list pairs, tuple ranges_a, tuple ranges_b, dict iat_a, dict iat_b,
                   dict function_map, frozenset data_a, frozenset data_b, RvaMap rva_map=None):
    cdef list data = [], rest = []
    cdef tuple pair
    cdef Py_ssize_t i, n, count_a = 0, count_b = 0
    cdef object target_a, target_b, ra, rb
    cdef int64_t begin = ranges_a[0][0], end = ranges_a[0][1], raw_a
    cdef bint same_code = pairs is None
    cdef const PackedRef *packed_a = _packed(refs_a, &count_a) if same_code else NULL
    cdef const PackedRef *packed_b = _packed(refs_b, &count_b) if same_code else NULL
    if packed_a != NULL and packed_b != NULL:
        # equal fingerprints: the records zipped in order, read in place; a tuple only for what is kept
        for i in range(min(count_a, count_b)):
            raw_a = packed_a[i].target
            if begin <= raw_a < end and packed_a[i].kind != JUMP_TABLE:
                continue
            if rva_map is not None and rva_map.maps_to(raw_a, packed_b[i].target):
                continue  # a call to the matched function: dropped whether or not an import slot (no int made)
            target_a = raw_a
            if target_a in iat_a:
                continue
            target_b = packed_b[i].target
            if _to_classify(target_a, target_b, ranges_a, ranges_b, iat_a, iat_b, function_map, data_a, data_b,
                            data):
                rest.append(((<RefList>refs_a)._tuple(i), (<RefList>refs_b)._tuple(i)))
        return data, rest
    n = min(len(refs_a), len(refs_b)) if same_code else len(pairs)
    for i in range(n):
        if same_code:
            ra = refs_a[i]
            rb = refs_b[i]
            target_a = ra[4]
            if (begin <= target_a < end and ra[0] != JUMP_TABLE) or target_a in iat_a:
                continue
        else:
            pair = pairs[i]
            ra = pair[0]
            rb = pair[1]
            target_a = ra[4]
        if _to_classify(target_a, rb[4], ranges_a, ranges_b, iat_a, iat_b, function_map, data_a, data_b, data):
            rest.append((ra, rb))
    return data, rest


cdef bint _all_in(dict taken, list items):
    cdef object item
    for item in items:
        if item not in taken:
            return False
    return True


#: ``_free_one``'s answer when more than one element is free
cdef object _MANY = object()


def propagate(list queue, dict forward, dict backward, dict callees_a, dict callees_b, callers_a, callers_b,
              aligned_pairs, pair, set settled=None):
    """Call-graph propagation from the matched ``(a, b)`` of ``queue`` (taken from its end); a pair whose
    ``a`` is in ``settled`` is passed over, and one found able to offer nothing ever again goes in."""
    cdef list empty = [], left, right, new
    cdef object a, b, x, y, lone_a, lone_b
    cdef bint trivial
    while queue:
        a, b = queue.pop()
        if settled is not None and a in settled:
            continue
        left = callees_a.get(a, empty)
        right = callees_b.get(b, empty)
        trivial = _all_in(forward, left) or _all_in(backward, right)
        new = None if trivial else aligned_pairs(left, right)
        lone_a = _free_one(forward, callers_a.get(a, ()))
        if lone_a is None:
            lone_b = None
        elif lone_a is not _MANY or (trivial and settled is not None):
            lone_b = _free_one(backward, callers_b.get(b, ()))
        else:
            lone_b = _MANY  # not needed
        if lone_a is not None and lone_a is not _MANY and lone_b is not None and lone_b is not _MANY:
            if new is None:
                new = []
            new.append((lone_a, lone_b))
        elif trivial and settled is not None and (lone_a is None or lone_b is None):
            # every callee matched on one side, and no free caller on one side, stay so (pairs are never
            # undone): this pair offers nothing in any later pass
            settled.add(a)
        if new is None:
            continue
        for x, y in new:
            if x not in forward and y not in backward and pair(x, y):
                queue.append((x, y))


cdef Py_ssize_t _shared(set x, set y):
    """``len(x & y)`` without the set."""
    cdef Py_ssize_t count = 0
    cdef object item
    if len(x) > len(y):
        x, y = y, x
    for item in x:
        if item in y:
            count += 1
    return count


cdef void _note_best(Py_ssize_t *best, Py_ssize_t *ties, Py_ssize_t index, Py_ssize_t shared) noexcept:
    if shared > best[index]:
        best[index], ties[index] = shared, 1
    elif shared == best[index]:
        ties[index] += 1


def twins_by_neighbours(list groups, dict mapping, dict callees_a, callers_a, dict callees_b, callers_b,
                        Py_ssize_t limit, pair):
    """Per group ``(left, right)`` of twins (``len(left) * len(right)`` at most ``limit``), in order: each
    ``a`` scored against each ``b`` by how many of a's matched callers and callees (through ``mapping``) are
    b's callers and callees; ``pair(a, b)`` for each pair where each is the other's single best (a tie is
    no evidence), most shared first, then by rva."""
    cdef list left, right, neighbours_b, chosen
    cdef set mapped
    cdef Py_ssize_t n_left, n_right, i, j, k, shared, n_scored
    cdef Py_ssize_t *score_i = <Py_ssize_t *>malloc((limit + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *score_j = <Py_ssize_t *>malloc((limit + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *score = <Py_ssize_t *>malloc((limit + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *best = <Py_ssize_t *>malloc((2 * limit + 2) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *ties = <Py_ssize_t *>malloc((2 * limit + 2) * sizeof(Py_ssize_t))
    cdef object a, x, y
    try:
        if limit < 0:
            return  # no group fits (and no table of -1 entries)
        if score_i == NULL or score_j == NULL or score == NULL or best == NULL or ties == NULL:
            raise MemoryError()
        for group in groups:
            left, right = group
            n_left, n_right = len(left), len(right)
            if n_left * n_right > limit:
                continue
            n_scored = 0
            neighbours_b = None  # each b's, made once per group when needed
            for i in range(n_left):
                a = left[i]
                mapped = set()
                for x in callers_a.get(a, ()):
                    y = mapping.get(x)
                    if y is not None:
                        mapped.add(y)
                for x in callees_a.get(a, ()):
                    y = mapping.get(x)
                    if y is not None:
                        mapped.add(y)
                if not mapped:
                    continue
                if neighbours_b is None:
                    neighbours_b = [{*callers_b.get(b, ()), *callees_b.get(b, ())} for b in right]
                for j in range(n_right):
                    shared = _shared(mapped, <set>neighbours_b[j])
                    if shared:
                        score_i[n_scored], score_j[n_scored], score[n_scored] = i, j, shared
                        n_scored += 1
            if not n_scored:
                continue
            # best[:n_left] for each a, best[n_left:] for each b: the best shared count and how many reach it
            for k in range(n_left + n_right):
                best[k], ties[k] = 0, 0
            for k in range(n_scored):
                _note_best(best, ties, score_i[k], score[k])
                _note_best(best, ties, n_left + score_j[k], score[k])
            chosen = []
            for k in range(n_scored):
                i, j, shared = score_i[k], score_j[k], score[k]
                if shared == best[i] == best[n_left + j] and ties[i] == 1 and ties[n_left + j] == 1:
                    chosen.append((-shared, left[i], right[j]))
            chosen.sort()
            for _, x, y in chosen:
                pair(x, y)
    finally:
        free(score_i)
        free(score_j)
        free(score)
        free(best)
        free(ties)


cdef object _free_one(dict taken, seq):
    """The one distinct element of ``seq`` that is not a key of ``taken``; None when there is none,
    ``_MANY`` when there are more."""
    cdef object first = None, item
    for item in seq:
        if item in taken:
            continue
        if first is None:
            first = item
        elif item != first:
            return _MANY
    return first


def lone_pair(dict taken_left, dict taken_right, left, right):
    """``[(x, y)]`` when exactly one distinct element of ``left`` is not a key of ``taken_left`` and
    exactly one of ``right`` not of ``taken_right``; else ``[]``."""
    cdef object x = _lone(taken_left, left), y
    if x is None:
        return []
    y = _lone(taken_right, right)
    return [] if y is None else [(x, y)]


cdef object _lone(dict taken, seq):
    cdef object first = None, item
    for item in seq:
        if item in taken:
            continue
        if first is None:
            first = item
        elif item != first:
            return None
    return first


# ── verdict checks ──────────────────────────────────────────────────────────

def branch_targets_between(refs, int64_t low, int64_t high):
    """The set of the targets of the rel8/rel32 branches among ``refs`` strictly between ``low`` and ``high``."""
    cdef set out = set()
    cdef Py_ssize_t i, count = 0
    cdef int kind
    cdef const PackedRef *packed = _packed(refs, &count)
    if packed != NULL:
        for i in range(count):
            kind = packed[i].kind
            if (kind == BRANCH_REL8 or kind == BRANCH_REL32) and low < packed[i].target < high:
                out.add(packed[i].target)
        return out
    for ref in refs:
        if (ref[0] == BRANCH_REL8 or ref[0] == BRANCH_REL32) and low < ref[4] < high:
            out.add(ref[4])
    return out


def unsupported_refs(refs, tuple ranges, bint rel8_leaves, tuple sections, dict iat):
    """The references a package cannot relocate, in order: ``(0, insn_rva, target)`` for a rel8 branch leaving
    the function when ``rel8_leaves``, else ``(1, insn_rva, target)`` for a nonzero target in none of
    ``sections`` ((begin, end, executable) sorted by begin) nor in ``iat``; targets in ``ranges`` are left out."""
    cdef list out = []
    cdef Py_ssize_t i, k, count = 0, n_sections = len(sections)
    cdef int64_t target
    cdef const PackedRef *packed = _packed(refs, &count)
    cdef int64_t *bounds
    if packed == NULL:
        for ref in refs:
            wide = ref[4]
            if _inside_any(ranges, wide):
                continue
            if ref[0] == BRANCH_REL8 and rel8_leaves:
                out.append((0, ref[1], wide))
            elif wide != 0 and not _in_any_section(sections, wide) and wide not in iat:
                out.append((1, ref[1], wide))
        return out
    bounds = <int64_t *>malloc((3 * n_sections + 1) * sizeof(int64_t))
    if bounds == NULL:
        raise MemoryError()
    try:
        for k in range(n_sections):
            bounds[3 * k], bounds[3 * k + 1], bounds[3 * k + 2] = sections[k][0], sections[k][1], sections[k][2]
        for i in range(count):
            target = packed[i].target
            if _inside(ranges, target):  # most references: branches inside the function, told apart in C
                continue
            if packed[i].kind == BRANCH_REL8 and rel8_leaves:
                out.append((0, packed[i].insn_rva, target))
            elif target != 0 and _section_of(bounds, n_sections, target) < 0 and target not in iat:
                out.append((1, packed[i].insn_rva, target))
    finally:
        free(bounds)
    return out


cdef bint _in_any_section(tuple sections, object target):
    cdef tuple section
    for section in sections:
        if section[0] <= target < section[1]:
            return True
    return False


# ── data items ──────────────────────────────────────────────────────────────

cdef class DataSide:
    """One image's data items as ``items_equal`` reads them, kept as C arrays (``DataItems`` builds one per
    image): what the twin bisects in Python lists, bisected here without a Python int per step."""

    cdef const uint8_t[:] memory
    cdef object starts_array, sections_array, relocations_array  # own the buffers read below
    cdef const int64_t[:] starts
    cdef const int64_t[:] section_rvas
    cdef const int64_t[:] section_ends
    cdef const int64_t[:] relocations
    cdef object image_base
    cdef object functions
    cdef int64_t max_item

    def __init__(self, const uint8_t[:] memory, starts, section_rvas, section_ends, relocations, image_base,
                 functions, int64_t max_item):
        self.memory = memory
        self.starts_array = array("q", starts)
        self.sections_array = (array("q", section_rvas), array("q", section_ends))
        self.relocations_array = array("q", relocations)
        self.starts = self.starts_array
        self.section_rvas, self.section_ends = self.sections_array
        self.relocations = self.relocations_array
        self.image_base = image_base
        self.functions = functions
        self.max_item = max_item

    cdef int64_t extent(self, int64_t rva) noexcept:
        cdef Py_ssize_t index = _bisect_right(self.section_rvas, rva) - 1
        if index < 0 or rva >= self.section_ends[index]:
            return 0
        cdef int64_t limit = min(self.section_ends[index], rva + self.max_item)
        cdef Py_ssize_t following = _bisect_right(self.starts, rva)
        if following < self.starts.shape[0]:
            limit = min(limit, self.starts[following])
        return max(0, limit - rva)

    cdef object pointer_at(self, int64_t rva):
        """``struct.unpack_from("<Q", memory, rva)[0] - image_base``, with struct's error past the end."""
        cdef Py_ssize_t size = self.memory.shape[0]
        cdef uint64_t value = 0
        if rva < 0 or rva + 8 > size:
            import struct
            raise struct.error(f"unpack_from requires a buffer of at least {rva + 8} bytes for unpacking 8 bytes "
                               f"at offset {rva} (actual buffer size is {size})")
        memcpy(&value, &self.memory[rva], 8)  # x64 images on a little-endian host: the value as stored
        return value - self.image_base


cdef inline Py_ssize_t _bisect_right(const int64_t[:] values, int64_t x) noexcept:
    cdef Py_ssize_t low = 0, high = values.shape[0], middle
    while low < high:
        middle = (low + high) // 2
        if x < values[middle]:
            high = middle
        else:
            low = middle + 1
    return low


cdef inline Py_ssize_t _bisect_left(const int64_t[:] values, int64_t x) noexcept:
    cdef Py_ssize_t low = 0, high = values.shape[0], middle
    while low < high:
        middle = (low + high) // 2
        if values[middle] < x:
            low = middle + 1
        else:
            high = middle
    return low


def data_side(memory, starts, section_rvas, section_ends, relocations, image_base, functions, int64_t max_item):
    return DataSide(memory, starts, section_rvas, section_ends, relocations, image_base, functions, max_item)


def item_extent(DataSide side, int64_t rva):
    return side.extent(rva)


cdef inline bint _same_bytes(DataSide a, DataSide b, int64_t rva_a, int64_t rva_b, int64_t low,
                             int64_t high) noexcept:
    """``memory[rva + low:rva + high]`` equal on both sides, each cut at the end of its memory as a slice is."""
    cdef int64_t end_a = min(rva_a + high, <int64_t>a.memory.shape[0])
    cdef int64_t end_b = min(rva_b + high, <int64_t>b.memory.shape[0])
    cdef int64_t size_a = max(0, end_a - (rva_a + low))
    cdef int64_t size_b = max(0, end_b - (rva_b + low))
    if size_a != size_b:
        return False
    return size_a == 0 or memcmp(&a.memory[rva_a + low], &b.memory[rva_b + low], size_a) == 0


def items_equal(DataSide a, DataSide b, int64_t rva_a, int64_t rva_b, dict function_map):
    """The twin's ``items_equal``: slots compared in order as it does (its errors at the same slot), then the
    bytes between the whole slots compared in place instead of zeroed in two copies."""
    cdef int64_t length = min(a.extent(rva_a), b.extent(rva_b))
    if length <= 0:
        return True
    cdef Py_ssize_t low_a = _bisect_left(a.relocations, rva_a), high_a = _bisect_left(a.relocations, rva_a + length)
    cdef Py_ssize_t low_b = _bisect_left(b.relocations, rva_b), high_b = _bisect_left(b.relocations, rva_b + length)
    cdef Py_ssize_t k, count = high_a - low_a
    if count != high_b - low_b:
        return False
    for k in range(count):
        if a.relocations[low_a + k] - rva_a != b.relocations[low_b + k] - rva_b:
            return False
    if count == 0:  # no pointers: the bytes alone decide
        return _same_bytes(a, b, rva_a, rva_b, 0, length)
    cdef int64_t slot, cursor = 0
    cdef bint same = True
    for k in range(count):
        slot = a.relocations[low_a + k] - rva_a
        if slot + 8 > length:
            continue
        target_a = a.pointer_at(rva_a + slot)
        target_b = b.pointer_at(rva_b + slot)
        mapped = function_map.get(target_a)
        if mapped is not None and mapped != target_b:
            return False
        if mapped is None and (target_a in a.functions or target_b in b.functions):
            return False  # a removed function, or one the old pointer did not designate
        if same and slot > cursor:
            same = _same_bytes(a, b, rva_a, rva_b, cursor, slot)
        cursor = max(cursor, slot + 8)
    return same and _same_bytes(a, b, rva_a, rva_b, cursor, length)


def lists_reaching(refs_lists, targets):
    """The indexes of the reference lists with a target in ``targets`` (a set), in order: the set's members sorted
    in a C array once, each packed record bisected there (no Python int per reference)."""
    cdef list out = []
    cdef Py_ssize_t i, at, index = 0, count = 0, n
    cdef const PackedRef *packed
    cdef const int64_t[:] wanted
    try:
        wanted = array("q", sorted(targets))
    except OverflowError:  # a member outside int64: the lists are read as tuples
        wanted = None
    for refs in refs_lists:
        packed = _packed(refs, &count) if wanted is not None else NULL
        if packed != NULL:
            n = wanted.shape[0]
            for i in range(count):
                at = _bisect_left(wanted, packed[i].target)
                if at < n and wanted[at] == packed[i].target:
                    out.append(index)
                    break
        else:
            for ref in refs:
                if ref[4] in targets:
                    out.append(index)
                    break
        index += 1
    return out


# ── unique-key matching ─────────────────────────────────────────────────────

def unique_pairs(list keys_a, list rvas_a, list keys_b, list rvas_b):
    """``(rvas_a[i], rvas_b[j])`` for each key set (truthy) that is ``keys_a[i]`` alone in ``keys_a`` and
    ``keys_b[j]`` alone in ``keys_b``, in baseline order."""
    cdef dict at_a = {}, at_b = {}
    cdef list out = []
    cdef Py_ssize_t i, n_a = len(keys_a), n_b = len(keys_b)
    cdef object key, found
    # each key's index, or _MANY once it is met again
    for i in range(n_a):
        key = keys_a[i]
        at_a[key] = _MANY if key in at_a else i
    for i in range(n_b):
        key = keys_b[i]
        at_b[key] = _MANY if key in at_b else i
    for i in range(n_a):
        key = keys_a[i]
        if not key or at_a[key] is _MANY:
            continue
        found = at_b.get(key)
        if found is not None and found is not _MANY:
            out.append((rvas_a[i], rvas_b[<Py_ssize_t>found]))
    return out
