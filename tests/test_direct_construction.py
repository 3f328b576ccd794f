"""Discovery builds its Function and FunctionAnalysis objects without their dataclass ``__init__`` (a few
hundred thousand on a large image): what it builds must be the same objects the constructors make."""

from __future__ import annotations

import dataclasses
import pickle
from array import array
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.analysis import api, functions
from hotpatch.analysis.api import FunctionAnalysis
from hotpatch.analysis.functions import Function


def _fields(obj: object) -> dict[str, object]:
    return {field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)}  # type: ignore[arg-type]


def test_direct_function_equals_the_constructed_one() -> None:
    from hotpatch.analysis import _discovery as compiled
    from hotpatch.analysis import _discovery_reference as reference

    values = (0x1000, 0x1040, "f", ("pdata", "call"), ((0x2000, 0x2010),), 6, 3, None, "ab12")
    analysis = FunctionAnalysis(0x1000, ((0x1000, 0x1040), (0x2000, 0x2010)), array("I"), [], [], "ab12")
    mask = sum(1 << functions.SOURCES.index(source) for source in values[3])
    made = Function(*values)
    for kernels in (compiled, reference):
        direct, = kernels.build_functions(Function, [(analysis.rva, analysis.ranges)], [analysis], array("I", [6]),
                                          array("I", [3]), {}, {0x1000: "f"}, {0x1000: mask}, functions._sources_of)
        assert direct == made and hash(direct) == hash(made) and repr(direct) == repr(made)
        assert _fields(direct) == _fields(made) and not hasattr(direct, "__dict__")
        assert direct.ranges == made.ranges == analysis.ranges
        unpickled = pickle.loads(pickle.dumps(direct))
        assert unpickled == made and unpickled.ranges == made.ranges
        with pytest.raises(dataclasses.FrozenInstanceError):
            direct.rva = 0  # type: ignore[misc]


def test_direct_ranges_begin_at_the_entry() -> None:
    """``ranges`` is ``(rva, end_rva)`` and the fragments however the item's first range begins, as a
    Function constructed from the same fields has it; a replaced Function's follows its fields."""
    from hotpatch.analysis import _discovery as compiled
    from hotpatch.analysis import _discovery_reference as reference

    analysis = FunctionAnalysis(0x1000, ((0x1000, 0x1040),), array("I"), [], [], "ab12")
    item = (0x1000, ((0x0FF0, 0x1040), (0x2000, 0x2010)))
    for kernels in (compiled, reference):
        direct, = kernels.build_functions(Function, [item], [analysis], array("I", [0]), array("I", [0]), {}, {},
                                          {0x1000: 1}, functions._sources_of)
        assert direct.ranges == ((0x1000, 0x1040), (0x2000, 0x2010))
        assert dataclasses.replace(direct, end_rva=0x1030).ranges == ((0x1000, 0x1030), (0x2000, 0x2010))


def test_direct_analysis_equals_the_constructed_one() -> None:
    values = (0x1000, ((0x1000, 0x1040),), array("I", [0x1000, 0x1004]), [(3, 0x1004, 1, 4, 0x3000)],
              [(0x1004, 0x5000, 1, (0x1008,))])
    for extra in ((), ("digest",)):
        made, direct = FunctionAnalysis(*values, *extra), api._analysis(*values, *extra)
        assert _fields(direct) == _fields(made) and direct == made and repr(direct) == repr(made)
        assert not hasattr(direct, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            direct.fingerprint = "x"  # type: ignore[misc]


def test_discovered_objects_equal_their_rebuilt_twins(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "switch_table" / "baseline.dll")
    table = discover(image)
    assert len(table) > 5
    for function, analysis in zip(table.functions, table.analyses):
        assert function == Function(**_fields(function))
        assert function.ranges == Function(**_fields(function)).ranges == analysis.ranges
        assert analysis.fingerprint == function.fingerprint != ""
        assert _fields(analysis) == _fields(FunctionAnalysis(**_fields(analysis)))


def test_core_builds_the_analyses_the_constructor_makes(built_fixtures: Path) -> None:
    """Both analysis implementations build FunctionAnalysis objects themselves (the compiled one in C, through
    the slots' descriptors): field for field what ``FunctionAnalysis(...)`` makes, frozen and slotted."""
    from hotpatch.analysis import _core as core
    from hotpatch.analysis import _reference as reference

    image = Image.load(built_fixtures / "switch_table" / "baseline.dll")
    table = discover(image)
    items = [(a.rva, a.ranges) for a in table.analyses]
    starts = array("I", sorted(f.rva for f in table))
    for impl in (core, reference):
        decoded = impl.decode(table.context, items, FunctionAnalysis)
        plain = impl.decode(table.context, items)
        assert len(decoded) == len(items) > 5
        for (rva, ranges), analysis, (insn_rvas, refs, tables) in zip(items, decoded, plain):
            assert type(analysis) is FunctionAnalysis and not hasattr(analysis, "__dict__")
            assert analysis.rva is rva and analysis.ranges is ranges and analysis.fingerprint == ""
            assert analysis == FunctionAnalysis(rva, ranges, insn_rvas, refs, tables)
        printed = impl.fingerprinted(table.context, decoded, starts, FunctionAnalysis)
        for before, after, final in zip(decoded, printed, table.analyses):
            assert after is not before and before.fingerprint == ""  # a copy: the input is left as it was
            assert _fields(after) == _fields(final) and after.fingerprint != ""
            assert pickle.loads(pickle.dumps(after)) == after
            with pytest.raises(dataclasses.FrozenInstanceError):
                after.fingerprint = "x"  # type: ignore[misc]


def test_core_refuses_a_class_without_the_analysis_slots(built_fixtures: Path) -> None:
    from hotpatch.analysis import _core as core
    from hotpatch.analysis import _reference as reference

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        rva: int

    table = discover(Image.load(built_fixtures / "switch_table" / "baseline.dll"))
    items = [(a.rva, a.ranges) for a in table.analyses[:2]]
    for impl in (core, reference):
        for wrong in (NoSlots, dict, "FunctionAnalysis"):
            with pytest.raises(TypeError):
                impl.decode(table.context, items, wrong)
            with pytest.raises(TypeError):
                impl.fingerprinted(table.context, list(table.analyses[:2]), array("I", [0]), wrong)
