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
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

from hotpatch.analysis._refkinds cimport BRANCH_REL8, BRANCH_REL32, CALL_REL32, JUMP_TABLE

IMPLEMENTATION = "cython"

#: gaps without unique anchors up to this many comparisons are aligned by longest matching blocks
cdef int64_t SMALL_GAP = 20000


# ── tokens ──────────────────────────────────────────────────────────────────

cdef struct Mask:
    uint32_t insn_rva
    int32_t offset
    int32_t size


cdef int _by_insn(const void *x, const void *y) noexcept nogil:
    cdef const Mask *a = <const Mask *>x
    cdef const Mask *b = <const Mask *>y
    return (a.insn_rva > b.insn_rva) - (a.insn_rva < b.insn_rva)


def token_ids(const uint8_t[:] memory, const uint32_t[:] insn_rvas, int64_t end_rva, refs, dict intern):
    """Each instruction's bytes with its reference operands zeroed, as ids interned in ``intern``."""
    cdef Py_ssize_t count = insn_rvas.shape[0], n_masks = 0, m = 0, i, k
    cdef Py_ssize_t size_of_memory = memory.shape[0]
    cdef Mask *masks = <Mask *>malloc((len(refs) + 1) * sizeof(Mask))
    cdef uint8_t raw[16]
    cdef int64_t rva, end, length, begin_zero, end_zero
    out = array("I", bytes(4 * count))
    cdef uint32_t[:] ids = out
    if masks == NULL:
        raise MemoryError()
    try:
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
            token = PyBytes_FromStringAndSize(<char *>raw, length)
            found = intern.get(token)
            if found is None:
                found = len(intern)
                intern[token] = found
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


def aligned_indices(const uint32_t[:] a, const uint32_t[:] b):
    """(i, j) for tokens of ``a`` aligned with equal tokens of ``b`` (patience diff), sorted."""
    cdef PairBuffer pairs
    cdef Py_ssize_t index
    pairs.data = NULL
    pairs.count = pairs.capacity = 0
    if a.shape[0] == 0 or b.shape[0] == 0:
        return []
    _reserve(a, b)
    try:
        _patience(&a[0], &b[0], 0, a.shape[0], 0, b.shape[0], &pairs)
        qsort(pairs.data, pairs.count, 2 * sizeof(int32_t), _by_first)
        return [(pairs.data[2 * index], pairs.data[2 * index + 1]) for index in range(pairs.count)]
    finally:
        free(pairs.data)


# ── reference scans ─────────────────────────────────────────────────────────

def callees(refs, tuple ranges, set starts, dict pointer_tables):
    """Functions a function reaches, in instruction order: direct call and branch targets outside
    its ``ranges`` that are function ``starts``, and the functions of ``pointer_tables`` it references."""
    cdef list out = []
    cdef tuple ref, span
    cdef int kind
    cdef bint inside
    cdef object target
    for ref in refs:
        target = ref[4]
        kind = ref[0]
        if kind == CALL_REL32 or kind == BRANCH_REL32 or kind == BRANCH_REL8:
            if target in starts:
                inside = False
                for span in ranges:
                    if span[0] <= target < span[1]:
                        inside = True
                        break
                if not inside:
                    out.append(target)
        else:
            found = pointer_tables.get(target)
            if found is not None:
                out.extend(found)
    return out


def triage_refs(refs_a, refs_b, list pairs, int64_t begin, int64_t end, dict iat, dict function_map,
                frozenset data_a, frozenset data_b):
    """Sort the reference pairs of two matched functions into (data pairs, pairs left to classify)."""
    cdef list data = [], rest = []
    cdef tuple ra, rb, pair
    cdef Py_ssize_t i, n
    cdef object target_a, target_b
    cdef bint same_code = pairs is None
    n = min(len(refs_a), len(refs_b)) if same_code else len(pairs)
    for i in range(n):
        if same_code:
            ra = refs_a[i]
            rb = refs_b[i]
            target_a = ra[4]
            if (begin <= target_a < end and ra[0] != JUMP_TABLE) or target_a in iat:
                continue
        else:
            pair = pairs[i]
            ra = pair[0]
            rb = pair[1]
            target_a = ra[4]
        target_b = rb[4]
        mapped = function_map.get(target_a)
        if mapped is not None and mapped == target_b:
            continue
        if target_a in data_a and target_b in data_b:
            data.append((target_a, target_b))
        else:
            rest.append((ra, rb))
    return data, rest
