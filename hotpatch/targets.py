"""What a reference points at, in terms the diff can compare across two images.

A target is an import (by name), a place inside the referencing function (by
offset), another function's entry, code inside another function, data, or
something outside the image.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from .functions import Function, FunctionTable

__all__ = ["TargetClassifier", "IMPORT", "SELF", "FUNCTION", "CODE", "DATA", "OTHER"]

IMPORT, SELF, FUNCTION, CODE, DATA, OTHER = "import", "self", "function", "code", "data", "other"


@dataclass(frozen=True)
class Target:
    kind: str
    value: int | str  # offset (self), rva (function/code/data/other) or "dll!name" (import)


class TargetClassifier:
    """Classifies reference targets of one image; cheap enough for every reference."""

    def __init__(self, table: FunctionTable) -> None:
        image = table.image
        self.table = table
        self.iat = table.context.iat
        self.starts = {f.rva for f in table}
        self._sections = sorted((s.rva, s.end_rva, s.executable, s.writable) for s in image.sections)
        self._section_starts = [s[0] for s in self._sections]
        self._flags: dict[int, tuple[bool, bool] | None] = {}  # the same targets come up again and again

    def section_flags(self, rva: int) -> tuple[bool, bool] | None:
        """(executable, writable) of the section holding ``rva``, or None outside every section."""
        try:
            return self._flags[rva]
        except KeyError:
            pass
        index = bisect_right(self._section_starts, rva) - 1
        flags = None
        if index >= 0 and rva < self._sections[index][1]:
            flags = self._sections[index][2], self._sections[index][3]
        self._flags[rva] = flags
        return flags

    def classify(self, function: Function, target: int) -> tuple[str, int | str]:
        label = self.iat.get(target)
        if label is not None:
            return IMPORT, label.decode()
        for begin, end in function.ranges:
            if begin <= target < end:
                return SELF, target - function.rva
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
