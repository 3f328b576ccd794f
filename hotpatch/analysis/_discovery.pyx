# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled kernels of discovery's rounds: fill and padding runs between functions, the places in gaps
where code could begin, which of them a 32-bit word in data names, where a function's reachable code
ends, the call and lea targets of freshly decoded functions, whether capstone's plain sweep decodes where
the core's did (over its C API, without making text), and the final ``Function`` objects.

Line for line the same contract as ``hotpatch.analysis._discovery_reference`` (the regular expressions
of ``padding.py`` read byte by byte); the tests check that both give identical results.
"""

from array import array

from libc.stdint cimport int32_t, uint8_t, uint32_t, int64_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memchr
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE

from hotpatch.analysis.includes.capstone cimport *
from hotpatch.analysis._capstone_api cimport load_entry_points, open_x86
from hotpatch.analysis._reflist cimport PackedRef, RefList
from hotpatch.analysis._refkinds cimport BRANCH_REL8, BRANCH_REL32, CALL_REL32, RIP_RELATIVE
from hotpatch.analysis._shared cimport _lower_bound, _terminates

from hotpatch.analysis.padding import after_padding as _after_padding_py

IMPLEMENTATION = "cython"

#: how far back from an entry the padding that ends there is looked for (``padding.py``'s regex window)
cdef Py_ssize_t RUN_WINDOW = 4096


cdef inline Py_ssize_t _nop(const uint8_t *m, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """Length of the int3/nop token at ``pos`` (``padding._NOP``, wholly before ``end``), 0 if none.

    The regex's alternatives are told apart by the byte after the 66 prefixes, so the first one that
    matches is the only one, and the greedy repetition never has to give a token back."""
    cdef Py_ssize_t q = pos
    cdef uint8_t modrm
    if pos >= end:
        return 0
    if m[pos] == 0xCC or m[pos] == 0x90:
        return 1
    while q < end and m[q] == 0x66:
        q += 1
    if q >= end:
        return 0
    if m[q] == 0x90:
        return q + 1 - pos if q > pos else 0
    if m[q] == 0x2E:
        q += 1
    if q + 1 >= end or m[q] != 0x0F or m[q + 1] != 0x1F:
        return 0
    q += 2
    if q >= end:
        return 0
    modrm = m[q]
    if modrm == 0x00:
        return q + 1 - pos
    if modrm == 0x40:
        return q + 2 - pos if q + 2 <= end else 0
    if modrm == 0x44:
        return q + 3 - pos if q + 3 <= end and m[q + 1] == 0 and m[q + 2] == 0 else 0
    if modrm == 0x80:
        return q + 5 - pos if q + 5 <= end else 0
    if modrm == 0x84:
        return q + 6 - pos if q + 6 <= end and m[q + 1] == 0 else 0
    return 0


cdef inline Py_ssize_t _run(const uint8_t *m, Py_ssize_t pos, Py_ssize_t end, bint zeros) noexcept nogil:
    """Length of the run of tokens at ``pos`` (``USABLE_PADDING_RE``, or ``FILL_RE`` with ``zeros``)."""
    cdef Py_ssize_t at = pos, n
    while at < end:
        n = _nop(m, at, end)
        if n == 0:
            if zeros and m[at] == 0:
                n = 1
            else:
                break
        at += n
    return at - pos


cdef inline Py_ssize_t _clip(Py_ssize_t value, Py_ssize_t length) noexcept nogil:
    return value if value < length else length


cdef int _places(const uint8_t *m, Py_ssize_t length, Py_ssize_t end, Py_ssize_t limit, list out) except -1:
    """Append the places of the gap ``[end, limit)`` to ``out`` in order (``gap_places``)."""
    cdef Py_ssize_t stop = _clip(limit, length), pos = end, n
    if _run(m, end, _clip(end + 15, length), True) == 0:
        out.append(end)
    while pos < stop:
        n = _run(m, pos, stop, False)
        if n:
            pos += n
            if pos < limit and _run(m, pos, _clip(pos + 15, length), True) == 0:
                out.append(pos)
        else:
            pos += 1
    return 0


def gap_places(const uint8_t[:] memory, Py_ssize_t end, Py_ssize_t limit):
    """Places in the gap ``[end, limit)`` where code could begin, in order: the gap's start and the end
    of each usable padding run before ``limit``, leaving out those where fill begins."""
    cdef Py_ssize_t length = memory.shape[0]
    out = []
    _places(&memory[0] if length else NULL, length, end, limit, out)
    return out


cdef inline Py_ssize_t _upper_bound(const uint32_t[:] values, int64_t key) noexcept nogil:
    """The number of ``values`` (sorted) at or below ``key``: ``bisect_right``."""
    cdef Py_ssize_t lo = 0, hi = values.shape[0], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if <int64_t>values[mid] <= key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline int64_t _before_next(list starts, Py_ssize_t index, int64_t limit) except? -1:
    """``limit``, or the start at ``index`` of the sorted ``starts`` (the one after a function's) when that comes
    first: where the function can end at the latest."""
    cdef int64_t following
    if index < len(starts):
        following = starts[index]
        if following < limit:
            return following
    return limit


cdef Py_ssize_t _list_upper_bound(list values, int64_t key, Py_ssize_t lo=0) except -1:
    """``bisect_right`` of a sorted list of ints, known to be at least ``lo``: galloping from there first, as
    a round's sorted starts are looked up one after another (the probes are Python ints: few is cheap)."""
    cdef Py_ssize_t count = len(values), hi = lo, step = 1, mid
    while hi < count and <int64_t>values[hi] <= key:
        lo = hi + 1
        hi = lo + step
        step <<= 1
    if hi > count:
        hi = count
    while lo < hi:
        mid = (lo + hi) >> 1
        if <int64_t>values[mid] <= key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def stale_gap_places(const uint8_t[:] memory, stale, list starts, dict items, const uint32_t[:] section_rvas,
                     const uint32_t[:] section_ends):
    """The layout's gaps looked at again: for each start of ``stale`` in a code section (``section_rvas``,
    ``section_ends``: sorted, disjoint), ``gap_places`` of the gap from the end of its item's first range
    (``items[start]``) to the next of the sorted ``starts`` or its section's end; the starts with places
    and their places."""
    cdef Py_ssize_t length = memory.shape[0], index, known = 0
    cdef const uint8_t *m = &memory[0] if length else NULL
    cdef int64_t rva, limit, end, previous = -1
    cdef list owners = [], out = [], fresh
    for value in stale:
        rva = value
        if rva < previous:
            known = 0  # not ascending: search from the first start
        previous = rva
        index = _upper_bound(section_rvas, rva) - 1
        if index < 0 or rva >= section_ends[index]:
            continue  # a .pdata entry outside the executable sections bounds no gap
        known = _list_upper_bound(starts, rva, known)
        limit = _before_next(starts, known, section_ends[index])
        end = items[value][1][0][1]
        if end < limit:
            fresh = []
            _places(m, length, end, limit, fresh)
            if fresh:
                owners.append(value)
                out.append(fresh)
    return owners, out


def refresh_raw_items(added, list starts, dict pdata, const uint32_t[:] section_rvas,
                      const uint32_t[:] section_ends, const uint32_t[:] section_limits, dict raw_items, dict items):
    """``Layout.insert``'s bookkeeping once the new starts ``added`` (sorted) are in the sorted ``starts``:
    the touched starts (each new one and the start before each, sorted) get their raw item, their .pdata
    ranges if ``pdata`` lists them, else up to the next start or their section's limit (``section_rvas``,
    ``section_ends``: sorted, disjoint; ``section_limits``: where a function may end in each). Those whose
    raw item is new or changed are set in ``raw_items`` and ``items``; returns the touched starts and the
    changed ones, each with its item before (None if new)."""
    cdef Py_ssize_t index = 0, known = 0
    cdef int64_t rva, limit, previous = -1
    cdef list touched = [], changed = []
    for value in added:
        rva = value
        if rva < previous:
            index = 0  # not ascending: search from the first start
        previous = rva
        index = _list_upper_bound(starts, rva - 1, index)  # ascending: on from the previous search
        if index:
            before = starts[index - 1]
            if not touched or touched[len(touched) - 1] != before:
                touched.append(before)  # the start before a new one is at or after the previous new one
        touched.append(value)
    for value in touched:
        rva = value
        runtime = pdata.get(value)
        if runtime is not None:
            raw = (value, ((value, runtime.end_rva),) + runtime.fragments)
        else:
            index = _upper_bound(section_rvas, rva) - 1
            if index < 0 or rva >= section_ends[index]:
                raise ValueError(f"start {rva:#x} outside the code sections")
            known = _list_upper_bound(starts, rva, known)
            limit = _before_next(starts, known, section_limits[index])
            raw = (value, ((value, limit),))
        old = raw_items.get(value)
        if old is None or old != raw:
            changed.append((value, items.get(value)))
            raw_items[value] = items[value] = raw
    return touched, changed


def refresh_gap_places(memory, stale, list starts, dict items, section_rvas, section_ends, dict gaps, set places):
    """``Layout.places``' bookkeeping: the gaps after the sorted ``stale`` starts lose their places (``gaps``:
    start -> its gap's places; ``places``: all of them), then get those of ``stale_gap_places``; returns the
    places added, in order."""
    cdef list added = [], fresh
    for rva in stale:
        old = gaps.pop(rva, None)
        if old:  # every stale gap's old places go before new ones come: a place can move to another gap
            places.difference_update(old)
    owners, found = stale_gap_places(memory, stale, starts, items, section_rvas, section_ends)
    for rva, fresh in zip(owners, found):
        gaps[rva] = fresh
        added.extend(fresh)
    places.update(added)
    return added


def settle_round(list changed, list todo, list reached, dict items, set stale, dict decoded):
    """A round's items once bounded: the start of each raw item of ``todo`` gets its ``reached`` item in
    ``items`` and goes ``stale``, and the whole decode of an item cut (in ``decoded``) goes, as do the decodes
    of the ``changed`` starts' items before ``(start, item before)`` that changed. Returns the changed starts'
    current items and those of them ``decoded`` lacks."""
    cdef Py_ssize_t i, count = len(todo)
    cdef list current = [], missing = []
    if len(reached) != count:
        raise ValueError("todo and reached differ in length")
    for i in range(count):
        item, cut = todo[i], reached[i]
        rva = item[0]
        items[rva] = cut
        stale.add(rva)
        if cut != item:
            decoded.pop(item, None)
    for rva, before in changed:
        item = items[rva]
        current.append(item)
        if before is not None and before != item:
            decoded.pop(before, None)
    for item in current:
        if item not in decoded:
            missing.append(item)
    return current, missing


def fresh_refs(list current, dict decoded, set scanned):
    """The references (``raw_refs`` of their decodes in ``decoded``) of the items of ``current`` not yet in
    ``scanned``, which gets them all."""
    cdef list out = []
    for item in current:
        if item not in scanned:
            out.append(decoded[item].raw_refs)
    scanned.update(current)
    return out


def gap_starts(const uint8_t[:] memory, const uint32_t[:] starts, const uint32_t[:] ends,
               const uint32_t[:] section_rvas, const uint32_t[:] section_ends):
    """The places of every gap between the functions ``(starts[i], ends[i])`` (sorted by start) of each
    executable section, and after the last one: ``gap_places`` of each."""
    cdef Py_ssize_t length = memory.shape[0], count = starts.shape[0], s, index, first, last
    cdef Py_ssize_t low, high, end, limit
    cdef const uint8_t *m = &memory[0] if length else NULL
    out = []
    for s in range(section_rvas.shape[0]):
        low, high = section_rvas[s], section_ends[s]
        first = _lower_bound(&starts[0], count, low) if count else 0
        last = _lower_bound(&starts[0], count, high) if count else 0
        for index in range(first, last):
            end = ends[index]
            limit = starts[index + 1] if index + 1 < last and starts[index + 1] < high else high
            if end < limit:
                _places(m, length, end, limit, out)
    return set(out)


def padding_runs(const uint8_t[:] memory, const uint32_t[:] rvas, const uint32_t[:] ends,
                 const uint32_t[:] section_rvas, const uint32_t[:] section_ends):
    """For each span ``(rvas[i], ends[i])`` (sorted, each in one of the executable sections given sorted
    by RVA): the usable padding run ending at its entry and the one starting at its end, each within
    the gap to its neighbour in the same section."""
    cdef Py_ssize_t count = rvas.shape[0], length = memory.shape[0], i, s, n_sections = section_rvas.shape[0]
    cdef Py_ssize_t rva, end, sec_lo, sec_hi, gap_start, gap_end
    cdef const uint8_t *m = &memory[0] if length else NULL
    before = array("I", bytes(4 * count))
    after = array("I", bytes(4 * count))
    cdef uint32_t[:] before_view = before
    cdef uint32_t[:] after_view = after
    s = 0
    for i in range(count):
        rva, end = rvas[i], ends[i]
        while s + 1 < n_sections and section_rvas[s + 1] <= rva:
            s += 1
        if n_sections == 0 or not section_rvas[s] <= rva < section_ends[s]:
            raise ValueError(f"span at {rva:#x} outside every executable section")
        sec_lo, sec_hi = section_rvas[s], section_ends[s]
        gap_start = ends[i - 1] if i > 0 and ends[i - 1] >= sec_lo else sec_lo
        gap_end = rvas[i + 1] if i + 1 < count else sec_hi
        if gap_end > sec_hi:
            gap_end = sec_hi
        before_view[i] = _run_ending_at(m, length, gap_start, rva)
        after_view[i] = _run(m, end, _clip(gap_end, length), False) if end < gap_end else 0
    return before, after


cdef Py_ssize_t _run_ending_at(const uint8_t *m, Py_ssize_t length, Py_ssize_t gap_start,
                               Py_ssize_t entry) noexcept nogil:
    """Length of the usable padding run that ends right at ``entry`` (searched as ``finditer`` does:
    leftmost runs from the window's start, one after the other), 0 if none."""
    cdef Py_ssize_t q, pos, n, best = 0, stop = _clip(entry, length)
    cdef bint tail = False
    if gap_start >= entry:
        return 0
    if m[entry - 1] == 0xCC or m[entry - 1] == 0x90:
        tail = True
    else:
        # a multi-byte nop ends padding only with its 0F 1F in the last eight bytes
        q = gap_start if gap_start > entry - 8 else entry - 8
        while q + 1 < stop:
            if m[q] == 0x0F and m[q + 1] == 0x1F:
                tail = True
                break
            q += 1
    if not tail:
        return 0
    pos = gap_start if gap_start > entry - RUN_WINDOW else entry - RUN_WINDOW
    while pos < stop:
        n = _run(m, pos, stop, False)
        if n:
            if pos + n == entry:
                best = n
            pos += n
        else:
            pos += 1
    return best


cdef bint _after_padding(const uint8_t *m, Py_ssize_t rva) noexcept nogil:
    """``padding.after_padding`` for ``0 < rva <= len(memory)``: int3 or nop right before ``rva``, or a usable
    padding run (found as ``finditer`` finds them, from nine bytes back) that ends there."""
    cdef Py_ssize_t pos = rva - 9 if rva > 9 else 0, n
    if m[rva - 1] == 0xCC or m[rva - 1] == 0x90:
        return True
    while pos < rva:
        n = _run(m, pos, rva, False)
        if n:
            if pos + n == rva:
                return True
            pos += n
        else:
            pos += 1
    return False


def acceptable_in(rvas, const uint32_t[:] code_rvas, const uint32_t[:] code_ends,
                  const uint32_t[:] owned_begins, const uint32_t[:] owned_ends, const uint8_t[:] owned_primary):
    """The addresses (in the given order) that could start a function: inside a code section (``code_rvas``,
    ``code_ends``: sorted, disjoint) and not inside a .pdata function. ``owned_begins``/``owned_ends`` are
    every .pdata range (primary ranges and fragments) sorted; ``owned_primary[i]`` says whether
    ``owned_begins[i]`` starts a .pdata function (a fragment's first byte is no start). Only the last range
    beginning at or before an address is asked, as discovery always did."""
    cdef Py_ssize_t index
    cdef int64_t rva
    cdef list out = []
    for value in rvas:
        rva = value
        index = _upper_bound(code_rvas, rva) - 1
        if index < 0 or rva >= code_ends[index]:
            continue
        index = _upper_bound(owned_begins, rva) - 1
        if index >= 0 and (owned_begins[index] < rva < owned_ends[index] or
                           owned_begins[index] == rva and not owned_primary[index]):
            continue
        out.append(value)
    return out


cdef int _compare_keys(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0], y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


def owned_spans(runtime_functions, dict pdata):
    """Every .pdata range (each function's primary range and its fragments) sorted, as the arrays of their
    begins and ends, and whether each begin starts a .pdata function (is in ``pdata``): ``acceptable_in``'s
    bounds."""
    keys = array("Q")
    for runtime in runtime_functions:  # a range as one 64-bit key: (begin, end) order is the keys' order
        keys.append(<uint64_t>runtime.begin_rva << 32 | <uint32_t>runtime.end_rva)
        for begin, end in runtime.fragments:
            keys.append(<uint64_t>begin << 32 | <uint32_t>end)
    cdef uint64_t[:] view = keys
    cdef Py_ssize_t i, count = view.shape[0]
    if count:
        qsort(&view[0], count, sizeof(uint64_t), _compare_keys)
    begins = array("I", bytes(4 * count))
    ends = array("I", bytes(4 * count))
    primary = bytearray(count)
    cdef uint32_t[:] begins_view = begins
    cdef uint32_t[:] ends_view = ends
    for i in range(count):
        begins_view[i] = <uint32_t>(view[i] >> 32)
        ends_view[i] = <uint32_t>view[i]
        primary[i] = begins_view[i] in pdata
    return begins, ends, bytes(primary)


def add_sources(rvas, uint64_t bit, dict sources, list pending):
    """Each of ``rvas`` starts a function found by the source ``bit``: its mask in ``sources`` (start -> the
    bits of its sources) gets it; a start not there yet is new and goes to ``pending``. True if any was."""
    cdef bint found = False
    for rva in rvas:
        mask = sources.get(rva)
        if mask is None:
            sources[rva] = bit
            pending.append(rva)
            found = True
        else:
            sources[rva] = mask | bit
    return found


def after_padding_in(memory, places):
    """The places (in the given order) right after int3 or nop padding (``padding.after_padding``)."""
    cdef const uint8_t[:] view = memory
    cdef Py_ssize_t length = view.shape[0], place
    cdef const uint8_t *m = &view[0] if length else NULL
    cdef list out = []
    for value in places:
        place = value
        if 0 < place <= length:
            if _after_padding(m, place):
                out.append(value)
        elif _after_padding_py(memory, place):  # what indexing at or past either end does in Python
            out.append(value)
    return out


def rip_jumps(const uint8_t[:] memory, const uint32_t[:] begins, const uint32_t[:] ends):
    """Every ``jmp [rip+disp32]`` (FF 25 and four bytes) in the spans ``[begins[i], ends[i])`` of ``memory``, in
    the given order, found as a regular expression's search finds them (left to right, no two overlapping):
    each as (its RVA, the RVA its displacement names). A memchr for the 25: tens of MB of code hold a few hundred
    jumps, and FF bytes fifty times as many as 25s."""
    cdef Py_ssize_t length = memory.shape[0], i, pos, last
    cdef const uint8_t *m = &memory[0] if length else NULL
    cdef const uint8_t *hit
    cdef int64_t displacement
    cdef list out = []
    for i in range(begins.shape[0]):
        pos = begins[i]
        last = _clip(ends[i], length) - 6  # where the last whole jump of the span would start
        while pos <= last:
            hit = <const uint8_t *>memchr(m + pos + 1, 0x25, <size_t>(last + 1 - pos))  # a jump's second byte
            if hit == NULL:
                break
            pos = hit - m - 1
            if m[pos] != 0xFF:
                pos += 1
                continue
            displacement = <int32_t>(m[pos + 2] | <uint32_t>m[pos + 3] << 8 | <uint32_t>m[pos + 4] << 16
                                     | <uint32_t>m[pos + 5] << 24)
            out.append((pos, pos + 6 + displacement))
            pos += 6
    return out


def pointer_targets(const uint8_t[:] memory, const uint32_t[:] relocations, uint64_t image_base,
                    const uint32_t[:] code_rvas, const uint32_t[:] code_ends):
    """What the relocated 64-bit pointers outside code point at inside the image, as RVAs, in relocation
    order: the little-endian value at each relocation (fewer bytes at the image's end) minus the image
    base, kept where it lies in ``[0, len(memory))``; relocations inside a code section (``code_rvas``,
    ``code_ends``: sorted, disjoint) are references of that code and left out."""
    cdef Py_ssize_t length = memory.shape[0], count = relocations.shape[0], sections = code_rvas.shape[0]
    cdef Py_ssize_t i, k, b
    cdef uint32_t reloc
    cdef uint64_t value
    cdef list out = []
    for i in range(count):
        reloc = relocations[i]
        # the last code section starting at or before the relocation (relocations are mostly sorted)
        k = _lower_bound(&code_rvas[0], sections, <int64_t>reloc + 1) if sections else 0
        if k > 0 and reloc < code_ends[k - 1]:
            continue
        value = 0
        for b in range(7, -1, -1):  # bytes past the image's end are absent, as in a short slice
            if <Py_ssize_t>reloc + b < length:
                value = value << 8 | memory[reloc + b]
        if value >= image_base and value - image_base < <uint64_t>length:
            out.append(value - image_base)
    return out


cdef bint _fill_span(const uint8_t *m, Py_ssize_t length, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    """``FILL_RE.fullmatch(memory, begin, end)`` (the tokens are unambiguous: the greedy run is the only one)."""
    cdef Py_ssize_t stop = _clip(end, length)
    return stop > begin and _run(m, begin, stop, True) == stop - begin


def trimmed_end(const uint8_t[:] memory, const uint32_t[:] rvas, Py_ssize_t begin, Py_ssize_t limit):
    """Where a function whose instructions start at ``rvas`` in ``[begin, limit)`` ends once the fill after
    its last instruction that is not fill (int3, nops, zeros) is cut off; at least one byte past ``begin``."""
    cdef Py_ssize_t length = memory.shape[0]
    return _trimmed_end(&memory[0] if length else NULL, length, rvas, begin, limit)


cdef Py_ssize_t _trimmed_end(const uint8_t *m, Py_ssize_t length, const uint32_t[:] rvas, Py_ssize_t begin,
                             Py_ssize_t limit) noexcept:
    cdef Py_ssize_t count = rvas.shape[0], index, insn_end, end = begin + 1
    for index in range(count - 1, -1, -1):
        insn_end = rvas[index + 1] if index + 1 < count else limit
        if not _fill_span(m, length, rvas[index], insn_end):
            end = insn_end
            break
    return end if end > begin + 1 else begin + 1


def trimmed_layout(const uint8_t[:] memory, list starts, dict items, dict pdata, dict decoded):
    """The final layout: the item ``items[start]`` of each of the sorted ``starts``, as it is if ``pdata`` lists
    it, else cut after its last instruction that is not fill (``trimmed_end`` of its decode ``decoded[item]``).
    Returns the items, their decodes (None where an item was cut), the indexes of the cut ones, and the items'
    starts and first ranges' ends as arrays."""
    cdef Py_ssize_t length = memory.shape[0], count = len(starts), i, begin, limit
    cdef const uint8_t *m = &memory[0] if length else NULL
    cdef list out = [], analyses = [], cut = []
    cdef tuple item
    rvas = array("I", bytes(4 * count))
    ends = array("I", bytes(4 * count))
    cdef uint32_t[:] rvas_view = rvas
    cdef uint32_t[:] ends_view = ends
    for i in range(count):
        rva = starts[i]
        item = items[rva]
        analysis = decoded[item]
        if rva not in pdata:
            begin, limit = item[1][0]
            trimmed = (rva, ((begin, _trimmed_end(m, length, analysis.insn_rvas, begin, limit)),))
            if trimmed != item:
                item, analysis = trimmed, None
                cut.append(i)
        out.append(item)
        analyses.append(analysis)
        rvas_view[i] = rva
        ends_view[i] = item[1][0][1]
    return out, analyses, cut, rvas, ends


def named(places, words):
    """The places (non-negative, below 2**32) equal to some value in the ``array("I")`` chunks ``words``."""
    cdef list ordered = sorted(places)
    if not ordered:
        return set()
    return named_in(ordered, word_index(words, ordered[len(ordered) - 1] + 1))


def word_index(words, Py_ssize_t top):
    """Which values below ``top`` some value in the ``array("I")`` chunks ``words`` equals, for ``named_in``:
    a bitmap (an eighth of a byte per address), built once where the loop looks places up every round."""
    cdef bytearray bits = bytearray((top + 7) // 8)
    cdef uint8_t *b = bits
    cdef const uint32_t[:] chunk
    cdef Py_ssize_t i
    cdef uint32_t w
    for values in words:
        if not len(values):
            continue
        chunk = values
        with nogil:
            for i in range(chunk.shape[0]):
                w = chunk[i]
                if w < top:
                    b[w >> 3] |= 1 << (w & 7)
    return bits


def memory_word_index(const uint8_t[:] memory, const uint32_t[:] begins, const uint32_t[:] ends, Py_ssize_t top):
    """``word_index`` of the 32-bit values at every alignment of the spans ``[begins[i], ends[i])`` of
    ``memory`` (``memory_words``), read in place: no copy of the data sections, four times over."""
    cdef Py_ssize_t length = memory.shape[0], i, pos, stop
    cdef bytearray bits = bytearray((top + 7) // 8)
    cdef uint8_t *b = bits
    cdef const uint8_t *m = &memory[0] if length else NULL
    cdef uint32_t w
    for i in range(begins.shape[0]):
        stop = _clip(ends[i], length) - 3
        with nogil:
            for pos in range(begins[i], stop):
                w = m[pos] | <uint32_t>m[pos + 1] << 8 | <uint32_t>m[pos + 2] << 16 | <uint32_t>m[pos + 3] << 24
                if w < top:
                    b[w >> 3] |= 1 << (w & 7)
    return bits


def named_in(places, index):
    """The places (non-negative) some word of ``word_index``'s ``index`` names: ``named`` of the places below
    its ``top``."""
    cdef const uint8_t[:] bits = index
    cdef Py_ssize_t top = bits.shape[0] * 8, place
    cdef set out = set()
    for value in places:
        place = value
        if place < top and bits[place >> 3] >> (place & 7) & 1:
            out.add(value)
    return out


def reachable_end(const uint8_t[:] memory, const uint32_t[:] rvas, refs, list tables, int64_t begin,
                  int64_t limit, int64_t horizon, bint tail_gaps=True):
    """Where the code reachable from ``begin`` ends: after the first instruction that does not fall
    through with no branch (up to ``horizon``) or jump-table target beyond it; ``limit`` if none. With
    ``tail_gaps``, a jump past fill, data and fill to code that never comes back (into them or before
    them) is a tail jump: the code ends where the fill begins (the reference twin says when exactly)."""
    return _reachable_end(memory, rvas, refs, tables, begin, limit, horizon, tail_gaps)


cdef int64_t _reachable_end(const uint8_t[:] memory, const uint32_t[:] rvas, refs, list tables, int64_t begin,
                            int64_t limit, int64_t horizon, bint tail_gaps) except? -1:
    """``reachable_end``."""
    cdef Py_ssize_t count = rvas.shape[0], memlen = memory.shape[0], index, ref_index = 0, ref_count
    cdef const uint8_t *m = &memory[0] if memlen else NULL
    cdef const PackedRef *packed = NULL
    cdef int64_t reach = begin, insn, end, target, readable, kept = begin, gap_begin = -1, gap_end = -1, nearest
    cdef Py_ssize_t fill
    cdef int kind
    cdef bint outside
    cdef list listed = None
    cdef list seen_cases = []
    if horizon < limit:
        horizon = limit  # branch targets up to here count (the item may be a first look)
    if isinstance(refs, RefList):
        packed = <const PackedRef *><const char *>(<RefList>refs).packed
        ref_count = (<RefList>refs).count
    else:
        listed = list(refs)
        ref_count = len(listed)
    reaches = {table[0]: max(table[3]) for table in tables if table[3]} if tables else None
    cases = {table[0]: table[3] for table in tables if table[3]} if tables else None
    for index in range(count):
        insn = rvas[index]
        outside = insn >= gap_end
        while ref_index < ref_count:
            if packed != NULL:
                if packed[ref_index].insn_rva > insn:
                    break
                kind, target = packed[ref_index].kind, packed[ref_index].target
            else:
                ref = listed[ref_index]
                if ref[1] > insn:
                    break
                kind, target = ref[0], ref[4]
            if kind == BRANCH_REL8 or kind == BRANCH_REL32:
                if reach < target < horizon:
                    reach = target
                if tail_gaps and target < horizon and outside:
                    if gap_end >= 0 and begin <= target < gap_end:
                        gap_begin = gap_end = -1  # code that comes back: all one function
                    elif kept < target:
                        kept = target
            ref_index += 1
        if reaches is not None:
            table_reach = reaches.get(insn)
            if table_reach is not None:
                if table_reach > reach:
                    reach = table_reach
                if tail_gaps:
                    seen_cases.append(cases[insn])
                    if outside:
                        if gap_end >= 0 and any(begin <= case < gap_end for case in cases[insn]):
                            gap_begin = gap_end = -1
                        elif table_reach > kept:
                            kept = table_reach
        end = rvas[index + 1] if index + 1 < count else limit
        # ``flow.terminates(memory, insn, end)``: prefixes within 15 bytes, the second opcode byte up to ``end``
        readable = end if end < memlen else memlen
        if not _terminates(m + insn, min(readable, insn + 15) - insn, readable - insn):
            continue
        if gap_end < 0:
            if reach < end:
                return end
            if tail_gaps:
                nearest = _nearest_target(packed, listed, ref_index, seen_cases, end, horizon, limit)
                if end < nearest < limit and nearest <= memlen:
                    fill = _run(m, end, nearest, True)
                    if 0 < fill < nearest - end and (m[nearest - 1] == 0xCC or m[nearest - 1] == 0x90
                                                     or m[nearest - 1] == 0):
                        gap_begin, gap_end, kept = end, nearest, reach
        elif kept < end:
            return gap_begin
    # code that runs into the next start without branching back into the gap or beyond that start
    return gap_begin if gap_end >= 0 and kept < limit else limit


cdef object _reached(const uint8_t[:] memory, tuple item, analysis, int64_t horizon, bint tail_gaps):
    """``functions._reachable``: the item cut where its reachable code ends, or the item itself."""
    rva, ranges = item
    begin, limit = ranges[0]
    cdef int64_t end = _reachable_end(memory, analysis.insn_rvas, analysis.raw_refs, analysis.raw_tables, begin,
                                      limit, horizon, tail_gaps)
    return (rva, ((begin, end),)) if end < limit else item


def reach_windows(const uint8_t[:] memory, list items, list windows, list analyses, list horizons,
                  int64_t margin, dict full, bint tail_gaps=True):
    """``functions._reach``'s verdicts on the decodes ``analyses`` of the first ``windows`` of ``items`` (each
    window the item's single range, perhaps cut short): an item whose window is all of it is reached on its
    decode (which goes into ``full``); a window without jump tables whose code ends, tail gaps aside, at least
    ``margin`` bytes before the window's end is reached on it, branches up to the item's end counting. The
    others need their whole decode: None in the list returned, and their indexes in the second list."""
    cdef Py_ssize_t index, count = len(items)
    cdef int64_t limit, window_end, horizon
    cdef list out = [], whole = []
    cdef tuple item, window
    if len(windows) != count or len(analyses) != count or len(horizons) != count:
        raise ValueError("items, windows, analyses and horizons differ in length")
    for index in range(count):
        item, window, analysis = items[index], windows[index], analyses[index]
        limit, window_end = item[1][0][1], window[1][0][1]
        horizon = horizons[index]
        if window_end == limit:
            full[item] = analysis
            out.append(_reached(memory, item, analysis, horizon, tail_gaps))
            continue
        if not analysis.raw_tables:
            if horizon < limit:
                horizon = limit
            # a tail gap's cut comes before the instruction that confirms it: only an end well inside the
            # window without tail gaps (they only ever cut earlier) is decided by the window
            if _reachable_end(memory, analysis.insn_rvas, analysis.raw_refs, analysis.raw_tables, window[1][0][0],
                              window_end, horizon, False) <= window_end - margin:
                out.append(_reached(memory, window, analysis, horizon, tail_gaps))
                continue
        out.append(None)
        whole.append(index)
    return out, whole


cdef int64_t _nearest_target(const PackedRef *packed, list listed, Py_ssize_t ref_count, list seen_cases,
                             int64_t end, int64_t horizon, int64_t limit) except? -1:
    """The nearest branch target at or after ``end`` (below ``horizon``) of the first ``ref_count``
    references, or jump-table target of ``seen_cases``; ``limit`` if none is nearer."""
    cdef int64_t nearest = limit, target
    cdef Py_ssize_t i
    cdef int kind
    for i in range(ref_count):
        if packed != NULL:
            kind, target = packed[i].kind, packed[i].target
        else:
            kind, target = listed[i][0], listed[i][4]
        if (kind == BRANCH_REL8 or kind == BRANCH_REL32) and end <= target < nearest and target < horizon:
            nearest = target
    for targets in seen_cases:
        for case in targets:
            if end <= case < nearest:
                nearest = case
    return nearest


def plausible_limits(candidates, const uint32_t[:] relocations, list starts, const uint32_t[:] code_rvas,
                     const uint32_t[:] code_ends):
    """The candidates worth judging, sorted, and how far each may run: up to the next of the sorted ``starts``
    after it, within its code section (``code_rvas``, ``code_ends``: sorted, disjoint; every candidate lies in
    one). A candidate in or right after a relocated 64-bit pointer (``relocations``, sorted) is left out:
    mingw keeps its constructor lists in .text, and a pointer's low byte can look like a nop."""
    cdef Py_ssize_t index, count = len(starts)
    cdef int64_t rva, limit, following
    cdef list ordered = [], limits = []
    for value in candidates:
        rva = value
        index = _upper_bound(relocations, rva) - 1
        if not (index >= 0 and <int64_t>relocations[index] + 8 >= rva):
            ordered.append(value)
    ordered.sort()
    for value in ordered:
        rva = value
        index = _upper_bound(code_rvas, rva) - 1
        if index < 0 or rva >= code_ends[index]:
            raise ValueError(f"candidate {rva:#x} outside the code sections")
        limit = code_ends[index]
        index = _list_upper_bound(starts, rva)
        if index < count:
            following = starts[index]
            if following < limit:
                limit = following
        limits.append(limit)
    return ordered, limits


cdef inline bint _in_spans(const uint32_t[:] rvas, const uint32_t[:] ends, int64_t target) noexcept nogil:
    cdef Py_ssize_t index = _upper_bound(rvas, target) - 1
    return index >= 0 and target < ends[index]


def sane_references(const uint32_t[:] rvas, refs, int64_t begin, int64_t end, const uint32_t[:] code_rvas,
                    const uint32_t[:] code_ends, const uint32_t[:] section_rvas, const uint32_t[:] section_ends):
    """Whether code decoded from ``begin`` to ``end`` (instructions at ``rvas``) starts at ``begin`` and refers
    only where compiled code does: every branch and call into a code section (``code_rvas``, ``code_ends``)
    and, inside the range, onto one of its instructions; every RIP-relative operand into a section
    (``section_rvas``, ``section_ends``). All bounds sorted and disjoint."""
    return _sane_references(rvas, refs, begin, end, code_rvas, code_ends, section_rvas, section_ends)


cdef bint _sane_references(const uint32_t[:] rvas, refs, int64_t begin, int64_t end, const uint32_t[:] code_rvas,
                           const uint32_t[:] code_ends, const uint32_t[:] section_rvas,
                           const uint32_t[:] section_ends) except -1:
    """``sane_references``."""
    cdef Py_ssize_t count = rvas.shape[0], i, k, ref_count
    cdef const PackedRef *packed = NULL
    cdef list listed = None
    cdef int kind
    cdef int64_t target
    cdef bint found
    if count == 0 or rvas[0] != begin:
        return False
    if isinstance(refs, RefList):
        packed = <const PackedRef *><const char *>(<RefList>refs).packed
        ref_count = (<RefList>refs).count
    else:
        listed = list(refs)
        ref_count = len(listed)
    for i in range(ref_count):
        if packed != NULL:
            kind, target = packed[i].kind, packed[i].target
        else:
            kind, target = listed[i][0], listed[i][4]
        if kind == BRANCH_REL8 or kind == BRANCH_REL32 or kind == CALL_REL32:
            if not _in_spans(code_rvas, code_ends, target):
                return False
            if begin <= target < end:
                found = False
                for k in range(count):  # the instructions need not be sorted: look at each
                    if rvas[k] == target:
                        found = True
                        break
                if not found:
                    return False  # a branch into the middle of one of its own instructions
        elif kind == RIP_RELATIVE:
            if not _in_spans(section_rvas, section_ends, target):
                return False
    return True


def sane_items(memory, list items, list analyses, const uint32_t[:] code_rvas,
               const uint32_t[:] code_ends, const uint32_t[:] section_rvas, const uint32_t[:] section_ends):
    """For each item with its decode: ``sane_references`` of its single range, and where it has no jump table,
    ``sweep_matches`` of that range too (a byte capstone could not decode leaves a hole in the sweep)."""
    cdef Py_ssize_t i, count = len(items)
    cdef int64_t begin, end
    cdef list out = []
    if len(analyses) != count:
        raise ValueError("items and analyses differ in length")
    for i in range(count):
        (begin, end), = items[i][1]
        analysis = analyses[i]
        rvas = analysis.insn_rvas
        out.append(_sane_references(rvas, analysis.raw_refs, begin, end, code_rvas, code_ends, section_rvas,
                                    section_ends) and
                   (bool(analysis.raw_tables) or sweep_matches(memory, begin, end, rvas)))
    return out


def call_and_lea_targets(const uint8_t[:] memory, refs_lists):
    """Targets of direct calls, and addresses taken with ``lea r, [rip+X]``, in the given reference lists."""
    cdef Py_ssize_t memlen = memory.shape[0], i, count, at
    cdef const PackedRef *packed
    cdef set calls = set(), leas = set()
    for refs in refs_lists:
        if isinstance(refs, RefList):
            packed = <const PackedRef *><const char *>(<RefList>refs).packed
            count = (<RefList>refs).count
            for i in range(count):
                if packed[i].kind == CALL_REL32:
                    calls.add(packed[i].target)
                elif packed[i].kind == RIP_RELATIVE and packed[i].operand_offset >= 2:
                    # RIP-relative addressing has no SIB byte: the opcode sits right before the ModRM byte
                    at = <Py_ssize_t>packed[i].insn_rva + packed[i].operand_offset - 2
                    if at < memlen and memory[at] == 0x8D:
                        leas.add(packed[i].target)
        else:
            for kind, insn_rva, operand_offset, _, target in refs:
                if kind == CALL_REL32:
                    calls.add(target)
                elif kind == RIP_RELATIVE and operand_offset >= 2 and memory[insn_rva + operand_offset - 2] == 0x8D:
                    leas.add(target)
    return calls, leas


# ── the Function objects ───────────────────────────────────────────────────

#: a Function's slots in field order, the order ``build_functions`` fills them in
cdef tuple FUNCTION_FIELDS = ("rva", "end_rva", "name", "sources", "fragments", "pad_before", "pad_after", "unwind",
                              "fingerprint")


cdef inline int _set_slot(PyObject *descr, object target, object value) except -1:
    return Py_TYPE(<object>descr).tp_descr_set(<object>descr, target, value)


def build_functions(cls, list items, list analyses, const uint32_t[:] before, const uint32_t[:] after, dict pdata,
                    dict names, dict sources, sources_of):
    """A ``cls`` (``functions.Function``, slotted) for each final item ``(rva, ranges)`` with its analysis and the
    padding before and after it: its name in ``names``, its sources ``sources_of(sources[rva])``, its unwind
    info from the .pdata entry ``pdata[rva]`` if any. Each is made by its type's ``tp_new`` with its slots
    filled through their member descriptors' C setters: what its ``__init__`` does, without a Python call. Its
    ``ranges`` slot (outside the fields) gets the item's ranges themselves: ``(rva, end_rva)`` and the fragments,
    what ``__post_init__`` would make anew."""
    cdef PyObject *descr[10]
    cdef Py_ssize_t i, count = len(items)
    cdef tuple empty = (), item, ranges
    cdef dict tuples = {}
    cdef list out = []
    if not isinstance(cls, type) or getattr(cls, "__slots__", None) != FUNCTION_FIELDS:
        raise TypeError(f"{cls!r} is not a class with the slots {FUNCTION_FIELDS}")
    if len(analyses) != count or before.shape[0] != count or after.shape[0] != count:
        raise ValueError("items, analyses and paddings differ in length")
    fields = [(<type>cls).__dict__[name] for name in FUNCTION_FIELDS]  # keeps the descriptors alive
    fields.append(getattr(cls, "ranges", None))
    for i in range(10):
        if type(fields[i]).__name__ != "member_descriptor":
            raise TypeError(f"{cls.__name__}.{(FUNCTION_FIELDS + ('ranges',))[i]} is not a slot")
        descr[i] = <PyObject *>fields[i]
    for i in range(count):
        item = items[i]
        rva, ranges = item
        mask = sources[rva]
        named = tuples.get(mask)
        if named is None:  # a handful of masks among tens of thousands of functions
            named = tuples[mask] = sources_of(mask)
        runtime = pdata.get(rva)
        made = (<PyTypeObject *>cls).tp_new(<type>cls, <PyObject *>empty, NULL)
        _set_slot(descr[0], made, rva)
        _set_slot(descr[1], made, ranges[0][1])
        _set_slot(descr[2], made, names.get(rva))
        _set_slot(descr[3], made, named)
        _set_slot(descr[4], made, ranges[1:])
        _set_slot(descr[5], made, before[i])
        _set_slot(descr[6], made, after[i])
        _set_slot(descr[7], made, None if runtime is None else runtime.unwind)
        _set_slot(descr[8], made, analyses[i].fingerprint)
        if ranges[0][0] != rva:  # discovery's items all begin at their start: this is only for other callers
            ranges = ((rva, ranges[0][1]),) + ranges[1:]
        _set_slot(descr[9], made, ranges)
        out.append(made)
    return out


# ── capstone's plain sweep, without its text ───────────────────────────────

cdef CapstoneAPI cs
load_entry_points(&cs, "hotpatch.analysis._discovery")
cdef csh _sweep_handle = 0
cdef cs_insn *_sweep_insn = NULL


cdef Py_ssize_t _sweep(const uint8_t[:] memory, int64_t begin, int64_t end, const uint32_t[:] rvas) except -2:
    """How many instructions capstone's plain sweep of ``[begin, end)`` decodes up to its first undecodable
    byte (the core's ``instruction_text``), if they lie at ``rvas`` so far; -1 where one does not."""
    cdef const uint8_t *code
    cdef size_t remaining
    cdef uint64_t address
    cdef Py_ssize_t count = 0, known = rvas.shape[0] if rvas is not None else -1
    open_x86(&cs, &_sweep_handle, &_sweep_insn, False)  # the handle ``instruction_text`` opens too
    if end > memory.shape[0]:
        end = memory.shape[0]
    if begin < 0 or begin >= end:
        return 0
    code = &memory[begin]
    remaining = <size_t>(end - begin)
    address = <uint64_t>begin
    while remaining and cs.disasm_iter(_sweep_handle, &code, &remaining, &address, _sweep_insn):
        if known >= 0 and (count >= known or _sweep_insn.address != rvas[count]):
            return -1
        count += 1
        if known < 0:
            break  # only whether one decodes
    return count


def sweep_matches(const uint8_t[:] memory, int64_t begin, int64_t end, const uint32_t[:] rvas):
    """Whether capstone's plain sweep of ``[begin, end)``, up to its first undecodable byte, decodes exactly
    the instructions at ``rvas`` (``instruction_text``'s addresses, without making its text)."""
    return _sweep(memory, begin, end, rvas) == rvas.shape[0]


def decodable_in(const uint8_t[:] memory, targets):
    """The targets (in the given order) where an instruction decodes within 15 bytes (``instruction_text`` of
    ``[target, target + 15)`` is not empty)."""
    cdef list out = []
    cdef int64_t target
    for value in targets:
        target = value
        if _sweep(memory, target, target + 15, None) > 0:
            out.append(value)
    return out
