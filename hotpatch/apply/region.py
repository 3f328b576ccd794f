"""The region a package's code and data go into: its parts and their offsets.

The engine plans a ``Layout`` (``engine.plan_layout``) and provenance checks a
region in a process against one; both import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout", "Part"]


@dataclass(frozen=True)
class Part:
    name: str  # code | rodata | data
    offset: int
    size: int
    protect: int


@dataclass(frozen=True)
class Layout:
    """Where everything of a package goes, as offsets from the allocation's base.

    code blobs, relay thunks | marker, rodata blobs, RUNTIME_FUNCTION array | data blobs, bss blobs
    Each part starts on a page, so each gets its own protection. The marker
    (provenance.region_marker) lets recovery tell this region from any other.
    """

    size: int
    blob_offsets: tuple[int, ...]
    thunk_offsets: dict[str, int]  # thunk key (see _thunk_key) -> offset
    table_offset: int
    table_count: int
    parts: tuple[Part, ...]
    marker_offset: int = 0
