"""The analysis core: compiled and reference implementations agree; references are right."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import hotpatch
from hotpatch import Image, discover
from hotpatch.analysis import _core as core
from hotpatch.analysis import _reference as reference
from hotpatch.analysis import refkinds
from hotpatch.analysis.api import FunctionAnalysis
from hotpatch.analysis.refkinds import (
    ABS64,
    CALL_REL32,
    IAT_CALL,
    IMAGE_REL32,
    JUMP_TABLE,
    RIP_RELATIVE,
    TABLE_IMAGE_REL32,
    TABLE_SELF_REL32,
)
from tests.support.realbins import real_binary


def test_compiled_core_is_the_one_loaded() -> None:
    assert hotpatch.backend().IMPLEMENTATION == "cython", "hotpatch.analysis._core did not build or load"


def test_compiled_reference_kinds_equal_the_python_ones() -> None:
    # _refkinds.pxd restates refkinds.py's numbers for the C side; every compiled module cimports it
    python_side = {name: value for name, value in vars(refkinds).items() if name.isupper() and isinstance(value, int)}
    assert core.KINDS == python_side


def test_compiled_x86_numbers_equal_the_binding_ones() -> None:
    # the verdict reads capstone's numbers from the compiled core (its header), not from the Python binding
    from capstone import x86_const

    from hotpatch.analysis.api import x86_numbers

    assert len(core.X86_NUMBERS) > 80
    assert core.X86_NUMBERS == {name: getattr(x86_const, name) for name in core.X86_NUMBERS}
    assert all(getattr(x86_numbers(), name) == value for name, value in core.X86_NUMBERS.items())


def _assert_same(path: Path) -> int:
    image = Image.load(path)
    compiled = discover(image)
    oracle = discover(image, impl=reference)
    assert [f.rva for f in compiled] == [f.rva for f in oracle]
    assert compiled.functions == oracle.functions
    for fast, slow in zip(compiled.analyses, oracle.analyses):
        assert fast.ranges == slow.ranges
        assert fast.insn_rvas == slow.insn_rvas, hex(fast.rva)
        assert fast.raw_refs == slow.raw_refs, hex(fast.rva)
        assert fast.raw_tables == slow.raw_tables, hex(fast.rva)
        assert fast.fingerprint == slow.fingerprint, hex(fast.rva)
    return sum(a.instruction_count for a in compiled.analyses)


def test_core_agrees_with_reference_on_every_fixture(built_fixtures: Path) -> None:
    dlls = sorted(built_fixtures.glob("*/*.dll"))
    assert len(dlls) >= 40
    for dll in dlls:
        _assert_same(dll)


REAL = [
    ("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd"),
    ("numpy", "2.1.0", "numpy/_core/_multiarray_umath.*.pyd"),
    ("numpy", "2.1.0", "numpy/_core/_simd.*.pyd"),
    ("numpy", "2.1.1", "numpy/random/_generator.*.pyd"),
]


@pytest.mark.parametrize("dist,version,pattern", REAL, ids=[r[2].split("/")[-1] for r in REAL])
def test_core_agrees_with_reference_on_real_binaries(dist: str, version: str, pattern: str) -> None:
    instructions = _assert_same(real_binary(dist, version, pattern))
    assert instructions > 10000


def test_tables_after_the_code_are_not_swept_as_instructions() -> None:
    """MSVC leaves without .pdata run to the next function, over the switch table behind their code."""
    table = discover(Image.load(real_binary("cryptography", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd")))
    inline = 0
    for function, analysis in zip(table.functions, table.analyses):
        for insn_rva, table_rva, _, targets in analysis.raw_tables:
            if not (insn_rva < table_rva < function.end_rva and targets):
                continue
            inline += 1
            data = range(table_rva, table_rva + 4 * len(targets))
            assert not [rva for rva in analysis.insn_rvas if rva in data], hex(function.rva)
            assert not [ref for ref in analysis.raw_refs if ref[1] in data], hex(function.rva)
    assert inline >= 10


@pytest.mark.realbins
def test_llvm_switches_are_found_through_a_reused_base_register_and_across_chained_ranges() -> None:
    """LLVM loads the image base once (``lea r8, [rip - X]``) and a linear sweep meets other code that reuses r8
    before each switch that reads through it; .pdata chains can split a function between that lea and its
    switch. Every ``jmp reg`` of these two functions of _rust.pyd 43.0.1 dispatches through a table found
    here, no table byte is swept as code, and the twin agrees."""
    table = discover(Image.load(real_binary("cryptography", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd")))
    memory = table.image.memory
    wanted = {0x400340: 1, 0x585b80: 16}  # indirect jumps counted with capstone by hand
    functions = [f for f in table.functions if f.rva in wanted]
    assert len(functions) == 2
    assert len(functions[0].ranges) > 1  # the chained unwind entries split sub_400340
    items = [(f.rva, f.ranges) for f in functions]
    compiled = core.decode(table.context, items, FunctionAnalysis)
    oracle = reference.decode(table.context, items, FunctionAnalysis)
    for function, fast, slow in zip(functions, compiled, oracle):
        assert (fast.insn_rvas, fast.raw_refs, fast.raw_tables) == (slow.insn_rvas, slow.raw_refs, slow.raw_tables)
        analysis = table.analysis_of(function)
        assert len(analysis.jump_tables) == wanted[function.rva], hex(function.rva)
        for jump_table in analysis.jump_tables:
            assert jump_table.entry_kind == TABLE_IMAGE_REL32 and jump_table.targets
            data = range(jump_table.table_rva, jump_table.table_rva + 4 * len(jump_table.targets))
            assert not [rva for rva in analysis.insn_rvas if rva in data], hex(jump_table.table_rva)
        assert all(0 <= ref[4] < len(memory) for ref in analysis.raw_refs), hex(function.rva)


def test_instruction_text_agrees_with_reference() -> None:
    """The text disassembly the layout heuristic reads: every 20th function of _rust.pyd, and odd ranges."""
    table = discover(Image.load(real_binary("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd")))
    memory = table.image.memory
    checked = 0
    for function in table.functions[::20]:
        fast = core.instruction_text(memory, function.rva, function.end_rva)
        assert fast == reference.instruction_text(memory, function.rva, function.end_rva), hex(function.rva)
        checked += len(fast)
    assert checked > 20000
    for begin, end in ((0, 0), (5, 3), (len(memory) - 3, len(memory) + 10), (-4, 8)):
        assert core.instruction_text(memory, begin, end) == reference.instruction_text(memory, begin, end)


def test_gcc_switch_uses_a_table_relative_jump_table(built_fixtures: Path) -> None:
    table = discover(Image.load(built_fixtures / "switch_table" / "baseline.dll"))
    tables = [(f, t) for f in table for t in table.analysis_of(f).jump_tables]
    assert tables
    function, jump_table = tables[0]
    assert jump_table.entry_kind == TABLE_SELF_REL32 and len(jump_table.targets) >= 8
    assert all(function.rva <= t < function.end_rva for t in jump_table.targets)
    assert any(r.kind == JUMP_TABLE for r in table.analysis_of(function).references)


def test_msvc_switches_use_image_relative_tables() -> None:
    table = discover(Image.load(real_binary("numpy", "2.1.0", "numpy/_core/_multiarray_umath.*.pyd")))
    kinds = Counter(t.entry_kind for a in table.analyses for t in a.jump_tables)
    assert kinds[TABLE_IMAGE_REL32] > 50
    for analysis in table.analyses:
        image_relative = {r[1] for r in analysis.raw_refs if r[0] == IMAGE_REL32}
        for jump_table in analysis.jump_tables:
            if jump_table.entry_kind == TABLE_IMAGE_REL32:
                assert jump_table.insn_rva in image_relative
            assert all(any(b <= t < e for b, e in analysis.ranges) for t in jump_table.targets)


def test_reference_kinds_on_fixtures(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "new_import" / "patched.dll")
    table = discover(image)
    function = next(f for f in table if f.name == "label_length")
    refs = table.analysis_of(function).references
    iat = [r for r in refs if r.kind == IAT_CALL]
    assert any(image.import_at(r.target_rva).name == "lstrlenA" for r in iat)
    for r in refs:
        insn = image.read(r.insn_rva, 16)
        assert 0 < r.operand_offset + r.operand_size <= 15 or r.kind == JUMP_TABLE
        if r.kind in (CALL_REL32, RIP_RELATIVE, IAT_CALL):
            displacement = int.from_bytes(insn[r.operand_offset:r.operand_offset + 4], "little", signed=True)
            insn_end = table.analysis_of(function).insn_rvas
            following = [x for x in insn_end if x > r.insn_rva]
            next_rva = following[0] if following else function.end_rva
            if r.operand_offset + 4 == next_rva - r.insn_rva:
                assert next_rva + displacement == r.target_rva

    aslr = Image.load(built_fixtures / "aslr_reloc" / "baseline.dll")
    abs_refs = [r for a in discover(aslr).analyses for r in a.references if r.kind == ABS64]
    for r in abs_refs:
        assert r.insn_rva + r.operand_offset in aslr.relocations


def test_fingerprints_do_not_depend_on_placement(built_fixtures: Path) -> None:
    first = discover(Image.load(built_fixtures / "reorder" / "a.dll"))
    second = discover(Image.load(built_fixtures / "reorder" / "b.dll"))
    named_first = {f.name: f for f in first if f.name}
    named_second = {f.name: f for f in second if f.name}
    moved = [n for n in named_first if n in named_second and named_first[n].rva != named_second[n].rva]
    assert len(moved) >= 3, "the reordered build must really move functions"
    for name in named_first.keys() & named_second.keys():
        assert named_first[name].fingerprint == named_second[name].fingerprint, name


def test_changed_function_changes_fingerprint(cases: list) -> None:
    body = next(c for c in cases if c.name == "body_change")
    base = {f.name: f.fingerprint for f in discover(Image.load(body.baseline)) if f.name}
    patched = {f.name: f.fingerprint for f in discover(Image.load(body.patched)) if f.name}
    for name in body.changed:
        assert base[name] != patched[name]
