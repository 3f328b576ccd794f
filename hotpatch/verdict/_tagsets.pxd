"""The ownership scan's sets: what each place may hold, as one sorted vector of ``location << 32 | tag``
codes (``_ownership.pyx``), and small searches over sorted and unsorted vectors. The ones that allocate
return -1 with MemoryError set when the vector cannot grow."""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libcpp.vector cimport vector


cdef extern from "<algorithm>" namespace "std" nogil:
    const uint64_t *lower_bound(const uint64_t *first, const uint64_t *last, const uint64_t &value)
    bint binary_search(const int64_t *first, const int64_t *last, const int64_t &value)


cdef inline size_t _lower(const vector[uint64_t] &codes, uint64_t key) noexcept nogil:
    cdef const uint64_t *first = codes.const_data()
    return lower_bound(first, first + codes.size(), key) - first


cdef inline int _held(const vector[uint64_t] &tags, uint64_t loc, vector[uint32_t] &out) except -1 nogil:
    """The tags ``loc`` holds, in order."""
    cdef size_t i = _lower(tags, loc << 32), end = _lower(tags, (loc + 1) << 32)
    out.clear()
    while i < end:
        out.push_back(<uint32_t>(tags[i] & 0xffffffffu))
        i += 1
    return 0


cdef inline int _set(vector[uint64_t] &tags, uint64_t loc, const vector[uint32_t] &held,
                     vector[uint64_t] &scratch) except -1 nogil:
    """``loc`` holds ``held`` (sorted) and nothing else; an empty ``held`` drops it."""
    cdef size_t lo = _lower(tags, loc << 32), hi = _lower(tags, (loc + 1) << 32), i
    if lo == hi and held.empty():
        return 0
    scratch.clear()
    for i in range(lo):
        scratch.push_back(tags[i])
    for i in range(held.size()):
        scratch.push_back((loc << 32) | held[i])
    for i in range(hi, tags.size()):
        scratch.push_back(tags[i])
    tags.swap(scratch)
    return 0


cdef inline void _drop(vector[uint64_t] &tags, uint64_t loc) noexcept nogil:
    cdef size_t lo = _lower(tags, loc << 32), hi = _lower(tags, (loc + 1) << 32)
    if lo < hi:
        tags.erase(tags.begin() + lo, tags.begin() + hi)


cdef inline bint _subset_of(const vector[uint64_t] &a, const uint64_t *b, size_t b_size) noexcept nogil:
    """Whether ``a`` is a subset of the ``b_size`` sorted codes at ``b``."""
    cdef size_t i = 0, j = 0
    while i < a.size():
        while j < b_size and b[j] < a[i]:
            j += 1
        if j == b_size or b[j] != a[i]:
            return False
        i += 1
        j += 1
    return True


cdef inline int _union_of(const uint64_t *a, size_t a_size, const vector[uint64_t] &b,
                          vector[uint64_t] &out) except -1 nogil:
    """``out`` becomes the union of the ``a_size`` sorted codes at ``a`` and ``b``."""
    cdef size_t i = 0, j = 0
    out.clear()
    while i < a_size or j < b.size():
        if j == b.size() or (i < a_size and a[i] < b[j]):
            out.push_back(a[i])
            i += 1
        elif i == a_size or b[j] < a[i]:
            out.push_back(b[j])
            j += 1
        else:
            out.push_back(a[i])
            i += 1
            j += 1
    return 0


cdef inline bint _sorted_has(const vector[int64_t] &values, int64_t value) noexcept nogil:
    cdef const int64_t *first = values.const_data()
    return binary_search(first, first + values.size(), value)


cdef inline bint _has(const vector[int64_t] &values, int64_t value) noexcept nogil:
    cdef size_t i
    for i in range(values.size()):
        if values[i] == value:
            return True
    return False
