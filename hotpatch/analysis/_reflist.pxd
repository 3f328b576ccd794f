"""``RefList``'s layout, for the compiled modules that build or read it without going through Python."""

from libc.stdint cimport int64_t, uint8_t, uint32_t

from hotpatch.analysis._buffers cimport Ref


cdef packed struct PackedRef:
    int64_t target
    uint32_t insn_rva
    uint8_t kind
    uint8_t operand_offset
    uint8_t operand_size


cdef class RefList:
    cdef bytes packed       # PackedRef records
    cdef Py_ssize_t count
    cdef dict wide          # index -> target for the rare targets outside int64 (an ABS64 of garbage)

    @staticmethod
    cdef RefList _of(bytes packed, dict wide)

    cdef object _tuple(self, Py_ssize_t index)

    cpdef list tolist(self)


cdef RefList pack_refs(const Ref *refs, Py_ssize_t count, object image_base)
