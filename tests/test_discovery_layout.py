"""Discovery's incremental layout: after any sequence of insertions and bounds, its items and its gaps'
places are what a layout built from scratch over the same starts gives (``_discovery.gap_starts``)."""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass

from hotpatch.analysis import _discovery as compiled
from hotpatch.analysis import _discovery_reference as reference
from hotpatch.analysis.layout import Item, Layout

from .support.discovery import padding_soup


@dataclass(frozen=True)
class _Section:
    rva: int
    end_rva: int
    virtual_size: int


@dataclass(frozen=True)
class _Runtime:
    end_rva: int
    fragments: tuple[tuple[int, int], ...] = ()


def _scratch_items(starts: list[int], sections: list[_Section], pdata: dict[int, _Runtime]) -> dict[int, Item]:
    """Each start's raw item, the way discovery laid functions out before it kept a layout."""
    out = {}
    for index, rva in enumerate(starts):
        if rva in pdata:
            out[rva] = (rva, ((rva, pdata[rva].end_rva),) + pdata[rva].fragments)
            continue
        section = next(s for s in sections if s.rva <= rva < s.end_rva)
        limit = min(section.rva + section.virtual_size if section.virtual_size else section.end_rva,
                    section.end_rva)
        if index + 1 < len(starts):
            limit = min(limit, starts[index + 1])
        out[rva] = (rva, ((rva, limit),))
    return out


def _scratch_places(memory: bytes, items: list[Item], sections: list[_Section]) -> set[int]:
    return compiled.gap_starts(memory, array("I", (i[0] for i in items)), array("I", (i[1][0][1] for i in items)),
                               array("I", (s.rva for s in sections)), array("I", (s.end_rva for s in sections)))


def test_incremental_layout_equals_a_layout_from_scratch_after_random_insertions() -> None:
    rng = random.Random(12)
    twice = random.Random(5)
    for trial in range(40):
        size = rng.randrange(600, 4000)
        memory = padding_soup(rng, size)
        cut = rng.randrange(200, size - 200)
        # two code sections with a hole between them; the second's virtual size may end before its raw end
        sections = [_Section(16, cut, 0), _Section(cut + 32, size, rng.choice((0, size - cut - 40)))]

        def code_section(rva: int, sections: list[_Section] = sections) -> _Section | None:
            return next((s for s in sections if s.rva <= rva < s.end_rva), None)

        pdata = {}
        for rva in rng.sample(range(16, size - 8), 6):
            if code_section(rva) is not None:
                pdata[rva] = _Runtime(rva + rng.randrange(1, 60),
                                      ((rva + 80, rva + 90),) if rng.random() < 0.3 else ())
        layout = Layout(sections, pdata)
        known: set[int] = set()
        bounds: dict[Item, Item] = {}
        known_places: set[int] = set()  # the places at the previous call
        kernels = compiled if trial % 2 else reference
        for round_ in range(rng.randrange(1, 12)):
            new = {rva for rva in rng.sample(range(0, size), rng.randrange(0, 40)) if code_section(rva)}
            if round_ == 0:
                new |= pdata.keys()
            items_before, raw_before = dict(layout.items), dict(layout.raw)
            # unordered, some twice, some known already: as discovery's rounds hand them over
            changed = layout.insert([*new, *rng.sample(sorted(new), len(new) // 2)], kernels)
            known |= new
            starts = sorted(known)
            scratch = _scratch_items(starts, sections, pdata)
            # exactly the starts whose raw item is new or changed, in order, each with its item before
            assert [rva for rva, _ in changed] == [rva for rva in starts if raw_before.get(rva) != scratch[rva]]
            assert all(before == items_before.get(rva) for rva, before in changed)
            assert layout.raw == scratch and layout.starts == starts
            # bound some changed functions: cut anywhere inside their raw range
            for rva, _ in changed:
                raw = layout.raw[rva]
                if rva not in pdata and raw[1][0][1] > rva and rng.random() < 0.6:
                    begin, limit = raw[1][0]
                    bounds[raw] = (rva, ((begin, rng.randrange(begin + 1, limit + 1)),))
                    layout.bound(rva, bounds[raw])
            expected = [bounds.get(scratch[rva], scratch[rva]) if rva not in pdata else scratch[rva]
                        for rva in starts]
            assert layout.ordered() == expected
            if rng.random() < 0.7:  # places are asked for in some rounds only
                # sometimes ask twice in a row (the second call adds nothing new); a separate generator keeps
                # the layouts drawn the same as before this check came
                before = set(layout.places(memory, kernels)) if twice.random() < 0.3 else known_places
                known_places = set(layout.places(memory, kernels))
                assert known_places == _scratch_places(memory, expected, sections)
                # every place that came since the previous call is new, and every new one is a place
                assert known_places - before <= set(layout.new_places) <= known_places
        assert layout.places(memory, kernels) == _scratch_places(memory, layout.ordered(), sections)
        for rva in rng.sample(range(0, size), 30):
            index = max((i for i, s in enumerate(layout.starts) if s <= rva), default=None)
            assert layout.at_or_before(rva) == (None if index is None else layout.items[layout.starts[index]])
            assert layout.following(rva) == next((s for s in layout.starts if s > rva), None)


def test_word_index_names_what_named_names() -> None:
    rng = random.Random(4)
    for _ in range(40):
        top = rng.randrange(1, 7000)
        words = [array("I", (rng.randrange(9000) for _ in range(rng.randrange(0, 500)))) for _ in range(5)]
        places = {rng.randrange(top) for _ in range(rng.randrange(0, 400))}
        expected = reference.named(places, words)
        assert compiled.named_in(places, compiled.word_index(words, top)) == expected
        assert reference.named_in(places, reference.word_index(words, top)) == expected
    assert compiled.named_in({0, 5}, compiled.word_index([], 0)) == set()
