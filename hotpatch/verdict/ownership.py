"""Changes of who owns heap memory kept in objects' fields, seen in the code of changed functions.

A fix can keep every layout and datum and still change the meaning of objects
a running process holds: CVE-2026-33416 makes ``png_struct.trans_alpha`` a
private copy instead of an alias of ``png_info``'s buffer, and frees it in new
places. An object set up by the old code and freed by the new one is freed
twice. A hotpatch cannot convert the objects already alive, so such a change
needs a new baseline.

The evidence read here, per changed function and for both its versions: which
fields (the displacement of ``[reg+disp]``) hold a pointer that is passed to a
deallocator, and, for each allocation, which fields its result is stored into.
A field freed by one version and not the other, or an allocation stored into a
set of fields no allocation of the other version fills (two fields that shared
one buffer now get one each), is an ``OwnershipChange``.

Allocators and deallocators are the C runtime's and Win32's by import name, and
the image's own small wrappers around them (``png_malloc``, ``png_free``): a
function of at most ``_WRAPPER_BYTES`` bytes that calls or jumps to one. The
scan is linear and per register (a value loaded from a field, or an
allocation's result, followed through register moves until the register is
written or a call clobbers it), which is enough for the pattern the compiler
emits for ``free(obj->field)`` and ``obj->field = malloc(n)``. The scan itself
is ``_ownership.pyx`` (compiled, over capstone's C API) or its pure-Python twin
``_ownership_reference.py``, the one that goes with the table's analysis core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from heapq import heappop, heappush
from types import ModuleType

from ..analysis.api import kernels_for, x86_numbers
from ..analysis.functions import Function, FunctionTable
from ..analysis.refkinds import BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP
from ..memo import cache_of
from . import _ownership_reference

__all__ = ["OwnershipChange", "ownership_changes", "ownership_evidence"]

x86 = x86_numbers()  # capstone's register numbers, without importing its binding

_Tag = tuple[str, int]  # ("field", displacement) | ("alloc", call RVA) | ("arg", register)
#: the scan of one function (``_ownership_reference.scan`` or its compiled twin ``_ownership.scan``)
_Scan = Callable[..., list[tuple[_Tag, int]]]

_ALLOCATORS = frozenset({
    "malloc", "calloc", "realloc", "_strdup", "strdup", "_wcsdup", "_aligned_malloc", "_aligned_realloc",
    "HeapAlloc", "HeapReAlloc", "LocalAlloc", "LocalReAlloc", "GlobalAlloc", "GlobalReAlloc", "CoTaskMemAlloc",
    "CoTaskMemRealloc", "??2@YAPEAX_K@Z", "??_U@YAPEAX_K@Z",
})
#: deallocators and the register holding the pointer they free
_DEALLOCATORS = {
    **dict.fromkeys(("free", "_aligned_free", "LocalFree", "GlobalFree", "CoTaskMemFree", "??3@YAXPEAX@Z",
                     "??_V@YAXPEAX@Z", "??3@YAXPEAX_K@Z", "??_V@YAXPEAX_K@Z"), x86.X86_REG_RCX),
    "HeapFree": x86.X86_REG_R8,
}
_CALLS = frozenset({CALL_REL32, BRANCH_REL32, IAT_CALL, IAT_JUMP})
_THROUGH_IAT = frozenset({IAT_CALL, IAT_JUMP})
#: a function this small that calls an allocator (deallocator) is taken for a wrapper around it
_WRAPPER_BYTES = 160
_WRAPPER_ROUNDS = 3
_ARGUMENTS = (x86.X86_REG_RCX, x86.X86_REG_RDX, x86.X86_REG_R8, x86.X86_REG_R9)


@dataclass(frozen=True)
class OwnershipEvidence:
    """What one function does with heap memory kept in fields."""

    #: field displacement -> RVA of a call that frees the pointer loaded from it
    frees: dict[int, int]
    #: the set of fields one allocation's result is stored into -> RVA of that allocation's call
    allocations: dict[frozenset[int], int]


@dataclass(frozen=True)
class OwnershipChange:
    """A changed function frees, or allocates into, fields its other version does not."""

    function: str
    field: int
    call_rva: int
    detail: str


def ownership_changes(baseline: FunctionTable, old: Function, patched: FunctionTable,
                      new: Function) -> list[OwnershipChange]:
    """Differences in the heap ownership of fields between the two versions of one function."""
    before, after = ownership_evidence(baseline, old), ownership_evidence(patched, new)
    label = old.label
    out = []
    for field_, site in sorted(after.frees.items()):
        if field_ not in before.frees:
            out.append(OwnershipChange(label, field_, site, f"{label} now frees the pointer in field +{field_:#x} "
                                                            f"(call at patched {site:#x})"))
    for field_, site in sorted(before.frees.items()):
        if field_ not in after.frees:
            out.append(OwnershipChange(label, field_, site, f"{label} no longer frees the pointer in field "
                                                            f"+{field_:#x} (call at baseline {site:#x})"))
    for fields, site in sorted(after.allocations.items(), key=lambda kv: kv[1]):
        if fields not in before.allocations:
            names = ", ".join(f"+{f:#x}" for f in sorted(fields))
            was = "; ".join("{" + ", ".join(f"+{f:#x}" for f in sorted(s)) + "}" for s in before.allocations) \
                or "none"
            out.append(OwnershipChange(label, min(fields), site,
                                       f"{label} stores one allocation (call at patched {site:#x}) into field(s) "
                                       f"{names}; before, allocations went into {was}"))
    return out


def ownership_evidence(table: FunctionTable, function: Function) -> OwnershipEvidence:
    return _evidence(table, function, _heap(table))


@dataclass(frozen=True)
class _Heap:
    """What the scan of every function of one table takes, looked up once for the table."""

    kernels: ModuleType  # ``_kernels(table)``
    allocators: frozenset[int]
    deallocators: dict[int, int]
    #: ``_heap_targets`` of the two: what a reference designates to reach one of them
    reach: frozenset[int]


def _heap(table: FunctionTable) -> _Heap:
    memo = cache_of(table, "heap_functions")
    heap = memo.get("heap")
    if heap is None:
        allocators, deallocators = _heap_functions(table)
        heap = memo["heap"] = _Heap(_kernels(table), allocators, deallocators,
                                    _heap_targets(allocators, deallocators))
    return heap  # type: ignore[no-any-return]


def _evidence(table: FunctionTable, function: Function, heap: _Heap) -> OwnershipEvidence:
    # The scan reports calls to heap functions only: without a reference of the function's code designating one
    # (a function RVA, or an IAT slot, negated) there is nothing to find.
    if not heap.kernels.reaches(table.analysis_of(function).raw_refs, heap.reach):
        return OwnershipEvidence({}, {})
    frees: dict[int, int] = {}
    allocations: dict[int, set[int]] = {}
    for tag, site in heap.kernels.scan(table, function, heap.allocators, heap.deallocators, {}, allocations):
        if tag[0] == "field":
            frees.setdefault(tag[1], site)
    return OwnershipEvidence(frees, {frozenset(fields): site for site, fields in allocations.items() if fields})


def _heap_targets(allocators: frozenset[int], deallocators: dict[int, int]) -> frozenset[int]:
    """The reference targets that designate a heap function: each one as it is, and negated (a reference to an
    IAT slot names the slot's RVA, which the heap functions hold negated)."""
    keys = allocators | deallocators.keys()
    return frozenset(keys | {-target for target in keys})


def _scan_kernel(table: FunctionTable) -> _Scan:
    return _kernels(table).scan


def _kernels(table: FunctionTable) -> ModuleType:
    """The scan and call-target reader that go with the table's analysis implementation: compiled with
    compiled (the twins agree)."""
    return kernels_for(table.backend, "hotpatch.verdict._ownership", _ownership_reference.__name__, "ownership scan")


def _heap_functions(table: FunctionTable) -> tuple[frozenset[int], dict[int, int]]:
    """Allocators, and deallocators with the register their pointer is passed in: function RVAs, and IAT
    slots negated (``-rva``)."""
    memo = cache_of(table, "heap_functions")
    if "found" not in memo:
        memo["found"] = _find_heap_functions(table, _scan_kernel(table))
    return memo["found"]


def _find_heap_functions(table: FunctionTable, scan: _Scan) -> tuple[frozenset[int], dict[int, int]]:
    """``_heap_functions`` found afresh with ``scan`` (the tests run both twins)."""
    image = table.image
    allocators = {-i.iat_rva for i in image.imports if i.name in _ALLOCATORS}
    deallocators = {-i.iat_rva: _DEALLOCATORS[i.name] for i in image.imports if i.name in _DEALLOCATORS}
    # the small functions with what they call or jump to, read once for all rounds, and who calls each target.
    # Each round visits, in table order, only the small functions that call one of the heap functions known
    # when their turn comes (the others do nothing): those calling one known at the round's start, and the
    # later callers of each found during the round. The rounds find what visiting every small function would.
    small, callers = _kernels(table).small_callers(table.functions, table.analyses, _WRAPPER_BYTES, _CALLS,
                                                   _THROUGH_IAT)
    # the allocators as the scan takes them, made again only after they grew (a copy per scan of ~1,600 members,
    # compared and sorted again by the scanner, cost more than the scans)
    frozen = frozenset(allocators)
    # what a wrapper's arguments hold on entry: the same for every scan (the scans do not change it)
    entry = {r: frozenset({("arg", r)}) for r in _ARGUMENTS}
    for _ in range(_WRAPPER_ROUNDS):
        grown = False
        queue = sorted({i for known in (*allocators, *deallocators) for i in callers.get(known, ())})
        last = -1
        while queue:
            index = heappop(queue)
            if index == last:
                continue  # queued twice: visited once a round
            last = index
            function, targets = small[index]
            if function.rva in allocators or function.rva in deallocators:
                continue
            if targets & allocators:
                allocators.add(function.rva)
            elif targets & deallocators.keys():
                # which of its own arguments the wrapper hands on as the pointer to free
                if len(frozen) != len(allocators):  # they only grow
                    frozen = frozenset(allocators)
                passed = {tag[1] for tag, _ in scan(table, function, frozen, deallocators, entry, {})
                          if tag[0] == "arg"}
                if len(passed) != 1:
                    continue
                deallocators[function.rva] = passed.pop()
            else:
                continue
            grown = True
            for later in callers.get(function.rva, ()):
                if later > index:
                    heappush(queue, later)
        if not grown:
            break
    return frozenset(allocators), deallocators

