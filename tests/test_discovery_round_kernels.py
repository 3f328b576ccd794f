"""The kernels that take a whole discovery round at once (its layout's items and gaps, its reach, its
sanity checks, its bookkeeping, the final trim): the compiled ``_discovery`` and its pure-Python twin give
the same answers and leave the same dicts and sets behind, on random input, and discovery run with either
finds the same functions on every fixture and on a real binary."""

from __future__ import annotations

import copy
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hotpatch.analysis import _discovery as compiled
from hotpatch.analysis import _discovery_reference as reference
from hotpatch.analysis import functions
from hotpatch.pe.image import Image

from .support.discovery import padding_soup
from .support.realbins import real_binary

FIXTURES = Path(__file__).resolve().parents[1] / "build" / "fixtures"

#: bytes rich in terminators, prefixes and fill: random instructions that end, run on and pad
_CODE = bytes((0xC3, 0xCC, 0x90, 0xE9, 0xEB, 0x0F, 0x0B, 0xFF, 0x66, 0xF3, 0x48, 0x74, 0x00))


@dataclass(frozen=True)
class _Runtime:
    end_rva: int
    fragments: tuple[tuple[int, int], ...] = ()
    begin_rva: int = 0


@dataclass(frozen=True)
class _Analysis:
    insn_rvas: array
    raw_refs: list
    raw_tables: list


def _random_analysis(rng: random.Random, memory: bytes, begin: int, limit: int) -> _Analysis:
    """Instructions from ``begin`` up to ``limit``, branches onto them, past them and off the image, now
    and then a jump table."""
    rvas = array("I", sorted({begin, *rng.sample(range(begin, limit), min(limit - begin, rng.randrange(0, 12)))}))
    refs = sorted(((rng.choice((0, 1, 2, 3, 5)), rng.choice(rvas), 1, 4,
                    rng.choice((rng.choice(rvas), rng.randrange(-4, len(memory) + 40))))
                   for _ in range(rng.randrange(0, 6))), key=lambda ref: ref[1])
    tables = [(rng.choice(rvas), 0, 0, tuple(rng.randrange(0, len(memory) + 8) for _ in range(rng.randrange(1, 3))))
              ] if rng.random() < 0.1 else []
    return _Analysis(rvas, refs, tables)


def test_reach_windows_agree_on_random_code() -> None:
    rng = random.Random(21)
    decided = whole = 0
    for _ in range(300):
        size = rng.randrange(40, 400)
        memory = bytes(rng.choice(_CODE) if rng.random() < 0.85 else rng.randrange(256) for _ in range(size))
        items, windows, analyses = [], [], []
        for begin in sorted(rng.sample(range(0, size - 8), rng.randrange(1, 8))):
            limit = rng.randrange(begin + 1, size + 1)
            window_end = rng.choice((limit, rng.randrange(begin + 1, limit + 1)))
            items.append((begin, ((begin, limit),)))
            windows.append((begin, ((begin, window_end),)))
            analyses.append(_random_analysis(rng, memory, begin, window_end))
        horizons = [rng.choice((0, size + rng.randrange(0, 30))) for _ in items]
        margin = rng.choice((0, 4, 16))
        for tail_gaps in (True, False):
            full_c: dict = {}
            full_r: dict = {}
            out = compiled.reach_windows(memory, items, windows, analyses, horizons, margin, full_c, tail_gaps)
            assert out == reference.reach_windows(memory, items, windows, analyses, horizons, margin, full_r,
                                                  tail_gaps)
            assert full_c == full_r
            decided += sum(reached is not None for reached in out[0])
            whole += len(out[1])
    assert decided > 300 and whole > 100, (decided, whole)
    with pytest.raises(ValueError):
        compiled.reach_windows(b"", [(0, ((0, 1),))], [], [], [], 0, {})


def test_layout_and_round_bookkeeping_agree_on_random_input() -> None:
    rng = random.Random(8)
    for _ in range(200):
        size = rng.randrange(64, 3000)
        memory = padding_soup(rng, size)
        cut = rng.randrange(16, size - 16)
        sections = (array("I", [8, cut + 8]), array("I", [cut, size]))
        limits = array("I", [cut, rng.choice((size, size - 4))])
        starts = sorted(rng.sample([*range(8, cut), *range(cut + 8, size)], rng.randrange(1, 40)))
        pdata = {rva: _Runtime(rva + rng.randrange(1, 40), ((rva + 50, rva + 60),) if rng.random() < 0.3 else (), rva)
                 for rva in rng.sample(starts, rng.randrange(0, len(starts) + 1))}
        # a layout before and after a round's insertions: the first round (nothing known) and a later one
        known = sorted(rng.sample(starts, rng.randrange(0, len(starts) + 1)))
        added = sorted(set(starts) - set(known))
        raw = {rva: (rva, ((rva, rva + 1),)) for rva in known}
        items = {rva: rng.choice((item, (rva, ((rva, rva + 2),)))) for rva, item in raw.items()}
        state_c = (copy.deepcopy(raw), copy.deepcopy(items))
        state_r = (copy.deepcopy(raw), copy.deepcopy(items))
        args = (added, starts, pdata, *sections, limits)
        assert compiled.refresh_raw_items(*args, *state_c) == reference.refresh_raw_items(*args, *state_r)
        assert state_c == state_r
        # the gaps after some starts looked at again, some with places from before
        stale = sorted(rng.sample(starts, rng.randrange(0, len(starts) + 1)))
        gaps = {rva: [rva + 1] for rva in rng.sample(starts, rng.randrange(0, len(starts) + 1))}
        places = {place for fresh in gaps.values() for place in fresh}
        gaps_c, places_c, gaps_r, places_r = copy.deepcopy(gaps), set(places), copy.deepcopy(gaps), set(places)
        layout_items = state_c[1]
        assert compiled.refresh_gap_places(memory, stale, starts, layout_items, *sections, gaps_c, places_c) == \
            reference.refresh_gap_places(memory, stale, starts, layout_items, *sections, gaps_r, places_r)
        assert (gaps_c, places_c) == (gaps_r, places_r)
        # the round settled: raw items cut or not, decodes of old and current items, some scanned already
        changed = [(rva, rng.choice((None, (rva, ((rva, rva + 3),))))) for rva in rng.sample(starts, len(starts) // 2)]
        todo = [layout_items[rva] for rva, _ in changed if rva not in pdata]
        reached = [rng.choice((item, (item[0], ((item[0], item[0] + 1),)))) for item in todo]
        decoded = {item: _random_analysis(rng, memory, item[0], item[0] + 1)
                   for item in rng.sample([*layout_items.values(), *(b for _, b in changed if b)], len(changed) // 2)}
        state_c = (copy.deepcopy(layout_items), set(), dict(decoded))
        state_r = (copy.deepcopy(layout_items), set(), dict(decoded))
        current, missing = compiled.settle_round(changed, todo, reached, *state_c)
        assert (current, missing) == reference.settle_round(changed, todo, reached, *state_r)
        assert state_c == state_r
        decoded = state_c[2]
        decoded.update((item, _random_analysis(rng, memory, item[0], item[0] + 1)) for item in missing)
        scanned = set(rng.sample(current, len(current) // 3))
        scanned_r = set(scanned)
        assert compiled.fresh_refs(current, decoded, scanned) == reference.fresh_refs(current, decoded, scanned_r)
        assert scanned == scanned_r == scanned | set(current)
        # sources marked, the new ones pending
        sources = {rva: rng.randrange(1, 8) for rva in rng.sample(starts, len(starts) // 2)}
        rvas = [rng.choice(starts) for _ in range(rng.randrange(0, 20))]
        state_c, state_r = (dict(sources), []), (dict(sources), [])
        bit = 1 << rng.randrange(11)
        assert compiled.add_sources(rvas, bit, *state_c) == reference.add_sources(rvas, bit, *state_r)
        assert state_c == state_r
        runtimes = list(pdata.values())
        assert compiled.owned_spans(runtimes, pdata) == reference.owned_spans(runtimes, pdata)
        # the final layout: .pdata items kept, the others trimmed of the fill after their last instruction
        final = {rva: (rva, ((rva, pdata[rva].end_rva),)) if rva in pdata else
                 (rva, ((rva, rng.randrange(rva + 1, size + 1)),)) for rva in starts}
        decoded = {item: _random_analysis(rng, memory, item[0], item[1][0][1]) for item in final.values()}
        decoded_r = dict(decoded)
        assert compiled.trimmed_layout(memory, starts, final, pdata, decoded) == \
            reference.trimmed_layout(memory, starts, final, pdata, decoded_r)
        assert decoded == decoded_r


def _with_kernels(image: Image, kernels: Any, monkeypatch: pytest.MonkeyPatch) -> functions.FunctionTable:
    with monkeypatch.context() as patch:
        patch.setattr(functions, "_kernels", lambda core: kernels)
        return functions.discover(image)


def _same_discovery(image: Image, monkeypatch: pytest.MonkeyPatch) -> int:
    """Discovery with the compiled core and either set of round kernels: the same functions, field for field
    (fingerprints included), and the same analyses' instructions."""
    table_c = _with_kernels(image, compiled, monkeypatch)
    table_r = _with_kernels(image, reference, monkeypatch)
    assert table_c.functions == table_r.functions
    assert [a.insn_rvas for a in table_c.analyses] == [a.insn_rvas for a in table_r.analyses]
    return len(table_c)


def test_discovery_with_either_kernels_is_the_same_on_every_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    images = sorted(FIXTURES.glob("*/*.dll"))
    assert len(images) > 40
    assert sum(_same_discovery(Image.load_fast(str(path)), monkeypatch) for path in images) > 1000


@pytest.mark.realbins
def test_discovery_with_either_kernels_is_the_same_on_a_real_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    # MSVC's pyzmq: functions without .pdata found by every source, cut short and trimmed
    image = Image.load_fast(str(real_binary("pyzmq", "26.0.2", "zmq/backend/cython/_zmq.*.pyd")))
    assert _same_discovery(image, monkeypatch) > 2000
