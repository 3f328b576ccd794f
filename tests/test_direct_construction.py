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
    values = (0x1000, 0x1040, "f", ("pdata", "call"), ((0x2000, 0x2010),), 6, 3, None, "ab12")
    made, direct = Function(*values), functions._function(*values)
    assert direct == made and hash(direct) == hash(made) and repr(direct) == repr(made)
    assert vars(direct) == vars(made) and list(vars(direct)) == list(vars(made))
    assert pickle.loads(pickle.dumps(direct)) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        direct.rva = 0  # type: ignore[misc]


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
        assert analysis.fingerprint == function.fingerprint != ""
        assert _fields(analysis) == _fields(FunctionAnalysis(**_fields(analysis)))
