# cython: language_level=3, boundscheck=False, wraparound=False
"""A function's references packed: ``RefList``, made by the decoder (``_decode.pyx``), read by the
fingerprints, discovery's kernels and the diff as the tuples the pure-Python twin gives."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from hotpatch.analysis._buffers cimport Ref
from hotpatch.analysis._refkinds cimport ABS64


cdef class RefList:
    """A function's references as packed records; reads as the list of ``(kind, insn_rva,
    operand_offset, operand_size, target)`` tuples the pure-Python twin returns (equal to it, item by
    item), at a tenth of the memory: a large image has millions of references, kept for the whole diff."""
    @staticmethod
    cdef RefList _of(bytes packed, dict wide):
        cdef RefList out = RefList.__new__(RefList)
        out.packed = packed
        out.count = len(packed) // sizeof(PackedRef)
        out.wide = wide
        return out

    cdef object _tuple(self, Py_ssize_t index):
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


cdef RefList pack_refs(const Ref *refs, Py_ssize_t count, object image_base):
    """The RefList of ``count`` decoded references (ABS64 values made image-relative here, with the GIL)."""
    cdef bytes packed = PyBytes_FromStringAndSize(NULL, count * sizeof(PackedRef))
    cdef PackedRef *out = <PackedRef *><char *>packed
    cdef Py_ssize_t index
    cdef dict wide = None
    cdef bint base_fits = 0 <= image_base < (1 << 64)  # a PE32+ image base always does
    cdef uint64_t base = image_base if base_fits else 0, value
    for index in range(count):
        out[index].insn_rva = <uint32_t>refs[index].insn_rva
        out[index].kind = <uint8_t>refs[index].kind
        out[index].operand_offset = <uint8_t>refs[index].operand_offset
        out[index].operand_size = <uint8_t>refs[index].operand_size
        out[index].target = refs[index].target
        if refs[index].kind == ABS64:
            # value - image_base as Python's ints give it, in C while the difference fits in 64 signed bits
            value = <uint64_t>refs[index].target
            if base_fits and value >= base and value - base < (<uint64_t>1 << 63):
                out[index].target = <int64_t>(value - base)
                continue
            if base_fits and value < base and base - value <= (<uint64_t>1 << 63):
                out[index].target = <int64_t>(value - base)  # negative: the wrapped difference, two's complement
                continue
            target = value - image_base
            if -(1 << 63) <= target < (1 << 63):
                out[index].target = target
            else:
                out[index].target = 0
                if wide is None:
                    wide = {}
                wide[index] = target
    return RefList._of(packed, wide)
