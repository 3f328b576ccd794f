# cython: language_level=3, boundscheck=False, wraparound=False
"""The .pdata table in one compiled pass: ``DirectoryReader.runtime_functions``'s loop for the common table.

It takes the table only when every entry is one the loop would keep without a word (no empty entry, each
inside an executable section, each UNWIND_INFO and what it chains to inside the image) and gives what the
loop and ``fold_chains`` give: the RuntimeFunctions, sorted, chained fragments folded into their roots,
every object built through its slots. Anything else gives None, and the Python loop, its twin, reads the table and names
the entry at fault; tests/test_pe_headers.py holds the two equal on real binaries and random tables.
"""

from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

__all__ = ["read_pdata"]

cdef enum:
    UNW_FLAG_EHANDLER = 1
    UNW_FLAG_UHANDLER = 2
    UNW_FLAG_CHAININFO = 4
    MAX_CHAIN = 32          # links followed, as directories._MAX_CHAIN


cdef inline uint32_t _u32(const uint8_t *at) noexcept nogil:
    cdef uint32_t value = 0
    memcpy(&value, at, 4)  # .pdata is little-endian, as every host this runs on
    return value


cdef int64_t _root_of(const uint8_t *memory, int64_t limit, uint32_t chained_begin, uint32_t parent) noexcept nogil:
    """The begin of the root a chained entry belongs to (its tail names ``(chained_begin, ?, parent)``), link
    for link as the loop's walk: at most MAX_CHAIN reads, stopping at an unwind RVA outside the image or one
    that chains no further; -1 where the loop's checked reads would raise (a tail outside the image)."""
    cdef int depth = 0
    cdef int64_t root_begin = chained_begin, tail
    cdef uint8_t flags, codes
    cdef bint more = True
    while more and depth < MAX_CHAIN:
        root_begin = chained_begin
        if <int64_t>parent + 4 > limit:
            more = False
        else:
            flags = memory[parent] >> 3
            codes = memory[parent + 2]
            tail = <int64_t>parent + 4 + 2 * (codes + (codes & 1))
            if flags & UNW_FLAG_CHAININFO:
                if tail + 12 > limit:
                    return -1
                chained_begin, parent = _u32(memory + tail), _u32(memory + tail + 8)
            else:
                if flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER) and tail + 4 > limit:
                    return -1
                more = False
        depth += 1
    return root_begin


cdef object _made(object cls, tuple descriptors, tuple values):
    """A ``cls`` object (a slotted frozen dataclass) with ``values`` set through its slots' C setters."""
    cdef object made = (<PyTypeObject *>cls).tp_new(<type>cls, <PyObject *>(), NULL)
    cdef Py_ssize_t i
    for i in range(len(descriptors)):
        Py_TYPE(descriptors[i]).tp_descr_set(descriptors[i], made, values[i])
    return made


cdef tuple _slots_of(object cls, Py_ssize_t count):
    descriptors = tuple([cls.__dict__[name] for name in cls.__slots__])
    if len(descriptors) != count or {type(d).__name__ for d in descriptors} != {"member_descriptor"}:
        raise TypeError(f"{cls!r} is not a slotted class of {count} fields")
    return descriptors


def read_pdata(const uint8_t[:] memory, const uint8_t[:] table, list executable, object unwind_cls,
               object runtime_cls):
    """The RuntimeFunctions (``runtime_cls``, sorted by begin) of the RUNTIME_FUNCTION entries in ``table``
    (a multiple of 12 bytes) over the mapped ``memory``, ``executable`` the (begin, end) of each executable
    section; None where the Python loop must read it. ``unwind_cls`` is ``UnwindInfo``."""
    cdef Py_ssize_t count = table.shape[0] // 12, i, s
    cdef int64_t limit = memory.shape[0]
    cdef const uint8_t *base = &memory[0] if limit else NULL
    cdef Py_ssize_t n_sections = len(executable)
    cdef int64_t spans[64]
    # the roots in table order: (begin, end) pairs and their UnwindInfos; MSVC writes .pdata sorted by begin, so
    # they are usually already what the loop's dict gives sorted (each begin once, the last entry's)
    cdef uint32_t *bounds
    cdef Py_ssize_t n_roots = 0
    cdef bint ascending = True
    if base == NULL or n_sections > 32:
        return None
    for s in range(n_sections):
        spans[2 * s], spans[2 * s + 1] = executable[s]
    descriptors = _slots_of(unwind_cls, 8)
    bounds = <uint32_t *>malloc((2 * count + 2) * sizeof(uint32_t))
    if bounds == NULL:
        raise MemoryError()
    try:
        infos = []
        fragments = {}
        if not _read_entries(base, limit, &table[0] if count else NULL, count, spans, n_sections, descriptors,
                             unwind_cls, bounds, &n_roots, &ascending, infos, fragments):
            return None
        runtime_slots = _slots_of(runtime_cls, 5)
        if ascending:
            return _folded_in_order(bounds, infos, fragments, unwind_cls, descriptors, runtime_cls, runtime_slots)
        roots = {}
        for i in range(n_roots):
            roots[bounds[2 * i]] = (bounds[2 * i + 1], infos[i])
        return _folded(roots, fragments, unwind_cls, descriptors, runtime_cls, runtime_slots)
    finally:
        free(bounds)


cdef bint _read_entries(const uint8_t *base, int64_t limit, const uint8_t *table, Py_ssize_t count,
                        const int64_t *spans, Py_ssize_t n_sections, tuple descriptors, object unwind_cls,
                        uint32_t *bounds, Py_ssize_t *n_roots, bint *ascending, list infos,
                        dict fragments) except -1:
    """The loop over the entries: each root's (begin, end) into ``bounds`` and its UnwindInfo into ``infos`` in
    table order (``ascending`` whether their begins rise strictly), chained ones into ``fragments`` by their
    root's begin; False where the Python loop must read the table."""
    cdef Py_ssize_t i, s
    cdef int64_t tail, low = 0, high = 0
    cdef uint32_t begin, end, unwind_rva
    cdef uint8_t head, flags, codes
    cdef int64_t root_begin
    heads = {}  # unwind RVA -> its UnwindInfo (roots share them)
    for i in range(count):
        begin, end, unwind_rva = _u32(&table[12 * i]), _u32(&table[12 * i + 4]), _u32(&table[12 * i + 8])
        if not (low <= begin < end <= high):
            for s in range(n_sections):
                low, high = spans[2 * s], spans[2 * s + 1]
                if low <= begin < end <= high:
                    break
            else:
                return False  # an empty entry, or one outside every executable section
        if <int64_t>unwind_rva + 4 > limit:
            return False
        head, codes = base[unwind_rva], base[unwind_rva + 2]
        flags = head >> 3
        tail = <int64_t>unwind_rva + 4 + 2 * (codes + (codes & 1))
        if flags & UNW_FLAG_CHAININFO:
            if tail + 12 > limit:
                return False
            root_begin = _root_of(base, limit, _u32(base + tail), _u32(base + tail + 8))
            if root_begin < 0:
                return False
            chain = fragments.get(root_begin)
            if chain is None:
                chain = fragments[root_begin] = []
            chain.append((begin, end, unwind_rva))
            continue
        info = heads.get(unwind_rva)
        if info is None:
            handler = None
            if flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER):
                if tail + 4 > limit:
                    return False
                handler = _u32(base + tail)
            info = heads[unwind_rva] = _made(unwind_cls, descriptors, (
                unwind_rva, head & 7, flags, base[unwind_rva + 1], codes, base[unwind_rva + 3] & 0xF,
                base[unwind_rva + 3] >> 4, handler))
        if n_roots[0] and begin <= bounds[2 * n_roots[0] - 2]:
            ascending[0] = False
        bounds[2 * n_roots[0]], bounds[2 * n_roots[0] + 1] = begin, end
        infos.append(info)
        n_roots[0] += 1
    return True


cdef tuple _folded_in_order(const uint32_t *bounds, list infos, dict fragments, object unwind_cls,
                            tuple unwind_slots, object runtime_cls, tuple runtime_slots):
    """``_folded`` of roots whose begins rise strictly (``bounds`` and ``infos`` in that order): the dict and
    its sort would give the same roots in the same order."""
    cdef tuple empty = ()
    cdef Py_ssize_t i
    out = []
    for i in range(len(infos)):
        begin = bounds[2 * i]
        chain = fragments.pop(begin, None) if fragments else None
        if chain is None:
            out.append(_made(runtime_cls, runtime_slots, (begin, bounds[2 * i + 1], infos[i], empty, empty)))
            continue
        own = sorted([r for r in chain if r[0] != begin])
        out.append(_made(runtime_cls, runtime_slots, (begin, bounds[2 * i + 1], infos[i],
                                                      tuple([(r[0], r[1]) for r in own]), tuple([r[2] for r in own]))))
    return _orphans(out, fragments, unwind_cls, unwind_slots, runtime_cls, runtime_slots)


cdef tuple _folded(dict roots, dict fragments, object unwind_cls, tuple unwind_slots, object runtime_cls,
                   tuple runtime_slots):
    """``image.fold_chains`` of the pass's roots and fragments (its twin, line for line), the objects built
    through their slots: a RuntimeFunction per root with its chained fragments, then the orphaned ones."""
    cdef tuple empty = ()
    out = []
    for begin in sorted(roots):  # the keys alone: fold_chains sorts the items, whose begins are unique
        end, unwind = roots[begin]
        chain = fragments.pop(begin, None)
        if chain is None:
            out.append(_made(runtime_cls, runtime_slots, (begin, end, unwind, empty, empty)))
            continue
        own = sorted([r for r in chain if r[0] != begin])
        out.append(_made(runtime_cls, runtime_slots, (begin, end, unwind, tuple([(r[0], r[1]) for r in own]),
                                                      tuple([r[2] for r in own]))))
    return _orphans(out, fragments, unwind_cls, unwind_slots, runtime_cls, runtime_slots)


cdef tuple _orphans(list out, dict fragments, object unwind_cls, tuple unwind_slots, object runtime_cls,
                    tuple runtime_slots):
    """``out`` and a RuntimeFunction for each fragment whose root is not in the table, sorted."""
    cdef tuple empty = ()
    for ranges in fragments.values():
        for start, end, unwind_rva in ranges:
            out.append(_made(runtime_cls, runtime_slots, (
                start, end, _made(unwind_cls, unwind_slots, (unwind_rva, 0, 0, 0, 0, 0, 0, None)), empty, empty)))
    if fragments:
        out.sort(key=_begin_of)
    return tuple(out)


def _begin_of(function):
    return function.begin_rva
