"""Function discovery: sources, bounds, padding, coverage."""

from __future__ import annotations

import dataclasses
import random
from bisect import bisect_right
from collections import Counter
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.analysis.functions import FunctionTable
from hotpatch.analysis.padding import USABLE_PADDING_RE
from hotpatch.verdict.rules import decide


def test_every_symbol_function_is_found_with_symbols(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "switch_table" / "baseline.dll")
    table = discover(image)
    starts = {f.rva for f in table}
    for symbol in image.symbols:
        if symbol.is_function and image.is_executable_rva(symbol.rva):
            assert symbol.rva in starts, symbol.name
    assert not table.overlaps()


def test_exports_found_in_stripped_build(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "switch_table" / "baseline-stripped.dll")
    table = discover(image)
    for export in image.exports:
        function = table.at(export.rva)
        assert function is not None and "export" in function.sources
        assert function.name == export.name


def test_leaf_function_without_pdata_is_found_through_calls(built_fixtures: Path) -> None:
    # A leaf function found only by calls: drop .pdata entirely and rediscover.
    image = Image.load(built_fixtures / "new_callee" / "patched.dll")
    stripped_pdata = Image.load(built_fixtures / "new_callee" / "patched-stripped.dll")
    table = discover(image)
    no_pdata = _without_pdata(stripped_pdata)
    table_without = discover(no_pdata)
    found = {f.rva for f in table_without}
    callees = {t for a in table.analyses for t in a.call_targets() if table.at(t) is not None}
    assert callees and callees <= found
    assert any("call" in f.sources and "pdata" not in f.sources for f in table_without)
    assert not table_without.overlaps()


def _without_pdata(image: Image) -> Image:
    import dataclasses

    return dataclasses.replace(image, runtime_functions=())


def test_function_ranges_lie_in_executable_sections(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "body_change" / "baseline.dll")
    for function in discover(image):
        section = image.section_from_rva(function.rva)
        assert section is not None and section.executable
        assert function.end_rva <= section.end_rva and function.size > 0


def test_padding_before_entry_is_int3_or_nop(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "padding_entry" / "baseline.dll")
    table = discover(image)
    padded = [f for f in table if f.name and f.pad_before >= 5]
    assert padded, "-fpatchable-function-entry leaves nops before the entry"
    for function in padded:
        pad = image.read(function.rva - function.pad_before, function.pad_before)
        assert USABLE_PADDING_RE.fullmatch(pad), pad.hex()
        owner = table.containing(function.rva - 1)
        assert owner is None, "padding must not belong to another function"


def test_counts_by_source_cover_every_function(built_fixtures: Path) -> None:
    table = discover(Image.load(built_fixtures / "switch_table" / "baseline.dll"))
    counts = table.counts_by_source()
    assert counts["pdata"] > 0 and counts["export"] >= 1 and counts["entry"] == 1
    assert all(f.sources for f in table)


@pytest.mark.parametrize("which", ["openblas", "rust"])
def test_coverage_on_real_binaries(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue("openblas_dll" if which == "openblas" else "rust_pyd")
    image = Image.load(path)
    table = discover(image)
    coverage = table.coverage()
    assert all(share >= 0.95 for share in coverage.values()), coverage
    assert not table.overlaps()
    # the hand-written OpenBLAS kernels have no .pdata: most functions must come from elsewhere
    pdata = sum(1 for f in table if "pdata" in f.sources)
    if which == "openblas":
        assert len(image.runtime_functions) < 1000 and len(table) > 5 * pdata
    assert pdata == len(image.runtime_functions)
    assert len(Counter(f.rva for f in table)) == len(table)


def test_callback_reached_only_through_lea_is_a_function(built_fixtures: Path) -> None:
    """scale_cb() has no .pdata, no export and (stripped) no symbol; only a lea takes its address."""
    symbols = {s.name: s.rva for s in Image.load(built_fixtures / "lea_callback" / "baseline.dll").symbols}
    table = discover(Image.load(built_fixtures / "lea_callback" / "baseline-stripped.dll"))
    function = table.at(symbols["scale_cb"])
    assert function is not None and function.sources == ("lea",)
    # it ends after its ret: the alignment nops behind it and twice() are not part of it
    assert function.end_rva == symbols["scale_cb"] + 12 and function.pad_after > 0
    assert table.containing(symbols["twice"]).rva == symbols["twice"]


def test_a_change_no_function_covers_is_a_reason(built_fixtures: Path) -> None:
    """Without the lea source the changed callback lies outside every function: the diff must say so."""
    import dataclasses

    from hotpatch.diff.compare import diff

    def without_callback(name: str) -> object:
        table = discover(Image.load(built_fixtures / "lea_callback" / f"{name}-stripped.dll"))
        keep = [i for i, f in enumerate(table.functions) if f.sources != ("lea",)]
        assert len(keep) == len(table.functions) - 1
        return dataclasses.replace(table, functions=tuple(table.functions[i] for i in keep),
                                   analyses=tuple(table.analyses[i] for i in keep))

    baseline, patched = without_callback("baseline"), without_callback("patched")
    result = diff(baseline, patched)
    assert result.summary()["changed"] == 0
    assert decide(result).status == "NEW_BASELINE"
    assert [r.kind for r in decide(result).reasons] == ["uncovered_code"]
    assert decide(diff(baseline, baseline)).status == "HOTPATCH"


@pytest.mark.parametrize("code,expected", [
    ("c3", True), ("f3c3", True), ("c20800", True), ("e900000000", True), ("eb00", True), ("ffe0", True),
    ("41ffe3", True), ("48ff2500000000", True), ("3effe0", True), ("0f0b", True), ("cc", True),
    ("e800000000", False), ("ffd0", False), ("ff15 00000000", False), ("7400", False), ("90", False),
    ("4889c8", False), ("0f1f4000", False),
])
def test_terminating_instructions_by_their_bytes(code: str, expected: bool) -> None:
    from hotpatch.analysis import _core
    from hotpatch.analysis.flow import terminates

    raw = bytes.fromhex(code.replace(" ", ""))
    assert terminates(raw, 0, len(raw)) is expected
    # the compiled core stops its sweep at the same instructions: data right after them is skipped
    assert _core.terminates(raw) is expected


def _assert_containing_as_every_span(table: FunctionTable, probes: set[int]) -> None:
    """``containing`` answers as one sorted list of every span (primary ranges and fragments) does."""
    spans = sorted((begin, end, i) for i, f in enumerate(table.functions) for begin, end in f.ranges)
    begins = [s[0] for s in spans]
    for rva in sorted(probes):
        index = bisect_right(begins, rva) - 1
        expected = table.functions[spans[index][2]] if index >= 0 and rva < spans[index][1] else None
        assert table.containing(rva) is expected, hex(rva)


def test_containing_with_fragments_anywhere_answers_as_every_span_sorted(built_fixtures: Path) -> None:
    """The primary ranges bisected with the fragments' own index give what one index of every span gives,
    fragments overlapping functions, each other and sharing begins included."""
    table = discover(Image.load(built_fixtures / "switch_table" / "baseline.dll"))
    rng = random.Random(6)
    high = table.functions[-1].end_rva + 64
    functions = tuple(dataclasses.replace(f, fragments=tuple(sorted(
        (begin, begin + rng.randrange(1, 48)) for begin in (rng.randrange(0, high) for _ in range(rng.randrange(3))))))
        for f in table.functions)
    assert sum(len(f.fragments) for f in functions) > 0
    synthetic = dataclasses.replace(table, functions=functions)
    probes = {x + d for f in functions for begin, end in f.ranges for x in (begin, end) for d in (-1, 0, 1)}
    _assert_containing_as_every_span(synthetic, probes | {-1} | {rng.randrange(0, high) for _ in range(2000)})


def test_containing_on_a_real_binary_answers_as_every_span_sorted(rust_pyd: Path) -> None:
    table = discover(Image.load_fast(rust_pyd))
    assert any(f.fragments for f in table)
    probes = {x + d for f in table for begin, end in f.ranges for x in (begin, end) for d in (-1, 0, 1)}
    _assert_containing_as_every_span(table, probes)
