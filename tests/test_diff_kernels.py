"""The diff kernels: compiled (hotpatch.diff._diffcore) and reference (_diffreference) agree."""

from __future__ import annotations

import random
import struct
from array import array
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from hotpatch.analysis._reflist import _reflist

from hotpatch import Image, discover
from hotpatch.analysis import _reference as reference_analysis
from hotpatch.analysis.api import diff_kernels
from hotpatch.diff import _diffcore as compiled
from hotpatch.diff import _diffreference as reference
from hotpatch.diff.compare import diff
from hotpatch.diff.matching import MAX_RATIO_WORK, SIMILARITY_THRESHOLD, _pointer_tables
from hotpatch.diff.pairing import Pairing
from hotpatch.verdict.rules import decide
from tests.support.realbins import real_binary


def test_compiled_kernels_go_with_the_compiled_core() -> None:
    assert diff_kernels().IMPLEMENTATION == "cython"
    assert diff_kernels(reference_analysis).IMPLEMENTATION == "python"


def _edited(rng: random.Random, a: list[int], alphabet: int) -> list[int]:
    b = list(a)
    for _ in range(rng.randint(0, 8)):
        roll = rng.random()
        if roll < 0.3 and b:
            del b[rng.randrange(len(b))]
        elif roll < 0.6:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(alphabet))
        elif b:
            b[rng.randrange(len(b))] = rng.randrange(alphabet)
    return b


def test_kernels_agree_on_random_streams() -> None:
    rng = random.Random(20261127)
    for _ in range(4000):
        alphabet = rng.choice([2, 3, 5, 20, 500])
        a = [rng.randrange(alphabet) for _ in range(rng.randint(0, 80))]
        b = _edited(rng, a, alphabet) if rng.random() < 0.6 else [rng.randrange(alphabet)
                                                                   for _ in range(rng.randint(0, 80))]
        a_ids, b_ids = array("I", a), array("I", b)
        assert compiled.aligned_indices(a_ids, b_ids) == reference.aligned_indices(a_ids, b_ids), (a, b)
        assert compiled.aligned_packed(a_ids, b_ids) == reference.aligned_packed(a_ids, b_ids), (a, b)
        for threshold, work in ((0.0, 10**6), (SIMILARITY_THRESHOLD, 10**6), (0.0, 100)):
            assert compiled.similarity(a_ids, b_ids, threshold, work) == \
                reference.similarity(a_ids, b_ids, threshold, work), (a, b, threshold, work)


@pytest.fixture(scope="module")
def rust_diff():  # type: ignore[no-untyped-def]
    return diff(real_binary("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd"),
                real_binary("cryptography", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd"))


def test_kernels_agree_on_a_real_pair(rust_diff) -> None:  # type: ignore[no-untyped-def]
    """Tokens of every function, and the alignment and score of every changed pair, of _rust.pyd 43.0.0 -> 43.0.1."""
    result = rust_diff
    fast_intern: dict[bytes, int] = {}
    slow_intern: dict[bytes, int] = {}

    def tokens(table, function, kernels, intern):  # type: ignore[no-untyped-def]
        analysis = table.analysis_of(function)
        return kernels.token_ids(table.image.memory, analysis.insn_rvas, function.end_rva, analysis.raw_refs, intern)

    pairs = 0
    for entry in result.functions:
        if entry.status != "changed" or "code" not in entry.changes:
            continue
        fast = [tokens(t, f, compiled, fast_intern) for t, f in ((result.baseline, entry.baseline),
                                                                  (result.patched, entry.patched))]
        slow = [tokens(t, f, reference, slow_intern) for t, f in ((result.baseline, entry.baseline),
                                                                  (result.patched, entry.patched))]
        assert fast == slow
        assert compiled.aligned_indices(*fast) == reference.aligned_indices(*slow)
        aligned = compiled.aligned_packed(*fast)
        refs = [t.analysis_of(f) for t, f in ((result.baseline, entry.baseline), (result.patched, entry.patched))]
        assert compiled.ref_pairs(refs[0].raw_refs, refs[1].raw_refs, refs[0].insn_rvas, refs[1].insn_rvas,
                                  aligned) == reference.ref_pairs(refs[0].raw_refs.tolist(), refs[1].raw_refs.tolist(),
                                                                  refs[0].insn_rvas, refs[1].insn_rvas, aligned)
        assert compiled.similarity(*fast, 0.0, MAX_RATIO_WORK) == reference.similarity(*slow, 0.0, MAX_RATIO_WORK)
        pairs += 1
    assert pairs > 1000


def test_reference_scans_agree_on_a_real_pair(rust_diff) -> None:  # type: ignore[no-untyped-def]
    """Callees of every function and the triage of every matched pair of _rust.pyd 43.0.0 -> 43.0.1."""
    result = rust_diff
    table = result.baseline
    starts = {f.rva for f in table}
    pointer_tables = _pointer_tables(table, starts)
    for function, analysis in zip(table.functions, table.analyses):
        args = (function.ranges, starts, pointer_tables)
        expected = reference.callees(analysis.raw_refs.tolist(), *args)
        assert compiled.callees(analysis.raw_refs, *args) == expected, hex(function.rva)
        assert compiled.callees(analysis.raw_refs.tolist(), *args) == expected, hex(function.rva)
    graphs = []
    for kernels, refs_lists in ((compiled, [a.raw_refs for a in table.analyses]),
                                (reference, [a.raw_refs.tolist() for a in table.analyses])):
        callees_out: dict[int, list[int]] = {}
        callers_out: defaultdict[int, list[int]] = defaultdict(list)
        kernels.call_graph(refs_lists, [f.ranges for f in table.functions], [f.rva for f in table], starts,
                           pointer_tables, callees_out, callers_out)
        graphs.append((callees_out, dict(callers_out)))
    assert graphs[0] == graphs[1] and sum(map(len, graphs[0][1].values())) > 10000
    image = table.image
    code_spans = tuple(sorted((section.rva, section.end_rva) for section in image.executable_sections))
    tables = compiled.pointer_tables(image.memory, image.relocations, image.image_base, code_spans, starts)
    assert len(tables) > 100 and tables == reference.pointer_tables(image.memory, image.relocations,
                                                                    image.image_base, code_spans, starts)
    pairing = Pairing(result.baseline, result.patched, result.function_map, result.streams)
    image = table.image
    relocated = compiled.relocated_data(image.memory, image.relocations, image.image_base, pairing.targets_a.sections)
    assert len(relocated) > 1000 and relocated == reference.relocated_data(
        image.memory, image.relocations, image.image_base, pairing.targets_a.sections)
    data_a, data_b = pairing.targets_a.all_data_targets(), pairing.targets_b.all_data_targets()
    checked = 0
    for entry in result.functions:
        if entry.baseline is None or entry.patched is None:
            continue
        refs_a = table.analysis_of(entry.baseline).raw_refs
        refs_b = result.patched.analysis_of(entry.patched).raw_refs
        args = (pairing.ref_pairs(entry.baseline, entry.patched), entry.baseline.ranges, entry.patched.ranges,
                table.context.iat, result.patched.context.iat, result.function_map, data_a, data_b)
        expected = reference.triage_refs(refs_a.tolist(), refs_b.tolist(), *args)
        assert compiled.triage_refs(refs_a, refs_b, *args) == expected, entry.name  # records read in place
        assert compiled.triage_refs(refs_a.tolist(), refs_b.tolist(), *args) == expected, entry.name
        checked += 1
    assert checked > 15000


def _comparable(result) -> tuple:  # type: ignore[no-untyped-def]
    functions = [(f.status, f.baseline and f.baseline.rva, f.patched and f.patched.rva, f.match, f.similarity,
                  f.changes) for f in result.functions]
    return functions, [d.to_json() for d in result.data], decide(result).to_json(), sorted(result.data_map.items())


@pytest.mark.parametrize("stripped", [False, True], ids=["symbols", "stripped"])
def test_reference_diff_equals_compiled_diff_on_every_case(built_fixtures: Path, stripped: bool) -> None:
    suffix = "-stripped.dll" if stripped else ".dll"
    cases = sorted(p for p in built_fixtures.iterdir() if (p / f"baseline{suffix}").is_file())
    assert len(cases) >= 20
    for case in cases:
        images = [Image.load(case / f"{side}{suffix}") for side in ("baseline", "patched")]
        fast = diff(discover(images[0]), discover(images[1]))
        slow = diff(discover(images[0], impl=reference_analysis), discover(images[1], impl=reference_analysis))
        assert fast.streams.kernels is compiled and slow.streams.kernels is reference
        assert _comparable(fast) == _comparable(slow), case.name


def _random_refs(rng: random.Random, count: int, targets: list[int]) -> list[tuple[int, int, int, int, int]]:
    """References in instruction order, as the decoder gives them: (kind, insn_rva, offset, size, target)."""
    refs, insn = [], 0x1000
    for _ in range(count):
        insn += rng.choice([0, 2, 5, 7])
        size = rng.choice([0, 1, 4, 8])
        refs.append((rng.randint(1, 9), insn, rng.randint(0, 6), size, rng.choice(targets)))
    return refs


def _packed(refs: list[tuple[int, int, int, int, int]]):  # type: ignore[no-untyped-def]
    """The RefList of ``refs``, as the compiled decoder packs them (targets outside int64 kept apart)."""
    wide = {i: ref[4] for i, ref in enumerate(refs) if not -2**63 <= ref[4] < 2**63}
    packed = b"".join(struct.pack("<qIBBB", 0 if i in wide else ref[4], ref[1], ref[0], ref[2], ref[3])
                      for i, ref in enumerate(refs))
    return _reflist(packed, wide or None)


def test_reference_scans_agree_on_random_records() -> None:
    """callees, token_ids, ref_targets, targets_within, lists_reaching, triage_refs, ref_pairs and lone_pair: the
    compiled kernels on packed records and on tuples give the twin's answer (equal and changed code, inner targets,
    import slots, wide targets, references of one instruction apart)."""
    rng = random.Random(20261202)
    for _ in range(1500):
        targets = [rng.randrange(0x1000, 0x1400) for _ in range(rng.randint(1, 30))] + [-5, 2**64 - 3]
        refs_a = _random_refs(rng, rng.randint(0, 40), targets)
        refs_b = [(k, i, o, s, rng.choice(targets) if rng.random() < 0.3 else t) for k, i, o, s, t in refs_a]
        if rng.random() < 0.2:
            refs_b = refs_b[:rng.randint(0, len(refs_b))]
        if rng.random() < 0.5:  # the usual case: no target outside int64
            refs_a = [r for r in refs_a if r[4] < 2**63]
            refs_b = [r for r in refs_b if r[4] < 2**63]
        ranges_a = ((0x1000, 0x1100),) + (((0x1300, 0x1340),) if rng.random() < 0.5 else ())
        ranges_b = ((0x1010, 0x1120),) + (((0x1300, 0x1350),) if rng.random() < 0.5 else ())
        starts = set(rng.sample(targets, min(len(targets), 8)))
        pointer_tables = {t: [rng.randrange(0x1000, 0x1400)] for t in rng.sample(targets, 2)}
        iat_a = {t: b"k!f" for t in rng.sample(targets, 2)}
        iat_b = {t: b"k!f" for t in rng.sample(targets, 2)}
        function_map = {t: rng.choice(targets) for t in rng.sample(targets, min(len(targets), 6))}
        data_a, data_b = frozenset(rng.sample(targets, 3)), frozenset(rng.sample(targets, 3))
        pairs = None if rng.random() < 0.5 else list(zip(refs_a, refs_b))
        for refs in (refs_a, refs_b):
            for form in (refs, _packed(refs)):
                assert compiled.callees(form, ranges_a, starts, pointer_tables) == \
                    reference.callees(refs, ranges_a, starts, pointer_tables)
                assert compiled.token_ids(bytes(range(256)) * 32, array("I", sorted({r[1] for r in refs})), 0x1500,
                                          form, {}) == reference.token_ids(
                    bytes(range(256)) * 32, array("I", sorted({r[1] for r in refs})), 0x1500, refs, {})
        assert compiled.ref_targets([_packed(refs_a), refs_b]) == reference.ref_targets([refs_a, refs_b])
        spans = ((0x1000, 0x1080), (0x1200, 0x1201), (0x1380, 2**40))[:rng.randint(0, 3)]
        assert compiled.targets_within([_packed(refs_a), refs_b, _packed(refs_b)], spans) == \
            reference.targets_within([refs_a, refs_b, refs_b], spans)
        wanted = set(rng.sample(targets, rng.randint(0, min(3, len(targets)))))  # -5 and wide ones too, at times
        assert compiled.lists_reaching([_packed(refs_a), refs_b, _packed(refs_b), []], wanted) == \
            reference.lists_reaching([refs_a, refs_b, refs_b, []], wanted)
        args = (pairs, ranges_a, ranges_b, iat_a, iat_b, function_map, data_a, data_b)
        expected = reference.triage_refs(refs_a, refs_b, *args)
        assert compiled.triage_refs(refs_a, refs_b, *args) == expected
        assert compiled.triage_refs(_packed(refs_a), _packed(refs_b), *args) == expected
        insns_a = array("I", sorted({r[1] for r in refs_a} | {rng.randrange(0x1000, 0x1200) for _ in range(5)}))
        insns_b = array("I", sorted({r[1] for r in refs_b} | {rng.randrange(0x1000, 0x1200) for _ in range(5)}))
        aligned = array("I", [x for i in range(min(len(insns_a), len(insns_b))) if rng.random() < 0.7
                              for x in (i, min(len(insns_b) - 1, i + rng.randint(0, 2)))])
        shuffled_a = refs_a[:]  # references of one instruction need not be adjacent for the kernels
        rng.shuffle(shuffled_a)
        for left_refs in (refs_a, shuffled_a):
            expected = reference.ref_pairs(left_refs, refs_b, insns_a, insns_b, aligned)
            assert compiled.ref_pairs(left_refs, refs_b, insns_a, insns_b, aligned) == expected
            assert compiled.ref_pairs(_packed(left_refs), _packed(refs_b), insns_a, insns_b, aligned) == expected
        left, right = rng.choices(targets, k=rng.randint(0, 5)), rng.choices(targets, k=rng.randint(0, 5))
        taken_left, taken_right = dict.fromkeys(rng.sample(targets, 3)), dict.fromkeys(rng.sample(targets, 3))
        assert compiled.lone_pair(taken_left, taken_right, left, right) == \
            reference.lone_pair(taken_left, taken_right, left, right)


def test_verdict_scans_agree_on_random_records() -> None:
    """branch_targets_between and unsupported_refs: the compiled kernels on packed records and on tuples give
    the twin's answer (targets inside the function and its fragments, in a section or past them, import slots,
    zero, negative and wide targets; rel8 branches of short and long functions)."""
    rng = random.Random(20261203)
    found = {0: 0, 1: 0}
    for _ in range(1500):
        targets = [rng.randrange(0x0F00, 0x1600) for _ in range(rng.randint(1, 30))] + [0, -5, 2**64 - 3]
        refs = _random_refs(rng, rng.randint(0, 40), targets)
        if rng.random() < 0.5:
            refs = [r for r in refs if r[4] < 2**63]
        ranges = ((0x1000, 0x1100),) + (((0x1300, 0x1340),) if rng.random() < 0.5 else ())
        bounds = sorted(rng.sample(range(0x0F00, 0x1600, 0x20), 2 * rng.randint(0, 3)))
        sections = tuple((bounds[k], bounds[k + 1], rng.randint(0, 1)) for k in range(0, len(bounds), 2))
        iat = {t: b"k!f" for t in rng.sample(targets, 2)}
        low = rng.choice([0x1000, 0x1040, 0x10F0])
        high = rng.choice([low, low + 1, low + 14, 0x1100, 2**62])
        for rel8_leaves in (False, True):
            expected = reference.unsupported_refs(refs, ranges, rel8_leaves, sections, iat)
            for why, _, _ in expected:
                found[why] += 1
            for form in (refs, _packed(refs)):
                assert compiled.unsupported_refs(form, ranges, rel8_leaves, sections, iat) == expected
        expected_targets = reference.branch_targets_between(refs, low, high)
        for form in (refs, _packed(refs)):
            assert compiled.branch_targets_between(form, low, high) == expected_targets
    assert found[0] > 100 and found[1] > 100  # both kinds of reason came up


def _random_graph(rng: random.Random, size: int, side: int) -> tuple[dict[int, list[int]], defaultdict[int, list[int]]]:
    """Callees and callers of ``size`` functions numbered from ``side``, as ``matching.call_graph`` keeps them."""
    callees = {side + f: [side + rng.randrange(size) for _ in range(rng.randint(0, 4))]
               for f in range(size) if rng.random() < 0.8}
    callers: defaultdict[int, list[int]] = defaultdict(list)
    for caller, out in callees.items():
        for target in dict.fromkeys(out):
            callers[target].append(caller)
    return callees, callers


def _propagated(kernels, seeds: list[tuple[int, int]], graphs: tuple, seed: int) -> tuple:  # type: ignore[no-untyped-def]
    """The pairs ``propagate`` offers, in order, and the matches it ends with (a tenth of the offers refused)."""
    forward: dict[int, int] = dict(seeds)
    backward = {b: a for a, b in seeds}
    offers: list[tuple[int, int]] = []
    refusals = random.Random(seed)

    def aligned(left: list[int], right: list[int]) -> list[tuple[int, int]]:
        return [(x, y) for x, y in zip(left, right) if x not in forward and y not in backward]

    def pair(x: int, y: int) -> bool:
        offers.append((x, y))
        if x in forward or y in backward or refusals.random() < 0.1:
            return False
        forward[x], backward[y] = y, x
        return True

    (callees_a, callers_a), (callees_b, callers_b) = graphs
    kernels.propagate(list(seeds), forward, backward, callees_a, callees_b, callers_a, callers_b, aligned, pair)
    return offers, forward


def test_propagation_agrees_on_random_call_graphs() -> None:
    """propagate: the compiled kernel and the twin make the same pairs in the same order from random call
    graphs, through the same callbacks (the aligned callees and the pairing stay the matcher's)."""
    rng = random.Random(20261203)
    paired = 0
    for round_ in range(300):
        size = rng.randint(1, 40)
        graphs = (_random_graph(rng, size, 0), _random_graph(rng, size, 1000))
        seeds = [(f, 1000 + f) for f in rng.sample(range(size), rng.randint(1, min(size, 3)))]
        fast = _propagated(compiled, seeds, graphs, round_)
        assert fast == _propagated(reference, seeds, graphs, round_)
        paired += len(fast[1]) - len(seeds)
    assert paired > 500


def _twins_paired(kernels, graphs: tuple, mapping: dict[int, int], groups: list, limit: int) -> list:  # type: ignore[no-untyped-def]
    """The pairs ``twins_by_neighbours`` offers, in order (each one taken: later groups see it)."""
    mapping, offers = dict(mapping), []

    def pair(x: int, y: int) -> bool:
        offers.append((x, y))
        mapping[x] = y
        return True

    (callees_a, callers_a), (callees_b, callers_b) = graphs
    kernels.twins_by_neighbours(groups, mapping, callees_a, callers_a, callees_b, callers_b, limit, pair)
    return offers


def test_twins_by_neighbours_agrees_on_random_call_graphs() -> None:
    """twins_by_neighbours: the compiled kernel and the twin pair the same twins in the same order, with
    ties (no evidence), groups past the scoring limit, neighbours matched by an earlier group's pairs, and
    patched graphs that copy the baseline's with a few edges moved."""
    rng = random.Random(20261210)
    paired = 0
    for _ in range(400):
        size = rng.randint(2, 40)
        callees_a, callers_a = _random_graph(rng, size, 0)
        callees_b: dict[int, list[int]] = {1000 + f: [1000 + (g if rng.random() < 0.9 else rng.randrange(size))
                                                      for g in out] for f, out in callees_a.items()}
        callers_b: defaultdict[int, list[int]] = defaultdict(list)
        for caller, out in callees_b.items():
            for target in dict.fromkeys(out):
                callers_b[target].append(caller)
        matched = rng.sample(range(size), rng.randint(0, size))
        mapping = {f: 1000 + f for f in matched}
        free = [f for f in range(size) if f not in mapping]
        rng.shuffle(free)
        groups = []
        while free:
            take = free[:rng.randint(1, 6)]
            free = free[len(take):]
            right = sorted(1000 + f for f in take if rng.random() < 0.9) or [1000 + take[0]]
            groups.append((sorted(take), right))
        graphs = ((callees_a, callers_a), (callees_b, callers_b))
        limit = rng.choice([4, 16, 4096])
        fast = _twins_paired(compiled, graphs, mapping, groups, limit)
        assert fast == _twins_paired(reference, graphs, mapping, groups, limit)
        paired += len(fast)
    assert paired > 500


def _two_passes(kernels, seeds: list[tuple[int, int]], graphs: tuple, seed: int,  # type: ignore[no-untyped-def]
                settled: set[int] | None) -> tuple:
    """The offers, matches and settled pairs of two full propagation passes (the second over every pair
    made, as the matcher runs after more pairs were made; three tenths of the offers refused)."""
    forward, backward, offers = dict(seeds), {b: a for a, b in seeds}, []
    refusals = random.Random(seed)

    def aligned(left: list[int], right: list[int]) -> list[tuple[int, int]]:
        return [(x, y) for x, y in zip(left, right) if x not in forward and y not in backward]

    def pair(x: int, y: int) -> bool:
        offers.append((x, y))
        if x in forward or y in backward or refusals.random() < 0.3:
            return False
        forward[x], backward[y] = y, x
        return True

    (callees_a, callers_a), (callees_b, callers_b) = graphs
    for _ in range(2):  # the refusals leave work for the second pass
        kernels.propagate(list(forward.items()), forward, backward, callees_a, callees_b, callers_a, callers_b,
                          aligned, pair, settled)
    return offers, forward, settled


def test_settled_pairs_change_no_later_pass() -> None:
    """propagate with a ``settled`` set: a second full pass over every pair (as the matcher runs after more
    pairs were made) offers what a pass without it offers, in the same order, and skips the settled ones;
    the kernel and the twin settle the same pairs."""
    rng = random.Random(20261209)
    skipped = offered = 0
    for round_ in range(300):
        size = rng.randint(1, 40)
        graphs = (_random_graph(rng, size, 0), _random_graph(rng, size, 1000))
        seeds = [(f, 1000 + f) for f in rng.sample(range(size), rng.randint(1, min(size, 3)))]
        runs = [_two_passes(kernels, seeds, graphs, round_, settled)
                for kernels, settled in ((compiled, set()), (reference, set()), (compiled, None))]
        (fast, slow, plain) = runs
        assert fast == slow and fast[:2] == plain[:2]
        skipped += len(fast[2])
        offered += len(fast[0])
    assert skipped > 300 and offered > 500


def test_equal_replacements_agree_with_align_opcodes() -> None:
    """equal_replacements: the compiled kernel gives the twin's replacements (align.opcodes' equal-length
    "replace" runs) on random callee lists with anchors and unique placeholders, shared prefixes and
    suffixes, one side empty, and a middle past MAX_MIDDLE_WORK."""
    rng = random.Random(20261204)
    found = 0
    for _ in range(3000):
        alphabet = rng.randint(1, 12)
        a = [rng.randrange(alphabet) for _ in range(rng.randint(0, 25))]
        b = [x if rng.random() < 0.6 else rng.randrange(alphabet) for x in a]
        if rng.random() < 0.5:
            b = b[:rng.randint(0, len(b))] + [rng.randrange(alphabet) for _ in range(rng.randint(0, 5))]
        left = [x if rng.random() < 0.7 else ("a", i) for i, x in enumerate(a)]
        right = [y if rng.random() < 0.7 else ("b", j) for j, y in enumerate(b)]
        expected = reference.equal_replacements(left, right)
        assert compiled.equal_replacements(left, right) == expected, (left, right)
        found += len(expected)
    assert found > 1000
    wide = [("a", i) for i in range(2001)]  # 2001 * 2001 comparisons: one replacement, unaligned
    assert compiled.equal_replacements([1, *wide, 2], [1, *range(5000, 7001), 2]) == [(1, 2002, 1, 2002)] == \
        reference.equal_replacements([1, *wide, 2], [1, *range(5000, 7001), 2])


def test_aligned_callees_agree_on_random_callee_lists() -> None:
    """aligned_callees: the compiled kernel gives the twin's pairs on random callee lists with repeats, callees
    matched to each other, to another one's counterpart or not at all, one side all matched or empty, a lone
    unmatched callee on each side, and a middle past MAX_MIDDLE_WORK."""
    rng = random.Random(20261211)
    found = 0
    for _ in range(3000):
        size = rng.randint(1, 12)
        mapping = {x: 100 + (x if rng.random() < 0.8 else rng.randrange(size)) for x in range(size)
                   if rng.random() < 0.6}
        backward = {y: x for x, y in mapping.items()}
        left = [rng.randrange(size) for _ in range(rng.randint(0, 20))]
        right = [100 + (x if rng.random() < 0.7 else rng.randrange(size)) for x in left]
        if rng.random() < 0.5:
            right = right[:rng.randint(0, len(right))] + [100 + rng.randrange(size) for _ in range(rng.randint(0, 4))]
        expected = reference.aligned_callees(mapping, backward, left, right)
        assert compiled.aligned_callees(mapping, backward, left, right) == expected, (mapping, left, right)
        found += len(expected)
    assert found > 1000
    wide, other = list(range(3000, 5001)), list(range(7000, 9001))  # 2001 * 2001 comparisons: paired in order
    assert compiled.aligned_callees({1: 2}, {2: 1}, [1, *wide, 1], [2, *other, 2]) == \
        reference.aligned_callees({1: 2}, {2: 1}, [1, *wide, 1], [2, *other, 2])


def test_triage_block_agrees_with_triage_refs_pair_by_pair() -> None:
    """triage_block: one compiled call over a block of baseline functions gives, function by function, the
    twin's answer: the mark where a function has no counterpart or another fingerprint, else None exactly
    where triage_refs finds nothing left (packed records and tuples), with or without the function map kept
    in C (rva_map), from the block's start to its stop alone."""
    rng = random.Random(20261205)
    functions_a: list[SimpleNamespace] = []
    functions_b: list[SimpleNamespace] = []
    analyses_a: list[SimpleNamespace] = []
    analyses_b: list[SimpleNamespace] = []
    for index in range(400):
        targets = [rng.randrange(0x1000, 0x1400) for _ in range(rng.randint(1, 20))]
        refs_a = _random_refs(rng, rng.randint(0, 12), targets)
        refs_b = [(k, i, o, s, rng.choice(targets) if rng.random() < 0.1 else t) for k, i, o, s, t in refs_a]
        packed = rng.random() < 0.5
        analyses_a.append(SimpleNamespace(raw_refs=_packed(refs_a) if packed else refs_a))
        analyses_b.append(SimpleNamespace(raw_refs=_packed(refs_b) if packed else refs_b))
        fingerprint = f"f{index}"
        functions_a.append(SimpleNamespace(fingerprint=fingerprint, ranges=((0x1000, 0x1100),) + (
            ((0x1300, 0x1340),) if rng.random() < 0.5 else ())))
        functions_b.append(SimpleNamespace(fingerprint=fingerprint if rng.random() < 0.8 else "other",
                                           ranges=((0x1010, 0x1120),)))
    # the patched side shuffled, as a table's order is its own; some baseline functions have no counterpart
    order = list(range(400))
    rng.shuffle(order)
    functions_b = [functions_b[i] for i in order]
    analyses_b = [analyses_b[i] for i in order]
    at_b = [order.index(i) if rng.random() < 0.9 else -1 for i in range(400)]
    iat_a, iat_b = {0x1390: b"k!f"}, {0x1391: b"k!f"}
    function_map = {t: t + rng.choice([0, 0, 0, 1]) for t in range(0x1100, 0x1400, 3)}
    data_a, data_b = frozenset(range(0x1200, 0x1280)), frozenset(range(0x1200, 0x1290))
    function_map[2**64 - 3] = 0x1200  # outside int64: left to the dict by the map kept in C
    mark = object()
    sides = (functions_a, analyses_a, functions_b, analyses_b, at_b)
    rest = (iat_a, iat_b, function_map, data_a, data_b)
    expected = reference.triage_block(*sides, 0, 400, *rest, None, mark)
    assert compiled.triage_block(*sides, 0, 400, *rest, None, mark) == expected
    assert compiled.triage_block(*sides, 0, 400, *rest, compiled.rva_map(function_map), mark) == expected
    assert reference.triage_block(*sides, 0, 400, *rest, reference.rva_map(function_map), mark) == expected
    assert compiled.triage_block(*sides, 150, 230, *rest, None, mark) == expected[150:230]
    for index, found in enumerate(expected):
        at = at_b[index]
        if at < 0 or functions_a[index].fingerprint != functions_b[at].fingerprint:
            assert found is mark
            continue
        triaged = reference.triage_refs(list(analyses_a[index].raw_refs), list(analyses_b[at].raw_refs), None,
                                        functions_a[index].ranges, functions_b[at].ranges, *rest)
        assert found == (None if triaged == ([], []) else triaged)
    assert 30 < expected.count(None) < len(expected) - 50 and 40 < expected.count(mark) < 150


def test_triage_block_agrees_on_a_real_pair(rust_diff) -> None:  # type: ignore[no-untyped-def]
    """triage_block over every baseline function of _rust.pyd 43.0.0 -> 43.0.1, in blocks as the diff asks."""
    result = rust_diff
    a, b = result.baseline, result.patched
    at_b = [-1 if entry is None else b._index[entry] for entry in map(result.function_map.get, a._starts)]
    pairing = Pairing(a, b, result.function_map, result.streams)
    rest = (a.context.iat, b.context.iat, result.function_map, pairing.targets_a.all_data_targets(),
            pairing.targets_b.all_data_targets())
    slow_analyses = [[SimpleNamespace(raw_refs=analysis.raw_refs.tolist()) for analysis in table.analyses]
                     for table in (a, b)]
    mark = object()
    found = []
    for start in range(0, len(at_b), 2048):
        stop = min(start + 2048, len(at_b))
        fast = compiled.triage_block(a.functions, a.analyses, b.functions, b.analyses, at_b, start, stop, *rest,
                                     compiled.rva_map(result.function_map), mark)
        assert fast == reference.triage_block(a.functions, slow_analyses[0], b.functions, slow_analyses[1], at_b,
                                              start, stop, *rest, None, mark)
        found += fast
    assert len(found) == len(a) and found.count(None) > 5000 and found.count(mark) > 100


def test_unfilled_gaps_agree_on_random_sections() -> None:
    """unfilled_gaps: the compiled sweep gives the twin's gaps (keys, bounds) over random sections of
    int3/nop/zero fill and code, with fragments, jump tables, overlapping and empty ranges, ranges past the
    section's end and a section running past the memory."""
    rng = random.Random(20261206)
    kept = 0
    for _ in range(2000):
        size = rng.randint(0, 300)
        memory = bytes(rng.choice([0xCC, 0x90, 0, 0xCC, 0x55]) if rng.random() < 0.8 else rng.randrange(256)
                       for _ in range(size))
        begin, limit = rng.randint(0, 20), rng.randint(0, 340)
        ranges = []
        for _ in range(rng.randint(0, 12)):
            start = rng.randint(0, 330)
            end = start + rng.randint(0, 30)
            ranges.append((start, end, None, -1) if rng.random() < 0.2 else (start, end, rng.randrange(400),
                                                                              rng.randint(0, 2)))
        ranges = sorted((r for r in ranges if r[0] < limit), key=lambda r: (r[0], r[1]))
        expected = reference.unfilled_gaps(memory, ranges, begin, limit)
        assert compiled.unfilled_gaps(memory, ranges, begin, limit) == expected, (memory, ranges, begin, limit)
        kept += len(expected)
    assert kept > 1000


def test_call_graph_agrees_on_random_functions() -> None:
    """call_graph: the compiled kernel gives the twin's callees and callers (each caller once per callee, in
    function order, whatever the repeats in its callee list) into a dict and a defaultdict."""
    rng = random.Random(20261207)
    repeats = 0
    for _ in range(200):
        rvas = sorted(rng.sample(range(0x1000, 0x1400, 4), rng.randint(1, 30)))
        targets = rvas + [rng.randrange(0x1000, 0x1400) for _ in range(5)]
        refs_lists = [_random_refs(rng, rng.randint(0, 15), targets) for _ in rvas]
        refs_lists = [_packed(refs) if rng.random() < 0.5 else refs for refs in refs_lists]
        ranges = [((rva, rva + 4),) for rva in rvas]
        pointer_tables = {t: rng.sample(rvas, min(len(rvas), 2)) for t in rng.sample(targets, 2)}
        expected: tuple = ({}, defaultdict(list))
        reference.call_graph([list(r) for r in refs_lists], ranges, rvas, set(rvas), pointer_tables, *expected)
        found: tuple = ({}, defaultdict(list))
        compiled.call_graph(refs_lists, ranges, rvas, set(rvas), pointer_tables, *found)
        assert found == expected
        assert list(found[1]) == list(expected[1])  # targets in the order first met
        repeats += sum(len(callees) - len(set(callees)) for callees in expected[0].values())
    assert repeats > 100


def test_call_graph_by_index_agrees_on_packed_tables() -> None:
    """call_graph on an image's case (every list packed, starts the set of the rvas): callees looked up by
    index give the twin's graph, whatever the order of the rvas, functions calling themselves or another
    one's inside, and pointer tables holding something other than a start (then the general path)."""
    rng = random.Random(20261208)
    indexed = general = 0
    for _ in range(300):
        rvas = rng.sample(range(0x1000, 0x1800, 8), rng.randint(1, 40))
        if rng.random() < 0.5:
            rvas.sort()
        targets = rvas + [rva + 2 for rva in rvas[:3]] + [rng.randrange(0x1000, 0x1800) for _ in range(5)]
        refs_lists = [_packed(_random_refs(rng, rng.randint(0, 20), targets)) for _ in rvas]
        ranges = [((rva, rva + 4),) if rng.random() < 0.8 else ((rva, rva + 4), (rva + 0x400, rva + 0x410))
                  for rva in rvas]
        pointer_tables = {t: rng.sample(rvas, min(len(rvas), 3)) for t in rng.sample(targets, 3)}
        if rng.random() < 0.2:
            next(iter(pointer_tables.values())).append(0x1801)  # not a start
            general += 1
        else:
            indexed += 1
        expected: tuple = ({}, defaultdict(list))
        reference.call_graph([r.tolist() for r in refs_lists], ranges, rvas, set(rvas), pointer_tables, *expected)
        found: tuple = ({}, defaultdict(list))
        compiled.call_graph(refs_lists, ranges, rvas, set(rvas), pointer_tables, *found)
        assert found == expected
        assert list(found[0]) == list(expected[0]) and list(found[1]) == list(expected[1])
    assert indexed > 200 and general > 30


def test_interner_gives_the_ids_a_dict_gives() -> None:
    """token_ids into the compiled Interner: the same ids, in the same order of first use, as into a dict with
    either implementation, across many functions sharing one interner (past several growths of its table),
    with instructions of 1 to 15 bytes, cut at the end of memory, and masked operands."""
    rng = random.Random(20261208)
    memory = bytes(rng.choice([0, 0x48, 0x8B, 0xE8, 0xFF, rng.randrange(256)]) for _ in range(60000))
    interner, by_bytes, twin = compiled.new_interner(), {}, reference.new_interner()
    for _ in range(400):
        start = rng.randrange(0, len(memory) - 10)
        rvas = [start]
        for _ in range(rng.randint(0, 60)):
            rvas.append(rvas[-1] + rng.choice([1, 2, 3, 5, 7, 15, 16]))
        insn_rvas = array("I", rvas)
        end_rva = rvas[-1] + rng.randint(0, 20)
        refs = [(3, rva, rng.randint(0, 4), rng.choice([0, 1, 4]), 0) for rva in rng.sample(rvas, len(rvas) // 3)]
        refs.sort(key=lambda r: r[1])
        expected = reference.token_ids(memory, insn_rvas, end_rva, refs, twin)
        assert compiled.token_ids(memory, insn_rvas, end_rva, _packed(refs), interner) == expected
        assert compiled.token_ids(memory, insn_rvas, end_rva, refs, by_bytes) == expected
        assert len(interner) == len(by_bytes) == len(twin)
    assert len(interner) > 4096  # its table (4096 slots, at most half full) grew twice


def test_relocated_data_agrees_on_random_images() -> None:
    """relocated_data: pointers below the image base, past every section, in code, in data, cut short by the
    end of the image, slots in code and in data, gaps between sections."""
    rng = random.Random(20261204)
    base = 0x180000000
    found = 0
    for _ in range(400):
        size = rng.randint(16, 400)
        sections = ((0x10, 0x60, True), (0x60, 0x100, False), (0x140, size + 40, rng.random() < 0.3))
        words = [rng.choice([base + rng.randrange(0, 0x200), rng.randrange(0, 2**64), base - 8, 0])
                 for _ in range(size // 8 + 1)]
        memory = b"".join(w.to_bytes(8, "little") for w in words)[:size]
        relocations = tuple(sorted(rng.sample(range(0, size + 16), rng.randint(0, 12))))
        fast = compiled.relocated_data(memory, relocations, base, sections)
        assert fast == reference.relocated_data(memory, relocations, base, sections)
        found += len(fast)
    assert found > 300


def test_pointer_tables_agree_on_random_images() -> None:
    """pointer_tables: runs of relocated slots (and slots 4 bytes apart, repeated or out of order), pointers at
    starts, at other places, below the image base and far past it, slots in code, in a gap and past the end of
    the image (a pointer cut short there reads as the bytes there are), code spans that touch or are empty."""
    rng = random.Random(20261209)
    base = 0x180000000
    found = 0
    for _ in range(400):
        size = rng.randint(16, 400)
        starts = set(rng.sample(range(0, 0x200), 20))
        code_spans = tuple(sorted(rng.choice([((0x10, 0x60),), ((0x10, 0x60), (0x60, 0x60), (0x60, 0x90)), (),
                                              ((0x100, 0x140),)])))
        pool = sorted(starts)
        words = [rng.choice([base + rng.choice(pool), base + rng.randrange(0, 0x200), rng.randrange(0, 2**64),
                             base - 8, 0]) for _ in range(size // 8 + 1)]
        memory = b"".join(w.to_bytes(8, "little") for w in words)[:size]
        relocations = [8 * rng.randrange(0, size // 8 + 2) for _ in range(rng.randint(0, 24))]
        relocations += [slot + 4 for slot in relocations[:2]] + relocations[:1]
        rng.shuffle(relocations)
        fast = compiled.pointer_tables(memory, tuple(relocations), base, code_spans, starts)
        expected = reference.pointer_tables(memory, tuple(relocations), base, code_spans, starts)
        assert fast == expected and list(fast) == list(expected)
        found += sum(map(len, fast.values()))
    assert found > 300


def test_gaps_of_single_byte_fill_need_no_regex_sweep() -> None:
    """uncovered._without_fill's shortcut for gaps of int3/nop/zero bytes gives what the FILL_RE sweep gives,
    on random gaps of fill, multi-byte nops and code bytes, some running past the end of the image."""
    from hotpatch.diff.uncovered import _swept, _without_fill

    rng = random.Random(20261205)
    pieces = [b"\xcc", b"\x90", b"\x00", b"\x66\x90", b"\x0f\x1f\x00", b"\x66\x0f\x1f\x44\x00\x00", b"\xc3",
              b"\x48", b"\x66"]
    kinds = set()
    for _ in range(3000):
        memory = b"".join(rng.choice(pieces[:3] if rng.random() < 0.5 else pieces) for _ in range(rng.randint(0, 12)))
        begin = rng.randint(0, len(memory))
        end = rng.randint(begin, len(memory) + 3)
        found = _without_fill(memory, begin, end)
        assert found == _swept(memory, begin, end), (memory, begin, end)
        kinds.add(found is None)
    assert kinds == {True, False}


def _data_sides(kernels, memory, starts, sections, relocations, base, functions):  # type: ignore[no-untyped-def]
    return kernels.data_side(memory, starts, [s[0] for s in sections], [s[1] for s in sections], relocations, base,
                             functions, 64)


def _outcome(kernels, *args):  # type: ignore[no-untyped-def]
    """``kernels.items_equal(*args)``, or "struct.error" for the error a slot past the end of memory raises."""
    try:
        return kernels.items_equal(*args)
    except struct.error:
        return "struct.error"


def test_items_equal_agrees_on_random_items() -> None:
    """items_equal and item_extent: items cut by starts, sections and the cap, pointer slots at other offsets,
    overlapping, cut by the extent or past the end of memory, pointers to matched, unmatched and no functions."""
    rng = random.Random(20261206)
    base = 0x180000000
    outcomes = []
    for _ in range(3000):
        sides = []
        for _ in range(2):
            size = rng.randint(8, 160)
            words = [rng.choice([base + rng.randrange(0, 64, 8), rng.randrange(0, 4), rng.randrange(0, 2**64)])
                     for _ in range(size // 8 + 1)]
            memory = b"".join(w.to_bytes(8, "little") for w in words)[:size]
            sections = [(0, 40), (48, rng.randint(60, 200))]
            starts = sorted(rng.sample(range(0, 200), rng.randint(0, 6)))
            relocations = sorted(rng.sample(range(0, 200), rng.randint(0, 10)))
            functions = set(rng.sample(range(0, 64, 8), rng.randint(0, 4)))
            sides.append((memory, starts, sections, relocations, base, functions))
        if rng.random() < 0.6:  # the same item moved, maybe with a byte or a pointer edited: the slots decide
            memory, starts, sections, relocations, _, functions = sides[0]
            edited = bytearray(memory)
            if rng.random() < 0.5 and edited:
                edited[rng.randrange(len(edited))] ^= 1
            sides[1] = (bytes(edited), starts, sections, relocations, base, functions)
        function_map = {rng.randrange(0, 64, 8): rng.randrange(0, 64, 8) for _ in range(rng.randint(0, 4))}
        fast = [_data_sides(compiled, *side) for side in sides]
        slow = [_data_sides(reference, *side) for side in sides]
        for _ in range(10):
            rva_a = rng.randrange(0, 210)
            rva_b = rva_a if rng.random() < 0.5 else rng.randrange(0, 210)
            assert compiled.item_extent(fast[0], rva_a) == reference.item_extent(slow[0], rva_a)
            found = _outcome(compiled, fast[0], fast[1], rva_a, rva_b, function_map)
            assert found == _outcome(reference, slow[0], slow[1], rva_a, rva_b, function_map), \
                (sides, function_map, rva_a, rva_b)
            outcomes.append(found)
    assert min(outcomes.count(value) for value in (True, False, "struct.error")) > 50


def test_items_equal_agrees_on_a_real_pair(rust_diff) -> None:  # type: ignore[no-untyped-def]
    """Data pairs of _rust.pyd 43.0.0 -> 43.0.1 and their extents, and the functions reaching some of its data."""
    result = rust_diff
    pairing = Pairing(result.baseline, result.patched, result.function_map, result.streams)
    items = pairing.items()
    sides = []
    for kernels in (compiled, reference):
        sides.append([kernels.data_side(i.image.memory, i.starts, i._section_rvas, i._section_ends, i.relocations,
                                        i.image.image_base, i.classifier.starts, 4096) for i in items])
    # the mapped pairs (mostly equal), and each baseline item against the next patched one (mostly not)
    mapped = sorted(result.data_map.items())
    pairs = mapped + [(rva_a, rva_b) for (rva_a, _), (_, rva_b) in zip(mapped, mapped[1:])]
    answers = set()
    for rva_a, rva_b in pairs:
        expected = reference.items_equal(*sides[1], rva_a, rva_b, result.function_map)
        assert compiled.items_equal(*sides[0], rva_a, rva_b, result.function_map) == expected, (rva_a, rva_b)
        assert compiled.item_extent(sides[0][0], rva_a) == reference.item_extent(sides[1][0], rva_a)
        answers.add(expected)
    assert len(pairs) > 2000 and answers == {True, False}
    refs_lists = [analysis.raw_refs for analysis in result.baseline.analyses]
    wanted = set(sorted(pairing.targets_a.all_data_targets())[::50])
    reaching = compiled.lists_reaching(refs_lists, wanted)
    assert 100 < len(reaching) < len(refs_lists)
    assert reaching == reference.lists_reaching([refs.tolist() for refs in refs_lists], wanted)


def test_unique_pairs_agree_on_random_keys() -> None:
    """unique_pairs: the compiled kernel gives the twin's pairs on random keys met once, twice or not at all on
    either side, unset ones (None, "") among them, each side in its own order."""
    rng = random.Random(20261203)
    found = 0
    for _ in range(2000):
        alphabet = [None, "", *(f"k{i}" for i in range(rng.randint(1, 30)))]
        keys_a = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        keys_b = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        rvas_a = rng.sample(range(0x1000, 0x9000), len(keys_a))
        rvas_b = rng.sample(range(0x1000, 0x9000), len(keys_b))
        expected = reference.unique_pairs(keys_a, rvas_a, keys_b, rvas_b)
        assert compiled.unique_pairs(keys_a, rvas_a, keys_b, rvas_b) == expected, (keys_a, keys_b)
        found += len(expected)
    assert found > 2000


def test_unique_pairs_agree_on_a_real_pair(rust_diff) -> None:  # type: ignore[no-untyped-def]
    """unique_pairs by name and by fingerprint over every function of _rust.pyd 43.0.0 -> 43.0.1."""
    a, b = rust_diff.baseline, rust_diff.patched
    for attribute in ("name", "fingerprint"):
        keys = [[getattr(f, attribute) for f in table] for table in (a, b)]
        args = (keys[0], [f.rva for f in a], keys[1], [f.rva for f in b])
        expected = reference.unique_pairs(*args)
        assert compiled.unique_pairs(*args) == expected and len(expected) > 20, attribute
