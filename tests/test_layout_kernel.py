"""The layout check's compiled pairs (hotpatch/verdict/_layout.pyx) against their pure-Python twin: same pairs.

Compared: the byte search clobbers' ``gcc_built`` asks, the operand text with numbers abstracted (the
tokens), and the instruction pairs a changed function's two versions give the layout check
(``DifferingPairs``), in order, on random instruction sequences with random alignments around them, on
every changed function of the fixture cases, and on cryptography's ``_rust.pyd`` 43.0.0 -> 43.0.1. The
compiled one goes with the compiled diff kernels' alignment, the twin with the Python one, as in a diff.
"""

from __future__ import annotations

import functools
import importlib
import random
from array import array
from dataclasses import dataclass
from typing import Any

import pytest

from hotpatch import Image, discover
from hotpatch.analysis import _reference as reference_analysis
from hotpatch.diff import _diffcore, _diffreference
from hotpatch.diff.compare import diff
from hotpatch.diff.result import DiffResult
from hotpatch.verdict import _layout, _layout_reference, layout
from hotpatch.x86 import assemble
from tests.fixtures.cases import Case
from tests.support.realbins import real_binary


def _twins() -> tuple[Any, Any]:
    return (_layout.DifferingPairs(_diffcore.aligned_indices),
            _layout_reference.DifferingPairs(_diffreference.aligned_indices))


def _agree_on_diff(result: DiffResult) -> int:
    """Both twins on every changed pair the layout check compares; the pairs found."""
    compiled, twin = _twins()
    found = 0
    for entry in result.functions:
        if entry.status != "changed" or entry.baseline is None or entry.patched is None:
            continue
        packed = result.streams.aligned_packed(entry.baseline, entry.patched)
        pairs = compiled(result.baseline, entry.baseline, result.patched, entry.patched, packed)
        assert pairs == twin(result.baseline, entry.baseline, result.patched, entry.patched, packed), \
            entry.baseline.label
        found += len(pairs)
    return found


def test_compiled_pairs_go_with_the_compiled_core(cases: list[Case]) -> None:
    result = diff(cases[0].baseline, cases[0].patched)
    assert result.baseline.backend.IMPLEMENTATION == "cython"
    assert isinstance(layout._differing_pairs(result), _layout.DifferingPairs)
    pure = importlib.import_module("hotpatch.analysis._reference")
    tables = [discover(Image.load(path), pure) for path in (cases[0].baseline, cases[0].patched)]
    assert isinstance(layout._differing_pairs(diff(*tables)), _layout_reference.DifferingPairs)
    assert layout.layout_kernels(tables[0]) is _layout_reference
    assert layout.layout_kernels(result.baseline) is _layout


def test_byte_search_finds_what_in_finds() -> None:
    rng = random.Random(20261203)
    for _ in range(3000):
        memory = bytes(rng.choice(b"GC: (x") for _ in range(rng.randint(0, 60)))
        needle = bytes(rng.choice(b"GC: (") for _ in range(rng.randint(0, 4)))
        assert _layout.contains(memory, needle) == _layout_reference.contains(memory, needle) == (needle in memory)
    for memory in (b"", b"GCC: (", b"xGCC: (GNU) 13", b"GCC: ", bytes(100000) + b"GCC: ("):
        assert _layout.contains(memory, b"GCC: (") == (b"GCC: (" in memory)


def test_numbers_are_abstracted_as_the_twins_pattern_does() -> None:
    rng = random.Random(20261203)
    alphabet = "0123456789abcdefxgzAFX_ r[]+-*:,."
    texts = ["qword ptr [rcx + rax*8 + 0x10]", "r8d, 0x0x1", "12ab, 0X1F, 0x", "xmm0, xmmword ptr [rip + 0x20]",
             "qword ptr gs:[0x58]", "byte ptr [rdi], byte ptr [rsi]", ""]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(20000)]
    for text in texts:
        assert _layout.abstracted(text) == _layout_reference.abstracted(text), text
    assert _layout.abstracted("qword ptr [rcx + rax*8 + 0x10], r8d") == "qword ptr [rcx + rax*# + #], r8d"


# ── random instruction sequences ─────────────────────────────────────────────

_TEXT = (  # numbers drawn from few values, so that tokens often agree while the text differs
    "mov {r}, qword ptr [{b} + {d}]", "lea {r}, [{b} + {d}]", "mov {r32}, {i}", "add {r}, {i}",
    "mov qword ptr [{b} + {d}], {r}", "cmp {r}, {i}", "nop", "mov {r}, qword ptr [rsp + {d}]",
    "mov {r}, qword ptr [{b} + {b}*8 + {d}]", "push {r}", "mov {r}, {b}", "movsd xmm0, qword ptr [{b} + {d}]",
    "mov {r}, qword ptr [{b} - {d}]", "mov dword ptr [{b} + {d}], {i}", "ret", "mov r8d, {i}",
)
_REGS = ("rax", "rcx", "rdx", "rbx", "r8", "r9")
_REGS32 = {"rax": "eax", "rcx": "ecx", "rdx": "edx", "rbx": "ebx", "r8": "r8d", "r9": "r9d"}
_NUMBERS = (0, 8, 0x10, 0x18, 0x100, 0x1000)
_CODE_RVA, _COLD_RVA = 0x1000, 0x5000


@functools.cache
def _assembled(text: str) -> bytes:
    return assemble(text)


#: an instruction: its template, registers and numbers
_Planned = tuple[str, str, str, int, int]


def _planned(rng: random.Random) -> _Planned:
    return rng.choice(_TEXT), rng.choice(_REGS), rng.choice(_REGS), rng.choice(_NUMBERS), rng.choice(_NUMBERS)


def _text(planned: _Planned) -> str:
    template, r, b, d, i = planned
    return template.format(r=r, r32=_REGS32[r], b=b, d=d, i=i)


def _edited(rng: random.Random, planned: list[_Planned]) -> list[_Planned]:
    """Another version: instructions kept, given other numbers, replaced, dropped or added."""
    out = []
    for item in planned:
        roll = rng.random()
        if roll < 0.5:
            out.append(item)
        elif roll < 0.75:
            out.append((*item[:3], rng.choice(_NUMBERS), rng.choice(_NUMBERS)))
        elif roll < 0.85:
            out.append(_planned(rng))
        elif roll < 0.95:
            out.extend([item, _planned(rng)])
    return out


@dataclass(frozen=True)
class _Image:
    memory: bytes


@dataclass(frozen=True)
class _Analysis:
    insn_rvas: Any


@dataclass(frozen=True)
class _Function:
    rva: int
    end_rva: int


@dataclass(frozen=True)
class _Table:
    """What the pairs read of a FunctionTable: the image's memory, the function's instruction RVAs, and the
    core's text decoder (the twin's)."""

    image: _Image
    analysis: _Analysis
    backend: Any = reference_analysis

    def analysis_of(self, function: _Function) -> _Analysis:
        return self.analysis


def _version(rng: random.Random, planned: list[_Planned]) -> tuple[_Table, _Function]:
    """The instructions at _CODE_RVA, now and then a cold part at _COLD_RVA whose instructions follow in the
    analysis, and a range that now and then stops short of its last instruction."""
    memory = bytearray(0x6000)
    rvas = array("I")
    at = _CODE_RVA
    for item in planned:
        code = _assembled(_text(item))
        memory[at:at + len(code)] = code
        rvas.append(at)
        at += len(code)
    end = at - (rng.choice((1, 2)) if planned and rng.random() < 0.15 else 0)
    if rng.random() < 0.2:
        cold = _COLD_RVA
        for _ in range(rng.randint(1, 4)):
            code = _assembled(_text(_planned(rng)))
            memory[cold:cold + len(code)] = code
            rvas.append(cold)
            cold += len(code)
    return _Table(_Image(bytes(memory)), _Analysis(rvas)), _Function(_CODE_RVA, end)


def _alignment(rng: random.Random, planned_a: list[_Planned], planned_b: list[_Planned], count_a: int,
               count_b: int) -> Any:
    """Pairs (i, j), both increasing, packed as the streams keep them: mostly the alignment of equal texts (as
    the streams pair instructions equal but for references) with some pairs left out, else random ones."""
    if rng.random() < 0.75:
        ids: dict[str, int] = {}
        a, b = ([ids.setdefault(_text(item), len(ids)) for item in planned] for planned in (planned_a, planned_b))
        return array("I", [index for i, j in _diffreference.aligned_indices(a, b) if rng.random() < 0.9
                           for index in (i, j)])
    size = rng.randint(0, min(count_a, count_b))
    firsts, seconds = sorted(rng.sample(range(count_a), size)), sorted(rng.sample(range(count_b), size))
    return array("I", [index for pair in zip(firsts, seconds) for index in pair])


def test_twins_agree_on_random_instruction_sequences() -> None:
    rng = random.Random(20261203)
    compiled, twin = _twins()
    found = 0
    for _ in range(1500):
        planned_a = [_planned(rng) for _ in range(rng.randint(0, 40))]
        planned_b = (_edited(rng, planned_a) if rng.random() < 0.8
                     else [_planned(rng) for _ in range(rng.randint(0, 40))])
        (table_a, fa), (table_b, fb) = _version(rng, planned_a), _version(rng, planned_b)
        packed = _alignment(rng, planned_a, planned_b, len(table_a.analysis.insn_rvas),
                            len(table_b.analysis.insn_rvas))
        pairs = compiled(table_a, fa, table_b, fb, packed)
        assert pairs == twin(table_a, fa, table_b, fb, packed), (planned_a, planned_b, packed)
        found += len(pairs)
    assert found > 1000  # the sequences give pairs to compare, not only empty runs


def test_twins_agree_on_every_fixture_case(cases: list[Case]) -> None:
    assert sum(_agree_on_diff(diff(case.baseline, case.patched)) for case in cases) > 20


# ── real code ─────────────────────────────────────────────────────────────────


@pytest.mark.realbins
def test_twins_agree_on_rust_pyd_43_0_0_to_43_0_1() -> None:
    result = diff(real_binary("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd"),
                  real_binary("cryptography", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd"))
    assert _agree_on_diff(result) > 1000
    image = result.baseline.image
    assert _layout.contains(image.memory, b"GCC: (") == _layout_reference.contains(image.memory, b"GCC: (")
