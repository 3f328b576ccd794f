"""The compiled ownership scan (hotpatch/verdict/_ownership.pyx) against its pure-Python twin: same evidence.

Compared: the call targets each reads, the wrappers each finds (``_find_heap_functions``), and the scan of
every function that reaches an allocator or deallocator, on every fixture image,
on random instruction sequences built from the patterns the scan follows, on the
libpng corpus steps, and on cryptography's ``_rust.pyd``. Equal means the same
freed tags with the same calls, and the same allocations with the same fields in
the same order (the evidence's dict is built in that order).
"""

from __future__ import annotations

import functools
import importlib
import random
import struct
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from capstone import x86_const as x86

from hotpatch import Image, discover
from hotpatch.analysis.functions import FunctionTable
from hotpatch.verdict import _ownership, _ownership_reference, ownership
from hotpatch.x86 import assemble
from tests.fixtures.cases import Case
from tests.support.realbins import real_binary

TWINS = (_ownership_reference.scan, _ownership.scan)


def _agree(table: Any, function: Any, allocators: frozenset[int], deallocators: dict[int, int],
           entry: dict[Any, frozenset[tuple[str, int]]] | None = None) -> tuple[set[Any], dict[int, set[int]]]:
    """Run both twins on one function; assert they found the same; return what they found."""
    found = []
    for scan in TWINS:
        allocations: dict[int, set[int]] = {}
        frees = scan(table, function, allocators, deallocators, dict(entry or {}), allocations)
        assert [site for _, site in frees] == sorted(site for _, site in frees)
        found.append((set(frees), allocations, list(allocations)))
    assert found[0] == found[1], hex(function.rva)
    return found[0][0], found[0][1]


def _agree_on_table(table: FunctionTable) -> int:
    """Both twins on every function of ``table`` that reaches the heap, with the wrappers each finds; the scans."""
    for analysis in table.analyses:  # the compiled reader of packed references, and the twin's over tuples
        assert (_ownership.call_targets(analysis.raw_refs, ownership._CALLS, ownership._THROUGH_IAT)
                == _ownership_reference.call_targets(list(analysis.raw_refs), ownership._CALLS, ownership._THROUGH_IAT))
    # the wrapper search's starting point: the small functions' targets, and who calls each, read by both
    small, callers = _ownership.small_callers(table.functions, table.analyses, ownership._WRAPPER_BYTES,
                                              ownership._CALLS, ownership._THROUGH_IAT)
    assert (small, callers) == _ownership_reference.small_callers(
        table.functions, [SimpleNamespace(raw_refs=list(a.raw_refs)) for a in table.analyses],
        ownership._WRAPPER_BYTES, ownership._CALLS, ownership._THROUGH_IAT)
    assert small and all(f.size <= ownership._WRAPPER_BYTES for f, _ in small)
    heap = ownership._find_heap_functions(table, _ownership_reference.scan)
    assert ownership._find_heap_functions(table, _ownership.scan) == heap
    reach = ownership._heap_targets(*heap)
    scans = 0
    for function in table.functions:
        refs = table.analysis_of(function).raw_refs
        # the compiled reader of packed references and the twin's over tuples, against the plain definition
        reaches = _ownership.reaches(refs, reach)
        assert reaches == _ownership_reference.reaches(list(refs), reach) == any(
            r[4] in heap[0] or r[4] in heap[1] or -r[4] in heap[0] or -r[4] in heap[1] for r in refs)
        if reaches:
            _agree(table, function, *heap)
            scans += 1
    return scans


def test_compiled_scan_goes_with_the_compiled_core(cases: list[Case]) -> None:
    table = discover(Image.load(cases[0].baseline))
    assert table.backend.IMPLEMENTATION == "cython"
    assert ownership._scan_kernel(table) is _ownership.scan
    pure = discover(Image.load(cases[0].baseline), importlib.import_module("hotpatch.analysis._reference"))
    assert ownership._kernels(pure) is _ownership_reference


def test_twins_agree_on_every_fixture_image(cases: list[Case]) -> None:
    images = {p for case in cases for p in (case.baseline, case.patched)}
    scans = sum(_agree_on_table(discover(Image.load(path))) for path in sorted(images))
    assert scans > 20  # the ownership cases and the C runtime's own code reach malloc/free


# ── random instruction sequences ─────────────────────────────────────────────

_FUNCTION_RVA = 0x1000
_ALLOCATOR, _FREE_RCX, _FREE_RDX, _OTHER = 0x8000, 0x8100, 0x8200, 0x8300  # functions of the image
_MALLOC_SLOT, _FREE_SLOT, _HEAPFREE_SLOT, _OTHER_SLOT = 0x9000, 0x9008, 0x9010, 0x9018  # IAT slots
_ALLOCATORS = frozenset({_ALLOCATOR, -_MALLOC_SLOT})
_DEALLOCATORS = {_FREE_RCX: x86.X86_REG_RCX, _FREE_RDX: x86.X86_REG_RDX, -_FREE_SLOT: x86.X86_REG_RCX,
                 -_HEAPFREE_SLOT: x86.X86_REG_R8}
_REGS = ("rax", "rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12")
_REGS32 = {"rax": "eax", "rcx": "ecx", "rdx": "edx", "rbx": "ebx", "rsi": "esi", "rdi": "edi", "r8": "r8d",
           "r9": "r9d", "r10": "r10d", "r11": "r11d", "r12": "r12d"}
_FIELDS = (0, 8, 0x10, 0x18, 0x20)
_SLOTS = (0x20, 0x28, 0x30)
_TEXT = (  # instructions whose encoding does not depend on where they are
    "mov {r}, qword ptr [{b} + {d}]", "mov {r}, qword ptr [rsp + {s}]", "mov qword ptr [rsp + {s}], {r}",
    "mov qword ptr [{b} + {d}], {r}", "mov {r}, {b}", "mov {r32}, 1", "xor {r32}, {r32}", "lea {r}, [{b} + 8]",
    "mov dword ptr [rsp + {s}], 0", "add qword ptr [rsp + {s}], 1", "push {r}", "pop {r}",
    "mov {r}, qword ptr [{b} + {b}*8 + 8]", "mov {r}, qword ptr [rip + 0x100]", "mov qword ptr [{b} + {d}], 0",
    "mov {r}, 0x1234", "test {r}, {b}", "nop", "mov {r32}, dword ptr [{b} + {d}]",
    "mov rcx, rax", "mov rdx, rax", "mov r8, rax", "mov qword ptr [{b} + {d}], rax",
)


@dataclass(frozen=True)
class _Image:
    memory: bytes


@dataclass(frozen=True)
class _Analysis:
    raw_tables: list[tuple[int, int, int, tuple[int, ...]]]


@dataclass(frozen=True)
class _Function:
    rva: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Code:
    """One synthetic function in an image's bytes: what the scans read of a FunctionTable and a Function."""

    image: _Image
    function: _Function
    analysis: _Analysis

    def analysis_of(self, function: _Function) -> _Analysis:
        return self.analysis


_OPCODES = {"call": b"\xe8", "jmp": b"\xe9", "je": b"\x0f\x84", "jne": b"\x0f\x85", "call_iat": b"\xff\x15",
            "jmp_iat": b"\xff\x25"}


def _branch(kind: str, at: int, target: int) -> bytes:
    """A call or jump at ``at`` with a rel32 operand (or a RIP-relative disp32 one to the slot ``target``), so
    that its size does not depend on the target."""
    opcode = _OPCODES[kind]
    return opcode + struct.pack("<i", target - (at + len(opcode) + 4))


@functools.cache
def _assembled(text: str) -> bytes:
    return assemble(text)


def _program(rng: random.Random) -> _Code:
    """A random function: field loads, spills, stores, moves, calls to allocators and deallocators (direct and
    through IAT slots), jumps forward and back (loops), a jump through a table, returns."""
    count = rng.randint(3, 60)
    plan: list[tuple[str, bytes | int, bool]] = []  # (kind, bytes or target, target is an instruction's index)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.55:
            r, b = rng.choice(_REGS + ("rcx", "rcx", "rdx", "r8", "rax")), rng.choice(_REGS)  # freed ones more often
            text = rng.choice(_TEXT).format(r=r, b=b, r32=_REGS32[r], d=rng.choice(_FIELDS), s=rng.choice(_SLOTS))
            plan.append(("text", _assembled(text), False))
        elif roll < 0.68:
            plan.append((rng.choice(("call", "call", "jmp")), rng.choice((_ALLOCATOR, _FREE_RCX, _FREE_RDX, _OTHER)),
                         False))
        elif roll < 0.78:
            plan.append((rng.choice(("call_iat", "call_iat", "jmp_iat")),
                         rng.choice((_MALLOC_SLOT, _FREE_SLOT, _HEAPFREE_SLOT, _OTHER_SLOT)), False))
        elif roll < 0.94:
            plan.append((rng.choice(("jmp", "je", "jne", "je")), rng.randrange(count + 1), True))
        else:  # ret, int3, jmp rax (through the table), ud2
            plan.append(("text", rng.choice((b"\xc3", b"\xcc", b"\xff\xe0", b"\x0f\x0b")), False))
    starts = [_FUNCTION_RVA]
    for kind, item, _ in plan:
        starts.append(starts[-1] + (len(item) if isinstance(item, bytes) else len(_OPCODES[kind]) + 4))
    code = b""
    for (kind, item, local), at in zip(plan, starts):
        if isinstance(item, bytes):
            code += item
        elif local:  # now and then into the middle of an instruction
            code += _branch(kind, at, starts[item] + (1 if rng.random() < 0.03 else 0))
        else:
            code += _branch(kind, at, item)
    end = _FUNCTION_RVA + len(code)
    memory = bytearray(0xA000)
    memory[_FUNCTION_RVA:end] = code
    # now and then the function's range stops short of its last instruction
    ranges = ((_FUNCTION_RVA, end - rng.choice((0, 0, 0, 3))),)
    table = tuple(t for t in starts if rng.random() < 0.2)
    return _Code(_Image(bytes(memory)), _Function(_FUNCTION_RVA, ranges), _Analysis([(0, 0, 0, table)]))


def test_twins_agree_on_random_instruction_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(20261202)
    arguments = {r: frozenset({("arg", r)}) for r in (x86.X86_REG_RCX, x86.X86_REG_RDX, x86.X86_REG_R8)}
    kinds: set[str] = set()
    stored = freeing = 0
    for case in range(400):
        code = _program(rng)
        # a small budget now and then: the scan stops at the same instruction in both
        monkeypatch.setattr(_ownership_reference, "SCAN_BUDGET", rng.choice((20000, 20000, 7, 40)))
        frees, allocations = _agree(code, code.function, _ALLOCATORS, _DEALLOCATORS,
                                    arguments if case % 3 == 0 else {})
        kinds |= {tag[0] for tag, _ in frees}
        stored += any(allocations.values())
        freeing += bool(frees)
    # the sequences reach every kind of evidence, not only empty scans
    assert kinds == {"field", "alloc", "arg"} and stored > 5 and freeing > 40, (stored, freeing)


def _function(code: bytes) -> _Code:
    memory = bytearray(0xA000)
    memory[_FUNCTION_RVA:_FUNCTION_RVA + len(code)] = code
    return _Code(_Image(bytes(memory)), _Function(_FUNCTION_RVA, ((_FUNCTION_RVA, _FUNCTION_RVA + len(code)),)),
                 _Analysis([]))


def test_paths_that_meet_bring_both_their_fields_to_the_free() -> None:
    # je L1; mov rcx, [rbx+8]; jmp L2; L1: mov rcx, [rbx+0x10]; L2: call free; ret
    first, second = assemble("mov rcx, qword ptr [rbx + 8]"), assemble("mov rcx, qword ptr [rbx + 0x10]")
    at_first = _FUNCTION_RVA + 6
    at_second = at_first + len(first) + 5
    at_free = at_second + len(second)
    code = (_branch("je", _FUNCTION_RVA, at_second) + first + _branch("jmp", at_first + len(first), at_free) + second
            + _branch("call", at_free, _FREE_RCX) + b"\xc3")
    program = _function(code)
    frees, _ = _agree(program, program.function, _ALLOCATORS, _DEALLOCATORS)
    assert frees == {(("field", 8), at_free), (("field", 0x10), at_free)}


def test_budget_cuts_both_scans_at_the_same_instruction(monkeypatch: pytest.MonkeyPatch) -> None:
    # a field loaded, a loop (nop; je back), then the field's pointer freed: the free is the fourth
    # instruction the scan meets, so a budget of three stops the scan before it
    load, spin = assemble("mov rcx, qword ptr [rbx + 0x18]"), assemble("nop")
    at_loop = _FUNCTION_RVA + len(load)
    program = _function(load + spin + _branch("je", at_loop + 1, at_loop) + _branch("call", at_loop + 7, _FREE_RCX)
                        + b"\xc3")
    for budget, found in ((3, False), (4, True), (20000, True)):
        monkeypatch.setattr(_ownership_reference, "SCAN_BUDGET", budget)
        frees, _ = _agree(program, program.function, _ALLOCATORS, _DEALLOCATORS)
        assert ((("field", 0x18), at_loop + 7) in frees) == found, budget


def test_remembered_instructions_are_told_apart_by_all_their_bytes() -> None:
    # the two loads share their first four bytes (the scan's remembered summaries are hashed on those) and
    # differ in the field's displacement after them; each scan must free its own field
    near, far = assemble("mov rcx, qword ptr [rbx + 0x1078]"), assemble("mov rcx, qword ptr [rbx + 0x2078]")
    assert near[:4] == far[:4] and near != far
    for load, field in ((near, 0x1078), (far, 0x2078), (near, 0x1078)):
        program = _function(load + _branch("call", _FUNCTION_RVA + len(load), _FREE_RCX) + b"\xc3")
        frees, _ = _agree(program, program.function, _ALLOCATORS, _DEALLOCATORS)
        assert frees == {(("field", field), _FUNCTION_RVA + len(load))}


def test_remembered_conditional_jumps_go_where_their_own_address_sends_them() -> None:
    # the same je bytes at two addresses: the scan remembers a conditional jump's target as a distance, so
    # each must reach the load and free 22 bytes after its own start (int3 one byte before)
    jumps = {}
    for pad, field in ((b"", 8), (b"\x90", 0x10)):
        at = _FUNCTION_RVA + len(pad)
        jump = _branch("je", at, at + 22)
        load = assemble(f"mov rcx, qword ptr [rbx + {field:#x}]")
        body = pad + jump + b"\xcc" * (22 - len(jump)) + load
        site = _FUNCTION_RVA + len(body)
        program = _function(body + _branch("call", site, _FREE_RCX) + b"\xc3")
        frees, _ = _agree(program, program.function, _ALLOCATORS, _DEALLOCATORS)
        assert frees == {(("field", field), site)}
        jumps[pad] = jump
    assert jumps[b""] == jumps[b"\x90"]


def test_scans_that_alternate_heap_functions_use_each_scans_own() -> None:
    # the verdict alternates the baseline's and the patched image's heap functions; the compiled scan keeps
    # both sets, and must not free through a deallocator of the other set
    load = assemble("mov rcx, qword ptr [rbx + 0x28]")
    program = _function(load + _branch("call", _FUNCTION_RVA + len(load), _OTHER) + b"\xc3")
    site = _FUNCTION_RVA + len(load)
    with_other = {**_DEALLOCATORS, _OTHER: x86.X86_REG_RCX}
    for deallocators, expected in ((_DEALLOCATORS, set()), (with_other, {(("field", 0x28), site)}),
                                   (_DEALLOCATORS, set()), (with_other, {(("field", 0x28), site)})):
        frees, _ = _agree(program, program.function, _ALLOCATORS, deallocators)
        assert frees == expected


def test_scans_given_equal_copies_or_same_sized_allocators_read_them_by_content() -> None:
    # the compiled scan keeps the allocators it last took by identity, and takes an equal copy in their place;
    # another set of the same size, alternating with them, must still make its own allocations
    program = _function(_branch("call", _FUNCTION_RVA, _OTHER) + _assembled("mov qword ptr [rbx + 0x30], rax")
                        + b"\xc3")
    with_other = frozenset({_OTHER, -_MALLOC_SLOT})  # as many members as _ALLOCATORS, _OTHER in _ALLOCATOR's place
    assert len(with_other) == len(_ALLOCATORS)
    stored = {_FUNCTION_RVA: {0x30}}
    for allocators, expected in ((_ALLOCATORS, {}), (frozenset(_ALLOCATORS), {}), (with_other, stored),
                                 (frozenset(with_other), stored), (_ALLOCATORS, {}), (with_other, stored),
                                 (frozenset(_ALLOCATORS), {}), (set(with_other), stored)):
        _, allocations = _agree(program, program.function, allocators, _DEALLOCATORS)
        assert allocations == expected


# ── real code ─────────────────────────────────────────────────────────────────


@pytest.mark.realbins
@pytest.mark.slow
def test_twins_agree_on_rust_pyd_43_0_0_and_43_0_1() -> None:
    for version in ("43.0.0", "43.0.1"):
        path = real_binary("cryptography", version, "cryptography/hazmat/bindings/_rust.pyd")
        assert _agree_on_table(discover(Image.load(path))) > 2000


@pytest.mark.corpus
@pytest.mark.slow
def test_twins_agree_on_the_libpng_corpus_steps() -> None:
    from tests.corpus.build import build_corpus

    (libpng,) = [built for built in build_corpus() if built.library.name == "libpng"]
    scans = sum(_agree_on_table(discover(Image.load(step))) for step in libpng.steps)
    assert scans > 50 * len(libpng.steps)  # about 80 a step: the C runtime and png_malloc/png_free callers
