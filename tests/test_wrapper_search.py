"""The heap-wrapper search (``ownership._find_heap_functions``) visits only the callers of heap functions it
knows, and finds exactly what visiting every small function in every round finds."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hotpatch import Image, discover
from hotpatch.analysis import _reference as reference_analysis
from hotpatch.analysis.functions import Function
from hotpatch.analysis.refkinds import CALL_REL32, IAT_CALL
from hotpatch.pe.image import Import
from hotpatch.verdict import _ownership, _ownership_reference, ownership
from tests.fixtures.cases import Case

_MALLOC_SLOT, _FREE_SLOT = 0x9000, 0x9008


def _every_small_function(table: Any, scan: Any) -> tuple[frozenset[int], dict[int, int]]:
    """The search as first written: every small function, in table order, every round."""
    image = table.image
    allocators = {-i.iat_rva for i in image.imports if i.name in ownership._ALLOCATORS}
    deallocators = {-i.iat_rva: ownership._DEALLOCATORS[i.name] for i in image.imports
                    if i.name in ownership._DEALLOCATORS}
    call_targets = ownership._kernels(table).call_targets
    small = [(f, targets) for f, a in zip(table.functions, table.analyses) if f.size <= ownership._WRAPPER_BYTES
             if (targets := call_targets(a.raw_refs, ownership._CALLS, ownership._THROUGH_IAT))]
    for _ in range(ownership._WRAPPER_ROUNDS):
        grown = False
        for function, targets in small:
            if function.rva in allocators or function.rva in deallocators:
                continue
            if targets & allocators:
                allocators.add(function.rva)
                grown = True
            elif targets & deallocators.keys():
                entry = {r: frozenset({("arg", r)}) for r in ownership._ARGUMENTS}
                passed = {tag[1] for tag, _ in scan(table, function, frozenset(allocators), deallocators, entry, {})
                          if tag[0] == "arg"}
                if len(passed) == 1:
                    deallocators[function.rva] = passed.pop()
                    grown = True
        if not grown:
            break
    return frozenset(allocators), deallocators


def _same(table: Any, scan: Any) -> tuple[frozenset[int], dict[int, int]]:
    found = ownership._find_heap_functions(table, scan)
    expected = _every_small_function(table, scan)
    assert found == expected and list(found[1].items()) == list(expected[1].items())
    return found


def test_search_finds_what_every_small_function_finds_on_every_fixture(cases: list[Case]) -> None:
    wrappers = 0
    for case in cases:
        for path in (case.baseline, case.patched):
            table = discover(Image.load_fast(path))
            allocators, deallocators = _same(table, _ownership.scan)
            wrappers += sum(rva > 0 for rva in allocators) + sum(rva > 0 for rva in deallocators)
    assert wrappers > 0  # the fixtures have wrappers (png_malloc-like) for the search to find


def _synthetic(rng: random.Random, count: int) -> SimpleNamespace:
    """Small functions calling malloc, free or each other in random order (wrappers of wrappers, chains
    that run against the table's order and need another round for each link)."""
    functions, analyses = [], []
    rvas = [0x1000 + 0x100 * i for i in range(count)]
    for rva in rvas:
        refs = []
        for _ in range(rng.randint(0, 3)):
            roll = rng.random()
            if roll < 0.08:
                refs.append((IAT_CALL, rva + 4, 0, 0, _MALLOC_SLOT))
            elif roll < 0.16:
                refs.append((IAT_CALL, rva + 4, 0, 0, _FREE_SLOT))
            else:
                refs.append((CALL_REL32, rva + 4, 0, 0, rng.choice(rvas)))
        size = rng.choice([0x20, 0x40, ownership._WRAPPER_BYTES, ownership._WRAPPER_BYTES + 1])
        functions.append(Function(rva, rva + size, None, ("pdata",)))
        analyses.append(SimpleNamespace(raw_refs=refs))
    image = SimpleNamespace(imports=(Import("msvcrt.dll", "malloc", None, _MALLOC_SLOT),
                                     Import("msvcrt.dll", "free", None, _FREE_SLOT)))
    return SimpleNamespace(image=image, functions=functions, analyses=analyses, backend=reference_analysis)


def test_search_finds_what_every_small_function_finds_on_random_call_graphs() -> None:
    rng = random.Random(20261202)

    def scan(table: Any, function: Function, allocators: frozenset[int], deallocators: dict[int, int],
             entry: Any, allocations: Any) -> list[tuple[tuple[str, int], int]]:
        # a stand-in for the scan: a wrapper hands on an argument chosen by its address, or none
        choice = function.rva // 0x100 % 5
        return [] if choice == 4 else [(("arg", ownership._ARGUMENTS[choice]), function.rva + 4)]

    found_rounds = 0
    for _ in range(300):
        table = _synthetic(rng, rng.randint(1, 40))
        allocators, deallocators = _same(table, scan)
        found_rounds += len(allocators) + len(deallocators) > 2
    assert found_rounds > 100  # most graphs have wrappers to find


def test_a_chain_against_table_order_is_cut_at_the_last_round() -> None:
    # f0 calls f1 calls f2 ... calls malloc: each round finds one more link, from the end
    count = ownership._WRAPPER_ROUNDS + 2
    rvas = [0x1000 + 0x100 * i for i in range(count)]
    functions = [Function(rva, rva + 0x20, None, ("pdata",)) for rva in rvas]
    analyses = [SimpleNamespace(raw_refs=[(CALL_REL32, rva + 4, 0, 0, rvas[i + 1])] if i + 1 < count else
                                [(IAT_CALL, rva + 4, 0, 0, _MALLOC_SLOT)]) for i, rva in enumerate(rvas)]
    image = SimpleNamespace(imports=(Import("msvcrt.dll", "malloc", None, _MALLOC_SLOT),))
    table = SimpleNamespace(image=image, functions=functions, analyses=analyses, backend=reference_analysis)
    allocators, _ = _same(table, _ownership_reference.scan)
    assert sorted(rva for rva in allocators if rva > 0) == rvas[-ownership._WRAPPER_ROUNDS:]


def test_real_wrappers_agree(rust_pyd: Path) -> None:
    allocators, deallocators = _same(discover(Image.load_fast(rust_pyd)), _ownership.scan)
    assert any(rva > 0 for rva in allocators) and any(rva > 0 for rva in deallocators)
