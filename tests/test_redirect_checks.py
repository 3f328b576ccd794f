"""The verdict's redirect and reference checks, read through the diff kernels, say what reading every
reference of every function in Python says (the definitions as first written, kept here as the oracle)."""

from __future__ import annotations

from typing import Any

import pytest

from hotpatch.analysis.refkinds import BRANCH_REL8, BRANCH_REL32
from hotpatch.diff.compare import diff
from hotpatch.verdict import rules
from hotpatch.verdict.redirect import obstacles, possible_strategies, redirectable
from hotpatch.verdict.strategy import PADDING_JMP_SIZE, Strategy
from tests.fixtures.cases import Case


def _obstacles_read_whole(table: Any, function: Any) -> dict[Strategy, str]:
    entry = function.rva
    analysis = table.analysis_of(function)
    inner = {t for kind, _, _, _, t in analysis.raw_refs
             if kind in (BRANCH_REL8, BRANCH_REL32) and function.rva < t < function.end_rva}
    for jump_table in analysis.raw_tables:
        inner.update(jump_table[3])
    longest = max(s.width for s in Strategy)
    end = min(function.end_rva, entry + longest + 15)
    instructions = table.backend.instruction_text(table.image.memory, entry, end)
    returns = set()
    for (rva, mnemonic, _), following in zip(instructions, instructions[1:] + [(end, "", "")]):
        if rva >= entry + longest:
            break
        if mnemonic.startswith("call") or mnemonic == "lcall":
            returns.add(following[0])
    room = function.size + function.pad_after
    out = {}
    for strategy in Strategy:
        overwritten = range(entry + 1, entry + strategy.width)
        if strategy.width > room:
            out[strategy] = f"needs {strategy.width} bytes, {room} there"
        elif any(t in overwritten for t in inner):
            out[strategy] = f"a branch lands inside its {strategy.width} bytes"
        elif any(r in overwritten for r in returns):
            out[strategy] = f"a call returns inside its {strategy.width} bytes"
        elif strategy is Strategy.SHORT_JMP_PADDING and (function.pad_before < PADDING_JMP_SIZE or function.size < 2):
            out[strategy] = f"{function.pad_before} bytes of padding before the entry, {PADDING_JMP_SIZE} needed"
    return out


def _unsupported_read_whole(table: Any, function: Any) -> list[tuple[int, int, int]]:
    out = []
    for kind, insn_rva, _, _, target in table.analysis_of(function).raw_refs:
        if any(begin <= target < end for begin, end in function.ranges):
            continue
        if kind == BRANCH_REL8 and function.size > rules._REL8_ISLAND_REACH:
            out.append((0, insn_rva, target))
        elif target != 0 and table.image.section_from_rva(target) is None and target not in table.context.iat:
            out.append((1, insn_rva, target))
    return out


@pytest.mark.parametrize("island_reach", [rules._REL8_ISLAND_REACH, 0])
def test_redirect_and_reference_checks_match_reading_every_reference(cases: list[Case], island_reach: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a reach of 0 makes every rel8 branch out of a function a reason: the reference check gets work to do
    monkeypatch.setattr(rules, "_REL8_ISLAND_REACH", island_reach)
    blocked = found = 0
    for case in cases:
        result = diff(case.baseline, case.patched)
        for function in result.baseline.functions:
            expected = _obstacles_read_whole(result.baseline, function)
            assert obstacles(result.baseline, function) == expected, (case.name, function.label)
            blocked += len(expected)
        table = result.patched
        sections = tuple((s.rva, s.end_rva, 0) for s in sorted(table.image.sections, key=lambda s: s.rva))
        kernel = result.streams.kernels.unsupported_refs  # type: ignore[union-attr]
        for function in table.functions:
            expected_refs = _unsupported_read_whole(table, function)
            reasons = rules._unsupported_references(result, function, kernel, sections)
            assert [r.message.split(": ", 1)[1].split(" at ")[0] for r in reasons] == \
                ["rel8 branch" if why == 0 else "reference" for why, _, _ in expected_refs], (case.name, function.label)
            assert all(f"{insn_rva:#x}" in r.message for r, (_, insn_rva, _) in zip(reasons, expected_refs))
            found += len(expected_refs)
    assert blocked > 100  # short functions, thin padding, calls at entries: the fixtures block strategies
    assert found > (5 if island_reach == 0 else 0)  # rel8 branches leave functions rarely (tail calls are rel32)


def test_redirectable_says_whether_any_strategy_is_possible(cases: list[Case]) -> None:
    # the verdict's shortcut (the short jump into the padding, checked without decoding) against the full check
    fast = fallback = unredirectable = 0
    for case in cases:
        result = diff(case.baseline, case.patched)
        table = result.baseline
        for function in table.functions:
            possible = bool(possible_strategies(table, function))
            assert redirectable(table, function) == possible, (case.name, function.label)
            if not possible:
                unredirectable += 1
            elif function.pad_before >= PADDING_JMP_SIZE and function.size >= 2:
                fast += 1
            else:
                fallback += 1
    assert fast > 50 and fallback > 50 and unredirectable > 0  # both paths and both answers are exercised
