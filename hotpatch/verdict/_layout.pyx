# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled pairs for the layout check: ``DifferingPairs`` over capstone's C API.

The same contract as ``hotpatch.verdict._layout_reference`` (read its docstring); the tests hold the two
equal. The runs the token alignment left unpaired are decoded as text into C buffers, their tokens (the
operand text with each number abstracted as ``NUMBER.sub("#", ...)`` does) interned in a C++ map, and only
the pairs the layout check reads become Python tuples: most runs are an instruction or two on each side, and
building every instruction's tuple and token in Python was the check's cost.

The alignment of a run's tokens is the diff kernels' patience alignment, whose common prefix and suffix
come first: those are paired here, and the kernel is asked only about what lies between them when that is
more than one instruction on either side (one against one, different tokens, pairs nothing).
"""

from cpython cimport array
from cython.operator cimport dereference as deref
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.string cimport strcmp


cdef extern from "<string.h>" nogil:
    # a GNU extension of glibc (the wheels' manylinux target has it): a tuned search for a short needle
    void *memmem(const void *haystack, size_t haystack_size, const void *needle, size_t needle_size)
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector

from hotpatch.analysis.includes.capstone cimport *
from hotpatch.analysis._capstone_api cimport load_entry_points

import array as _array

__all__ = ["DifferingPairs", "abstracted", "contains"]

cdef CapstoneAPI cs
load_entry_points(&cs, "hotpatch.verdict._layout")

cdef array.array _TOKENS = _array.array("I")  # the template of the token arrays handed to the alignment


cdef struct Text:
    int64_t rva
    uint32_t token
    size_t mnemonic  # offsets into the run's characters, each text NUL-terminated
    size_t operands


cdef struct Run:
    vector[Text] insns
    string chars


cdef inline bint _word(char c) noexcept nogil:
    """A character of ``\\w`` (capstone's text is ASCII)."""
    return (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or (b'0' <= c <= b'9') or c == b'_'


cdef inline bint _number(const char *word, size_t size) noexcept nogil:
    """Whether a whole word is ``0x[0-9a-f]+`` or ``\\d+``: ``NUMBER`` matches only whole words (``\\b`` on both
    sides, and both alternatives are word characters)."""
    cdef size_t i
    cdef bint digits = True, hexadecimal = size > 2 and word[0] == b'0' and word[1] == b'x'
    for i in range(size):
        if not (b'0' <= word[i] <= b'9'):
            digits = False
        if i >= 2 and not ((b'0' <= word[i] <= b'9') or (b'a' <= word[i] <= b'f')):
            hexadecimal = False
    return digits or hexadecimal


cdef void _abstracted(const char *text, string &out) noexcept nogil:
    """``text`` with every number replaced by ``#``, appended to ``out``."""
    cdef size_t i = 0, start
    while text[i]:
        if not _word(text[i]):
            out.push_back(text[i])
            i += 1
            continue
        start = i
        while text[i] and _word(text[i]):
            i += 1
        if _number(text + start, i - start):
            out.push_back(b'#')
        else:
            out.append(text + start, i - start)


def contains(const uint8_t[:] memory, bytes needle):
    """``needle in memory`` (the twin's ``contains``), by ``memmem``: Python's search for a short needle in a
    large image reads it at about 1 GB/s."""
    if memory.shape[0] == 0:
        return len(needle) == 0
    return memmem(&memory[0], memory.shape[0], <const char *>needle, len(needle)) != NULL


def abstracted(str operands):
    """The twin's ``abstracted`` (ASCII text, as capstone writes it), as the tokens here are made."""
    cdef string out
    _abstracted(operands.encode("ascii"), out)
    return out.decode("ascii")


cdef class DifferingPairs:
    """The pairs of one diff's changed functions (the twin's ``DifferingPairs``), the tokens' numbers shared
    between the calls."""

    cdef csh handle
    cdef cs_insn *insn
    cdef object aligned_indices
    cdef unordered_map[string, uint32_t] numbers
    cdef string key
    cdef Run run_a
    cdef Run run_b
    cdef vector[uint32_t] tokens_a
    cdef vector[uint32_t] tokens_b
    cdef vector[int64_t] pairs  # i0, j0, i1, j1, ... of the current run
    cdef vector[int64_t] suffix

    def __cinit__(self, aligned_indices):
        self.handle = 0
        self.insn = NULL
        self.aligned_indices = aligned_indices
        if cs.open(CS_ARCH_X86, CS_MODE_64, &self.handle) != CS_ERR_OK:
            raise RuntimeError("cs_open failed")
        self.insn = cs.malloc(self.handle)
        if self.insn == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.insn != NULL:
            cs.free(self.insn, 1)
        if self.handle:
            cs.close(&self.handle)

    def __call__(self, baseline, fa, patched, fb, packed):
        """Instructions of ``fa`` and ``fb`` the alignment ``packed`` (i0, j0, i1, j1, ...) left unpaired that the
        alignment of their tokens pairs, with different operand text, in order: ((rva, mnemonic, operands),
        (rva, mnemonic, operands)) each."""
        cdef const uint8_t[:] memory_a = baseline.image.memory
        cdef const uint8_t[:] memory_b = patched.image.memory
        cdef const uint32_t[:] rvas_a = baseline.analysis_of(fa).insn_rvas
        cdef const uint32_t[:] rvas_b = patched.analysis_of(fb).insn_rvas
        cdef const uint32_t[:] flat = packed
        cdef int64_t begin_a = fa.rva, end_a = fa.end_rva, begin_b = fb.rva, end_b = fb.end_rva
        cdef Py_ssize_t k, count = flat.shape[0] // 2
        cdef int64_t i, j, previous_i = -1, previous_j = -1
        cdef list out = []
        for k in range(count + 1):
            if k < count:
                i, j = flat[2 * k], flat[2 * k + 1]
            else:
                i, j = rvas_a.shape[0], rvas_b.shape[0]
            if i - previous_i > 1 and j - previous_j > 1:
                self.decode(memory_a, rvas_a, begin_a, end_a, previous_i + 1, i, &self.run_a)
                self.decode(memory_b, rvas_b, begin_b, end_b, previous_j + 1, j, &self.run_b)
                self.align()
                self.differing(out)
            previous_i, previous_j = i, j
        return out

    cdef int decode(self, const uint8_t[:] memory, const uint32_t[:] rvas, int64_t function_rva, int64_t end_rva,
                    int64_t first, int64_t stop, Run *run) except -1:
        """Instructions ``first`` to ``stop`` (exclusive) that lie in the primary range, as the twin's
        ``_decoded`` and the core's ``instruction_text`` read them, with their tokens."""
        cdef int64_t k, inside_first = -1, inside_last = -1, begin, end
        cdef const uint8_t *code
        cdef size_t remaining
        cdef uint64_t address
        cdef Text text
        cdef unordered_map[string, uint32_t].iterator found
        run.insns.clear()
        run.chars.clear()
        for k in range(first, stop):
            if function_rva <= rvas[k] < end_rva:
                if inside_first < 0:
                    inside_first = k
                inside_last = k
        if inside_first < 0:
            return 0
        begin = rvas[inside_first]
        end = rvas[inside_last + 1] if inside_last + 1 < rvas.shape[0] else end_rva
        end = min(max(end, begin + 1), end_rva)
        end = min(end, <int64_t>memory.shape[0])
        if begin >= end:
            return 0
        code = &memory[begin]
        remaining = <size_t>(end - begin)
        address = <uint64_t>begin
        while remaining and cs.disasm_iter(self.handle, &code, &remaining, &address, self.insn):
            text.rva = <int64_t>self.insn.address
            text.mnemonic = run.chars.size()
            run.chars.append(<const char *>self.insn.mnemonic)
            run.chars.push_back(0)
            text.operands = run.chars.size()
            run.chars.append(<const char *>self.insn.op_str)
            run.chars.push_back(0)
            self.key.assign(<const char *>self.insn.mnemonic)
            self.key.push_back(1)  # neither text holds it
            _abstracted(<const char *>self.insn.op_str, self.key)
            found = self.numbers.find(self.key)
            if found == self.numbers.end():
                text.token = <uint32_t>self.numbers.size()
                self.numbers[self.key] = text.token
            else:
                text.token = deref(found).second
            run.insns.push_back(text)
        return 0

    cdef int align(self) except -1:
        """``pairs`` becomes the patience alignment of the two runs' tokens."""
        cdef Py_ssize_t a0 = 0, b0 = 0, a1 = self.run_a.insns.size(), b1 = self.run_b.insns.size(), n
        cdef array.array tokens_a, tokens_b
        self.pairs.clear()
        self.suffix.clear()
        while a0 < a1 and b0 < b1 and self.run_a.insns[a0].token == self.run_b.insns[b0].token:
            self.pairs.push_back(a0)
            self.pairs.push_back(b0)
            a0 += 1
            b0 += 1
        while a0 < a1 and b0 < b1 and self.run_a.insns[a1 - 1].token == self.run_b.insns[b1 - 1].token:
            a1 -= 1
            b1 -= 1
            self.suffix.push_back(b1)
            self.suffix.push_back(a1)
        if a0 < a1 and b0 < b1 and (a1 - a0 > 1 or b1 - b0 > 1):
            tokens_a = self.tokens(&self.run_a, a0, a1)
            tokens_b = self.tokens(&self.run_b, b0, b1)
            for i, j in self.aligned_indices(tokens_a, tokens_b):
                self.pairs.push_back(a0 + i)
                self.pairs.push_back(b0 + j)
        for n in range(<Py_ssize_t>self.suffix.size() - 1, -1, -1):
            self.pairs.push_back(self.suffix[n])
        return 0

    cdef array.array tokens(self, Run *run, Py_ssize_t first, Py_ssize_t stop):
        cdef array.array out = array.clone(_TOKENS, stop - first, False)
        cdef Py_ssize_t k
        for k in range(first, stop):
            out.data.as_uints[k - first] = run.insns[k].token
        return out

    cdef int differing(self, list out) except -1:
        """The aligned pairs whose operand text differs, appended to ``out`` as the twin's tuples."""
        cdef size_t n
        cdef const Text *a
        cdef const Text *b
        cdef const char *chars_a = self.run_a.chars.c_str()
        cdef const char *chars_b = self.run_b.chars.c_str()
        for n in range(0, self.pairs.size(), 2):
            a = &self.run_a.insns[self.pairs[n]]
            b = &self.run_b.insns[self.pairs[n + 1]]
            if strcmp(chars_a + a.operands, chars_b + b.operands) != 0:
                out.append(((a.rva, (chars_a + a.mnemonic).decode('utf-8'), (chars_a + a.operands).decode('utf-8')),
                            (b.rva, (chars_b + b.mnemonic).decode('utf-8'), (chars_b + b.operands).decode('utf-8'))))
        return 0
