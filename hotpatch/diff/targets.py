"""What a reference points at, in terms the diff can compare across two images.

A target is an import (by name), a place inside the referencing function (by
offset), another function's entry, code inside another function, data, or
something outside the image.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from ..analysis.api import diff_kernels
from ..analysis.functions import Function, FunctionTable

__all__ = ["TargetClassifier", "IMPORT", "SELF", "FUNCTION", "CODE", "DATA", "OTHER"]

IMPORT, SELF, FUNCTION, CODE, DATA, OTHER = "import", "self", "function", "code", "data", "other"


@dataclass(frozen=True)
class Target:
    kind: str
    value: int | str  # offset (self), rva (function/code/data/other) or "dll!name" (import)


class TargetClassifier:
    """Classifies reference targets of one image; cheap enough for every reference (the same targets
    come up again and again, so what does not depend on the referencing function is cached)."""

    def __init__(self, table: FunctionTable) -> None:
        image = table.image
        self.table = table
        self.iat = table.context.iat
        #: the function starts: the table's own index, not a set of its own (membership is all it answers)
        self.starts = table._index.keys()
        kernels = diff_kernels(table.backend)
        self._targets_within, self._lists_reaching = kernels.targets_within, kernels.lists_reaching
        # flags precomputed per section: this runs for every reference, where Image.section_from_rva plus
        # the Section properties cost measurably more (about 0.1 s of a large diff)
        self._sections = sorted((s.rva, s.end_rva, (s.executable, s.writable)) for s in image.sections)
        self._section_starts = [s[0] for s in self._sections]
        #: (begin, end, executable) sorted by begin, for the kernels that look sections up themselves
        self.sections = tuple((begin, end, executable) for begin, end, (executable, _) in self._sections)
        #: (begin, end) of the data (non-executable) sections
        self._data_spans = tuple((begin, end) for begin, end, (executable, _) in self._sections if not executable)
        self._class: dict[int, tuple[str, int | str]] = {}
        self._data_targets: dict[int, frozenset[int]] = {}
        self._all_data_targets: frozenset[int] | None = None

    def section_flags(self, rva: int) -> tuple[bool, bool] | None:
        """(executable, writable) of the section holding ``rva``, or None outside every section."""
        index = bisect_right(self._section_starts, rva) - 1
        if index >= 0:
            begin, end, flags = self._sections[index]
            if rva < end:
                return flags
        return None

    def classify(self, function: Function, target: int) -> tuple[str, int | str]:
        found = self._class.get(target)
        if found is None:
            found = self._class[target] = self._classify_outside(target)
        if found[0] is not IMPORT:
            if function.rva <= target < function.end_rva:
                return SELF, target - function.rva
            for begin, end in function.fragments:
                if begin <= target < end:
                    return SELF, target - function.rva
        return found

    def _classify_outside(self, target: int) -> tuple[str, int | str]:
        """What ``target`` is when it is not inside the referencing function."""
        label = self.iat.get(target)
        if label is not None:
            return IMPORT, label.decode()
        if target in self.starts:
            return FUNCTION, target
        flags = self.section_flags(target)
        if flags is None:
            return OTHER, target
        return (CODE if flags[0] else DATA), target

    def is_data(self, rva: int) -> bool:
        flags = self.section_flags(rva)
        return flags is not None and not flags[0]

    def is_writable_data(self, rva: int) -> bool:
        flags = self.section_flags(rva)
        return flags is not None and flags[1] and not flags[0]

    def only_data(self, rvas: Iterable[int]) -> set[int]:
        """The RVAs of ``rvas`` that lie in data (non-executable) sections; one bisection per section."""
        if rvas is self._all_data_targets:
            return set(rvas)  # data alone already
        ordered = sorted(set(rvas))
        out: set[int] = set()
        for begin, end, (executable, _) in self._sections:
            if not executable:
                out.update(ordered[bisect_left(ordered, begin):bisect_left(ordered, end)])
        return out

    def data_targets(self, function: Function) -> frozenset[int]:
        """The data (not import slots) that ``function``'s references point at."""
        found = self._data_targets.get(function.rva)
        if found is None:
            # what ``all_data_targets`` keeps of this function's targets, told apart in C (a Python int is made
            # only for a target in data, not for each of its calls and branches)
            within = self._targets_within((self.table.analysis_of(function).raw_refs,), self._data_spans)
            found = self._data_targets[function.rva] = frozenset(within.difference(self.iat))
        return found

    def data_targets_of(self, functions: Iterable[Function]) -> set[int]:
        """``data_targets`` of all ``functions`` together, told apart in one kernel call (a diff asks for those of
        every changed, added and removed function)."""
        return self._targets_within(self._refs(functions), self._data_spans).difference(self.iat)

    def reaching(self, functions: Iterable[Function], targets: set[int]) -> list[int]:
        """Where in ``functions`` those with a reference to one of ``targets`` are, in order (one kernel call)."""
        return self._lists_reaching(self._refs(functions), targets)

    def _refs(self, functions: Iterable[Function]) -> list:
        analyses, index = self.table.analyses, self.table._index
        return [analyses[index[f.rva]].raw_refs for f in functions]

    def all_data_targets(self) -> frozenset[int]:
        """The data every function of the image references."""
        if self._all_data_targets is None:
            targets = self._targets_within([analysis.raw_refs for analysis in self.table.analyses], self._data_spans)
            self._all_data_targets = frozenset(targets - self.iat.keys())
        return self._all_data_targets
