"""Traces of a changed in-memory data layout in matched code.

A binary diff cannot see a structure definition, but it sees its shadow: when
a field is inserted, matched instructions that reach the fields behind it
through the same base register move their displacements by the same amount,
and the size passed to the allocator that creates the object changes. The
running process holds objects of the old layout; new code would read and
write past them. Stack frames (rsp/rbp) and RIP-relative operands are not
structures the process keeps, so they are left out.

Only instructions the token alignment left unpaired can show either: the
pairs to compare come from ``_layout.pyx`` (compiled) or its pure-Python twin
``_layout_reference.py``, the one that goes with the tables' analysis core.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from ..analysis.api import kernels_for
from ..analysis.functions import Function, FunctionTable, import_thunk_target
from ..analysis.refkinds import CALL_REL32, IAT_CALL
from ..memo import cache_of
from . import _layout_reference
from ._layout_reference import NUMBER as _NUMBER
from ._layout_reference import Insn

if TYPE_CHECKING:
    from ..diff.result import DiffResult

__all__ = ["LayoutEvidence", "find_layout_changes", "layout_kernels", "ALLOCATORS"]

ALLOCATORS = frozenset({
    "malloc", "calloc", "realloc", "_aligned_malloc", "_malloc_base", "_calloc_base", "_realloc_base",
    "heapalloc", "heaprealloc", "rtlallocateheap", "localalloc", "globalalloc", "virtualalloc",
    "??2@yapeax_k@z", "??_u@yapeax_k@z", "_znwm", "_znam", "_znwy", "_znay",
})
_FRAME_REGISTERS = {"rsp", "rbp", "esp", "ebp", "rip"}
_ARGUMENT_REGISTERS = {"rcx", "ecx", "rdx", "edx", "r8", "r8d"}
# capstone's Intel syntax: "qword ptr [rcx + rax*8 + 0x10]"; the core's instruction_text is text only,
# about twenty times cheaper than building detail objects for every instruction of every changed function.
_MEMORY = re.compile(r"\[(?P<base>[a-z0-9]+)(?: \+ [a-z0-9]+\*\d)?(?: (?P<sign>[+-]) (?P<disp>0x[0-9a-f]+|\d+))?\]")
#: how many instructions before an allocator call may set its size argument
_ALLOCATOR_WINDOW = 6
#: ``_layout_reference.DifferingPairs`` or its compiled twin: a changed pair's instructions to compare
_Pairs = Callable[[FunctionTable, Function, FunctionTable, Function, object], list[tuple[Insn, Insn]]]


@dataclass(frozen=True)
class LayoutEvidence:
    function: str
    kind: str  # "displacement_shift" | "allocation_size"
    detail: str


def find_layout_changes(result: DiffResult) -> list[LayoutEvidence]:
    """Evidence across all changed functions: consistent displacement shifts, changed allocation sizes."""
    shifts: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))  # delta -> disp -> functions
    evidence: list[LayoutEvidence] = []
    pairs = _differing_pairs(result)
    for entry in result.functions:
        if entry.status != "changed" or entry.baseline is None or entry.patched is None:
            continue
        if entry.baseline.fingerprint == entry.patched.fingerprint:
            continue  # same instructions but for references: nothing moved inside them
        name = entry.patched.label
        moved, sizes = _compare(result, entry.baseline, entry.patched, pairs)
        for delta, displacement in moved:
            shifts[delta][displacement].add(name)
        evidence.extend(LayoutEvidence(name, "allocation_size", f"{name}: allocation size changed from "
                                       f"{old} to {new} bytes") for old, new in sizes)
    # Two fields moving together is a layout change; one is, when an allocation size changed too.
    needed = 1 if evidence else 2
    for delta, places in sorted(shifts.items()):
        if len(places) >= needed:
            names = sorted({n for functions in places.values() for n in functions})
            offsets = ", ".join(f"{d:#x}" for d in sorted(places))
            evidence.append(LayoutEvidence(", ".join(names), "displacement_shift",
                                           f"field offsets {offsets} moved by {delta:+d} in {', '.join(names)}"))
    return evidence


def _displacement(operands: str) -> tuple[str, int] | None:
    match = _MEMORY.search(operands)
    if match is None or match.group("base") in _FRAME_REGISTERS:
        return None
    text = match.group("disp")
    value = int(text, 0) if text else 0
    return match.group("base"), -value if match.group("sign") == "-" else value


def _compare(result: DiffResult, fa: Function, fb: Function,
             pairs: _Pairs) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(delta, old displacement) of moved structure fields, and (old, new) allocation sizes."""
    moved: list[tuple[int, int]] = []
    sizes: list[tuple[int, int]] = []
    allocator_calls: tuple[set[int], set[int]] | None = None
    for ia, ib in pairs(result.baseline, fa, result.patched, fb, result.streams.aligned_packed(fa, fb)):
        # lea computes with its "displacement" (x * 3 + 2); only real memory accesses reach fields
        old, new = (None, None) if ia[1] == "lea" else (_displacement(ia[2]), _displacement(ib[2]))
        if old is not None and new is not None and old[0] == new[0] and old[1] != new[1]:
            moved.append((new[1] - old[1], old[1]))
        if ia[1] != "mov" or ib[1] != "mov":
            continue
        if allocator_calls is None:
            allocator_calls = _allocator_calls(result.baseline, fa), _allocator_calls(result.patched, fb)
        size_a, size_b = _allocator_size(ia, allocator_calls[0]), _allocator_size(ib, allocator_calls[1])
        if size_a is not None and size_b is not None and size_a != size_b:
            sizes.append((size_a, size_b))
    return moved, sizes


def _differing_pairs(result: DiffResult) -> _Pairs:
    """The instruction pairs' finder for ``result``'s changed functions."""
    return layout_kernels(result.baseline).DifferingPairs(result.streams.kernels.aligned_indices)  # type: ignore


def layout_kernels(table: FunctionTable) -> ModuleType:
    """``_layout`` or its twin ``_layout_reference``, the one that goes with the table's analysis implementation:
    compiled with compiled (the twins agree)."""
    return kernels_for(table.backend, "hotpatch.verdict._layout", _layout_reference.__name__, "layout kernels")


def _allocator_calls(table: FunctionTable, function: Function) -> set[int]:
    """RVAs of the calls in ``function`` that reach an allocator (directly or through an import thunk)."""
    # (kind, target) -> whether it reaches an allocator, for the table: the same few are called everywhere
    known = cache_of(table, "layout_allocator_calls")
    out = set()
    for kind, insn_rva, _, _, target in table.analysis_of(function).raw_refs:
        if kind != IAT_CALL and kind != CALL_REL32:
            continue
        allocates = known.get((kind, target))
        if allocates is None:
            allocates = known[kind, target] = _reaches_allocator(table, kind, target)
        if allocates:
            out.add(insn_rva)
    return out


def _reaches_allocator(table: FunctionTable, kind: int, target: int) -> bool:
    """Whether a call of ``kind`` (IAT_CALL or CALL_REL32) to ``target`` reaches an allocator."""
    name = None
    if kind == IAT_CALL:
        imported = table.image.import_at(target)
        name = imported.name if imported else None
    elif table.at(target) is not None:
        label = import_thunk_target(table, table.at(target))  # type: ignore[arg-type]
        name = label.split("!", 1)[1] if label else None
    return bool(name) and name.lower() in ALLOCATORS  # type: ignore[union-attr]


def _allocator_size(insn: Insn, allocator_calls: set[int]) -> int | None:
    """The immediate of ``mov <first or second argument register>, imm`` shortly before an allocator call."""
    rva, mnemonic, operands = insn
    if mnemonic != "mov" or not any(0 < call - rva <= _ALLOCATOR_WINDOW * 15 for call in allocator_calls):
        return None
    dest, _, source = operands.partition(", ")
    if dest not in _ARGUMENT_REGISTERS or not _NUMBER.fullmatch(source):
        return None
    return int(source, 0)
