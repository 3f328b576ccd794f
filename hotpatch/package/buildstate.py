"""What the package builder accumulates while it works: code blobs, blobs, fixups, and where things went.

Shared by the builder (package/builder.py) and its unwind-info part (package/unwindcopy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analysis.functions import Function
from ..diff.result import DiffResult
from .model import Blob, Fixup

__all__ = ["BuildState", "CodeBlob", "Unsupported"]


class Unsupported(Exception):
    """Something the builder cannot relocate; becomes an ``unsupported_reference`` reason."""


@dataclass
class CodeBlob:
    """One moved function's new code: its ranges copied one after the other."""

    function: Function
    index: int
    #: (patched begin RVA, end RVA, offset in the blob) per copied range
    ranges: list[tuple[int, int, int]]
    data: bytearray

    def offset_of(self, rva: int) -> int | None:
        for begin, end, offset in self.ranges:
            if begin <= rva < end or rva == end:
                return offset + rva - begin
        return None

    def range_of(self, rva: int) -> int | None:
        for position, (begin, end, _) in enumerate(self.ranges):
            if begin <= rva < end:
                return position
        return None


@dataclass
class BuildState:
    """The package under construction; ``reserve`` hands out blob indices in order."""

    result: DiffResult
    blobs: list[Blob | CodeBlob | None] = field(default_factory=list)
    fixups: list[Fixup] = field(default_factory=list)
    code_of: dict[int, CodeBlob] = field(default_factory=dict)  # patched function RVA -> blob
    data_blob_at: dict[int, tuple[int, int]] = field(default_factory=dict)  # patched data RVA -> (blob, offset)
    import_slots: dict[str, int] = field(default_factory=dict)  # "dll!name" -> DATA blob holding its address

    def reserve(self) -> int:
        self.blobs.append(None)
        return len(self.blobs) - 1
