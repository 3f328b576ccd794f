"""Function discovery: where every function of an image starts and ends.

.pdata is authoritative for the functions it lists (x64 requires it for every
function that touches the stack), but leaf functions and hand-written kernels
often have none. Those come from exports, COFF symbols, the entry point,
import thunks, exception handlers named by unwind info, pointers into code held
in data (covered by base relocations), direct call targets and code addresses
taken with lea (validated), followed until nothing new appears. A function
without .pdata ends where no path from its entry goes on, and never past the
next known start.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import cache, cached_property
from operator import attrgetter
from typing import Any
from weakref import WeakKeyDictionary

from ..collector import gc_paused
from ..pe.image import Image, UnwindInfo
from . import _discovery_reference
from .api import AnalysisContext, FunctionAnalysis, backend, decode, fingerprint_all, kernels_for
from .layout import Item, Layout
from .padding import FILL_BYTES, covered_bytes, gap_fill_bytes
from .refkinds import IAT_JUMP

__all__ = ["Function", "FunctionTable", "discover", "import_thunk_target", "SOURCES"]

#: discovery sources, in the order they are tried
SOURCES = ("pdata", "export", "symbol", "entry", "thunk", "handler", "pointer", "call", "lea", "rva32", "gap")
_SOURCE_BIT = {source: 1 << index for index, source in enumerate(SOURCES)}
#: the handler an unwind info names, if any (read from every .pdata function)
_HANDLER_RVA = attrgetter("unwind.handler_rva")


@cache
def _sources_of(mask: int) -> tuple[str, ...]:
    """The sources a mask of ``_SOURCE_BIT`` names, in SOURCES' order."""
    return tuple(source for source in SOURCES if mask & _SOURCE_BIT[source])


class _Ranged:
    """The slot ``Function.ranges`` lives in: outside the dataclass's fields, so equality, hashing, repr and
    pickles are the fields' alone."""

    __slots__ = ("ranges",)
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Function(_Ranged):
    """One discovered function (slots: discovery's kernel fills them directly, tens of thousands an image).

    ``ranges`` (the primary range, then the fragments) is made once, not at each read: the diff reads it
    hundreds of thousands of times (matching, pairing) and a fresh tuple cost more than the rest of a read."""

    rva: int
    end_rva: int
    name: str | None
    sources: tuple[str, ...]
    #: chained .pdata fragments (begin, end) folded into this function
    fragments: tuple[tuple[int, int], ...] = ()
    #: usable int3/nop bytes right before the entry and right after the end
    pad_before: int = 0
    pad_after: int = 0
    unwind: UnwindInfo | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", ((self.rva, self.end_rva),) + self.fragments)

    def __setstate__(self, state: list[Any]) -> None:
        """Unpickled (the state is the fields' values, as dataclass pickles a frozen slotted class)."""
        for field, value in zip(fields(self), state):
            object.__setattr__(self, field.name, value)
        self.__post_init__()

    @property
    def size(self) -> int:
        return self.end_rva - self.rva

    @property
    def label(self) -> str:
        return self.name or f"sub_{self.rva:x}"


@dataclass(frozen=True, eq=False)
class FunctionTable:
    """All functions of one image with their analyses, sorted by RVA."""

    image: Image
    functions: tuple[Function, ...]
    analyses: tuple[FunctionAnalysis, ...]
    context: AnalysisContext
    #: the analysis implementation that made it (``hotpatch.analysis._core`` or ``_reference``); the diff uses its twin
    backend: Any = None

    def __post_init__(self) -> None:
        if self.backend is None:
            object.__setattr__(self, "backend", backend())

    def __len__(self) -> int:
        return len(self.functions)

    def __iter__(self) -> Any:
        return iter(self.functions)

    def at(self, rva: int) -> Function | None:
        """The function that starts at ``rva``."""
        index = self._index.get(rva)
        return None if index is None else self.functions[index]

    def analysis_of(self, function: Function) -> FunctionAnalysis:
        return self.analyses[self._index[function.rva]]

    def containing(self, rva: int) -> Function | None:
        """The function whose primary range or fragments contain ``rva``: the last span, of all of them sorted
        by (begin, end, function index), that begins at or before ``rva``, when it runs past ``rva``."""
        # the primary ranges are sorted with the functions: only the few fragments need an index of their own
        # (a diff asks a handful of times; sorting every function's spans cost more than all the asking)
        index = bisect_right(self._starts, rva) - 1
        best = None if index < 0 else (self.functions[index].rva, self.functions[index].end_rva, index)
        fragments = self._fragment_spans
        at = bisect_right(fragments[0], rva) - 1
        if at >= 0 and (best is None or fragments[1][at] > best):
            best = fragments[1][at]
        if best is not None and rva < best[1]:
            return self.functions[best[2]]
        return None

    def preceding(self, rva: int) -> Function | None:
        """The last function that starts at or before ``rva`` (for addresses in gaps between functions)."""
        index = bisect_right(self._starts, rva) - 1
        return self.functions[index] if index >= 0 else None

    def counts_by_source(self) -> dict[str, int]:
        counts = dict.fromkeys(SOURCES, 0)
        for function in self.functions:
            for source in function.sources:
                counts[source] += 1
        return counts

    def coverage(self) -> dict[str, float]:
        """Per executable section: share of its non-fill bytes inside a discovered function."""
        out = {}
        for section in self.image.executable_sections:
            covered = covered_bytes([r for f in self.functions for r in f.ranges], section)
            gaps = gap_fill_bytes(self.image, [r for f in self.functions for r in f.ranges], section)
            total = section.virtual_size - gaps
            out[section.name] = covered / total if total > 0 else 1.0
        return out

    def overlaps(self) -> list[tuple[Function, Function]]:
        """Pairs of functions whose ranges overlap (discovery promises there are none)."""
        spans = sorted((begin, end, f) for f in self.functions for begin, end in f.ranges)
        return [(a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]

    # cached in the instance's __dict__ on first use (the table is frozen, its functions never change), then
    # read as plain attributes: analysis_of, at and containing run tens of thousands of times a diff
    @cached_property
    def _index(self) -> dict[int, int]:
        return {f.rva: i for i, f in enumerate(self.functions)}

    @cached_property
    def _starts(self) -> list[int]:
        return [f.rva for f in self.functions]

    @cached_property
    def _fragment_spans(self) -> tuple[list[int], list[tuple[int, int, int]]]:
        """The begins of every fragment sorted, and the (begin, end, function index) of each."""
        spans = sorted((begin, end, i) for i, f in enumerate(self.functions) if f.fragments
                       for begin, end in f.fragments)
        return [s[0] for s in spans], spans


# ── discovery ──────────────────────────────────────────────────────────────


def discover(image: Image, impl: Any = None) -> FunctionTable:
    """Find, bound and analyse every function of ``image``."""
    with gc_paused():
        return _discover(image, impl)


def _kernels(core: Any) -> Any:
    """Discovery's round kernels that go with an analysis implementation: compiled with compiled."""
    return kernels_for(core, "hotpatch.analysis._discovery", _discovery_reference.__name__, "discovery kernels")


def _discover(image: Image, impl: Any) -> FunctionTable:
    core = impl or backend()
    kernels = _kernels(core)
    ctx = AnalysisContext.from_image(image)
    pdata = {f.begin_rva: f for f in image.runtime_functions}
    sections = sorted(image.executable_sections, key=lambda s: s.rva)
    section_rvas, section_ends = array("I", (s.rva for s in sections)), array("I", (s.end_rva for s in sections))
    # every byte owned by a .pdata function (primary range or fragment), for rejecting inner addresses
    bounds = (section_rvas, section_ends, *kernels.owned_spans(image.runtime_functions, pdata))

    def acceptable_in(rvas: Iterable[int]) -> list[int]:
        """The addresses that could start a function: in code, not inside a .pdata function (in one call:
        a round's call targets, lea targets and places are thousands)."""
        return kernels.acceptable_in(rvas, *bounds)

    # each start's sources as a mask of bits in SOURCES' order (a set each would be tens of thousands)
    sources: dict[int, int] = dict.fromkeys(pdata, _SOURCE_BIT["pdata"])
    names: dict[int, str] = {}
    pending = list(pdata)  # starts not in the layout yet

    def add_all(rvas: Iterable[int], source: str) -> bool:
        """Each address that could start a function starts one found by ``source`` (without names), in one
        call: a round's call targets are thousands."""
        return kernels.add_sources(acceptable_in(rvas), _SOURCE_BIT[source], sources, pending)

    # Exception and termination handlers named by unwind info: the OS calls them, nothing in the code does
    # (hand-written assembly's SEH handlers have no .pdata of their own).
    # tens of thousands of .pdata entries name a handful of handlers: add each once, in first-named order
    handlers = dict.fromkeys(map(_HANDLER_RVA, image.runtime_functions))
    handlers.pop(None, None)
    # the starts the image names itself, in this order (a start keeps the first name it gets), judged at once
    listed: list[tuple[int, str, str | None]] = [
        (export.rva, "export", export.name) for export in image.exports if export.forwarder is None]
    listed += [(symbol.rva, "symbol", symbol.name) for symbol in image.symbols if symbol.is_function]
    if image.entry_rva is not None:
        listed.append((image.entry_rva, "entry", None))
    listed += [(thunk, "thunk", None) for thunk in _import_thunks(image, kernels)]
    listed += [(handler, "handler", None) for handler in handlers]
    fit = set(acceptable_in([rva for rva, _, _ in listed]))
    for rva, source, name in listed:
        if rva in fit:
            mask = sources.get(rva)
            if mask is None:
                pending.append(rva)
            sources[rva] = (mask or 0) | _SOURCE_BIT[source]
            if name and rva not in names:
                names[rva] = name
    memory = image.memory
    # pointers inside code are references of that code, not function starts: the kernel leaves them out;
    # data kept in code sections (mingw's constructor lists) is pointed at too: it must decode
    add_all(kernels.decodable_in(memory, acceptable_in(kernels.pointer_targets(
        memory, ctx.relocations, image.image_base, section_rvas, section_ends))), "pointer")

    # Follow direct calls and code addresses taken with lea until no new function appears. A function
    # without .pdata ends where no path goes on (``_reachable``): what lies behind is data or code reached
    # some other way, never more of it. Each round touches only the functions whose next start changed
    # (``Layout``), and ``decoded`` holds only the decodes of the current items.
    decoded: dict[Item, FunctionAnalysis] = {}
    # what the 32-bit words of data name, looked up place by place each round (the words themselves go)
    index = kernels.memory_word_index(memory, *_rva32_spans(image), max(section_ends, default=0))
    layout = Layout(sections, pdata)
    scanned: set[Item] = set()
    taken: set[int] = set()  # addresses taken with lea, neither a start nor rejected as one
    # Candidates are ``X.difference(sources, rejected)``, never ``X - sources.keys()``: the latter walks every
    # known start (tens of thousands) each round, the former only X; _add_plausible sorts them either way.
    rejected: set[int] = set()  # candidates already judged not to start a function
    # places named by data that ``acceptable`` refused: the same few thousand come back every round, and
    # it never changes its mind
    unfit: set[int] = set()
    while True:
        changed = layout.insert(pending, kernels)
        pending.clear()
        todo = [layout.raw[rva] for rva, _ in changed if rva not in pdata]
        # the whole decode up to the next start of an item cut goes (its cut is decoded below)
        current, missing = layout.settle(changed, todo, _reach(ctx, core, memory, todo, [0] * len(todo), decoded),
                                         decoded, kernels)
        decoded.update(zip(missing, decode(ctx, missing, core)))
        calls, leas = kernels.call_and_lea_targets(memory, kernels.fresh_refs(current, decoded, scanned))
        # whether an address could start a function does not change: keep only those that could; once a
        # start or rejected, an address is no candidate again
        taken.update(acceptable_in(leas))
        found = add_all(calls, "call")
        taken = taken.difference(sources, rejected)
        found |= _add_plausible(image, ctx, core, layout, add_all, "lea", rejected, [
            t for t in taken if _boundary(image, layout, t, core)])
        if not found:
            places = layout.places(memory, kernels)
            # a place's words never change and every place of an earlier round was looked at then (and is
            # a start now, or rejected, or unfit): only the places new since then can be named anew
            named = kernels.named_in(layout.new_places, index).difference(sources, rejected, unfit)
            fit = acceptable_in(named)
            unfit |= named.difference(fit)
            found |= _add_plausible(image, ctx, core, layout, add_all, "rva32", rejected, fit)
        if not found:
            # Code right after a function's last instruction or its int3/nop padding, outside every
            # function, that decodes as sane code is a function nothing names: C++ exception funclets
            # (FH4 packs their addresses), functions whose only callers are themselves unnamed.
            found |= _add_plausible(image, ctx, core, layout, add_all, "gap", rejected, acceptable_in(
                kernels.after_padding_in(memory, places.difference(sources, rejected))))
        if not found:
            break
    # Functions without .pdata end after their last instruction that is not fill (decoded again if cut).
    final_layout, analyses, cut, final_rvas, final_ends = kernels.trimmed_layout(memory, layout.starts, layout.items,
                                                                                 pdata, decoded)
    del layout, scanned, decoded
    for index, analysis in zip(cut, decode(ctx, [final_layout[i] for i in cut], core)):
        analyses[index] = analysis

    starts = array("I", sorted(sources))
    final = fingerprint_all(ctx, analyses, starts, core)
    padding = kernels.padding_runs(memory, final_rvas, final_ends, section_rvas, section_ends)
    functions = kernels.build_functions(Function, final_layout, final, *padding, pdata, names, sources, _sources_of)
    return FunctionTable(image, tuple(functions), tuple(final), ctx, core)


def _import_thunks(image: Image, kernels: Any = _discovery_reference) -> list[int]:
    """``jmp [rip+IAT slot]`` stubs: the linker's import thunks (mingw calls CRT functions through them).

    ``FF 25`` right after a REX byte is the tail of MSVC's 7-byte ``48 FF 25`` tail jump to an import, not
    a thunk: a start there would lie inside that instruction and cut its function short. A REX-valued byte
    is still the end of a previous thunk's displacement when thunks follow each other (MSVC lays them out
    back to back), so a thunk six bytes earlier vouches for the boundary.
    """
    out: list[int] = []
    memory = image.memory
    for section in image.executable_sections:
        for rva, target in kernels.rip_jumps(memory, array("I", (section.rva,)), array("I", (section.end_rva,))):
            if image.import_at(target) is None:
                continue
            if rva > section.rva and 0x40 <= memory[rva - 1] <= 0x4F and not (out and out[-1] == rva - 6):
                continue
            out.append(rva)
    return out


def import_thunk_target(table: FunctionTable, function: Function) -> str | None:
    """The import a function only forwards to (``jmp [rip+IAT]``), or None."""
    refs = table.analysis_of(function).raw_refs
    if len(refs) == 1 and refs[0][1] == function.rva and refs[0][0] == IAT_JUMP:
        imported = table.image.import_at(refs[0][4])
        return imported.label if imported else None
    return None


def _reachable(memory: bytes, item: Item, analysis: FunctionAnalysis, horizon: int = 0,
               kernels: Any = _discovery_reference, tail_gaps: bool = True) -> Item:
    """The item cut after the first instruction that does not fall through (ret, jmp, ud2, int3) with no
    branch or jump-table target of the function beyond it: nothing after it is reached from the entry.
    A jump over data that no other path reaches is a tail jump into the next function, not more of this
    one (``tail_gaps``; ``reachable_end`` says when).

    Only for functions without .pdata, whose end is otherwise just the next known start: MSVC's leaves
    and hand-written code are followed by tables, constants and code reached only through pointers, and
    sweeping those as part of the function gives it references to nowhere (issue 15, cause 9).
    """
    rva, ((begin, limit),) = item
    end = kernels.reachable_end(memory, analysis.insn_rvas, analysis.raw_refs, analysis.raw_tables, begin, limit,
                                horizon, tail_gaps)
    return (rva, ((begin, end),)) if end < limit else item


def _rva32_spans(image: Image) -> tuple[array, array]:
    """The sections that are neither code nor .pdata/.reloc, as (begins, ends): where MSVC's C++ exception
    tables (packed, so unaligned, in FH4), CFG tables and other address tables keep image-relative
    addresses of code, read as 32-bit values at every alignment (``memory_word_index``)."""
    data = [s for s in image.sections if not s.executable and s.name not in (".pdata", ".reloc")]
    return array("I", (s.rva for s in data)), array("I", (s.end_rva for s in data))


def _boundary(image: Image, layout: Layout, rva: int, core: Any) -> bool:
    """Whether ``rva`` can start a function: outside every function's reachable code, right after fill
    or after a function's last instruction (never inside an instruction), and decodable."""
    section = image.code_section(rva)
    if section is None:
        return False
    previous = layout.at_or_before(rva)
    previous_end = section.rva
    if previous is not None:
        (begin, end) = previous[1][0]
        if begin <= rva < end:
            return False  # inside code some function reaches (or inside a .pdata function)
        previous_end = max(previous_end, end)
    if rva != previous_end and image.memory[rva - 1] not in FILL_BYTES:
        return False
    return bool(_kernels(core).decodable_in(image.memory, (rva,)))


def _add_plausible(image: Image, ctx: AnalysisContext, core: Any, layout: Layout, add_all: Any, source: str,
                   rejected: set[int], candidates: list[int]) -> bool:
    """Add the plausible candidates as functions from ``source`` (``add_all``); remember the others. True if
    any was new."""
    accepted = set(_plausible(image, ctx, core, layout, candidates))
    rejected.update(t for t in candidates if t not in accepted)
    return add_all(sorted(accepted), source)


def _plausible(image: Image, ctx: AnalysisContext, core: Any, layout: Layout, candidates: list[int]) -> list[int]:
    """The candidates whose code, decoded up to where no path goes on, makes only sane references.

    Hand-written assembly takes the address of its constant tables in .text with lea too (OpenSSL's AES
    tables); decoded as code those bytes branch and point outside the image or into the middle of
    nowhere, which compiled code never does.
    """
    # Each candidate is judged up to the next known start (a rejected candidate after it bounds nothing).
    # The sweep first stops at the next candidate: a candidate that is data shows it there already, and
    # looking further is only needed for sane code that runs into the next candidate.
    ordered, limits = _kernels(core).plausible_limits(candidates, ctx.relocations, layout.starts,
                                                      *_section_bounds(image)[:2])
    short = [(rva, ((rva, min(limit, ordered[i + 1]) if i + 1 < len(ordered) else limit),))
             for i, (rva, limit) in enumerate(zip(ordered, limits))]
    out: list[int] = []
    longer = []
    for item, limit, verdict in zip(short, limits, _judged(image, ctx, core, short, limits)):
        if verdict == "runs on" and item[1][0][1] < limit:
            longer.append((item[0], ((item[0], limit),)))
        elif verdict:
            out.append(item[0])
    out.extend(item[0] for item, verdict in zip(longer, _judged(image, ctx, core, longer, [0] * len(longer)))
               if verdict)
    return out


def _judged(image: Image, ctx: AnalysisContext, core: Any, items: list[Item], horizons: list[int]) -> list[str]:
    """For each item: "" if its reachable code is not sane (an undecodable byte, a branch off code, a memory
    operand outside the image), "ends" if that code ends inside the item, "runs on" if it runs to the item's
    end (or branches beyond it, up to its horizon)."""
    memory = image.memory
    kernels = _kernels(core)
    full: dict[Item, FunctionAnalysis] = {}
    reached = _reach(ctx, core, memory, items, horizons, full)
    cut = [r for r, item in zip(reached, items) if r != item]
    redecoded = dict(zip(cut, decode(ctx, cut, core)))
    sane = kernels.sane_items(memory, reached, [redecoded[r] if r != item else full[item] for item, r in
                                                zip(items, reached)], *_section_bounds(image))
    return ["" if not fine else "ends" if r != item else "runs on" for item, r, fine in zip(items, reached, sane)]


#: bytes decoded first when bounding a function without .pdata (most end well within it)
_REACH_WINDOW = 2048
#: a cut closer than this to the window's end may depend on an instruction the window splits
_WINDOW_MARGIN = 16


def _reach(ctx: AnalysisContext, core: Any, memory: bytes, items: list[Item], horizons: list[int],
           full: dict[Item, FunctionAnalysis]) -> list[Item]:
    """``_reachable`` of each item's whole decode, decoding only its first ``_REACH_WINDOW`` bytes where
    those decide it; the whole decodes made are added to ``full``.

    The core's sweep of a shorter range is the same instructions and references up to its end (data
    skipped ahead resumes at the same target when that lies inside), except around jump tables, whose
    targets are checked against the range: a window with a table is decoded whole. An item of unknown
    extent (data swept as code) would otherwise be decoded to the next known start, often far away.
    """
    kernels = _kernels(core)
    windows = [(rva, ((begin, limit if limit < begin + _REACH_WINDOW else begin + _REACH_WINDOW),))
               for rva, ((begin, limit),) in items]
    # one kernel call a round decides every item its window decides (tens of thousands in the first round)
    out, whole = kernels.reach_windows(memory, items, windows, decode(ctx, windows, core), horizons, _WINDOW_MARGIN,
                                       full)
    if whole:
        todo = [items[i] for i in whole]
        for index, reached in zip(whole, kernels.reach_windows(memory, todo, todo, decode(ctx, todo, core),
                                                               [horizons[i] for i in whole], _WINDOW_MARGIN,
                                                               full)[0]):
            out[index] = reached
    return out  # type: ignore[return-value]


def _section_bounds(image: Image) -> tuple[array, array, array, array]:
    """(rvas, ends) of the executable sections, then of all sections, sorted: for ``sane_references`` (made
    once per image: discovery judges thousands of candidates)."""
    cached = _SECTION_BOUNDS.get(image)
    if cached is None:
        code = sorted((s.rva, s.end_rva) for s in image.executable_sections)
        every = sorted((s.rva, s.end_rva) for s in image.sections)
        cached = _SECTION_BOUNDS[image] = (array("I", (b for b, _ in code)), array("I", (e for _, e in code)),
                                           array("I", (b for b, _ in every)), array("I", (e for _, e in every)))
    return cached


_SECTION_BOUNDS: WeakKeyDictionary[Image, tuple[array, array, array, array]] = WeakKeyDictionary()

