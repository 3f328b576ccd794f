"""The decoder's growable C buffers (its loop runs without the GIL): decoded instructions, references,
jump tables, and per function the data it skips; ``_reflist`` packs the references from them."""

from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset


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


cdef inline int _grow(void **data, size_t *capacity, size_t wanted, size_t item) noexcept nogil:
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


cdef inline void _free_decoded(Decoded *out) noexcept nogil:
    free(out.rvas)
    free(out.refs)
    free(out.tables)
    free(out.targets)
    free(out.skips)
    free(out.reads)
    memset(out, 0, sizeof(Decoded))
