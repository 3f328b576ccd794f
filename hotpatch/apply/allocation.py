"""The layout of a package's one allocation in the target, and the bytes of its parts.

Code (with the relay thunks), then the region's marker, rodata and the
function table, then data and bss, each part page-aligned with its own
protection: never writable and executable at once.
"""

from __future__ import annotations

import struct

from ..errors import FixupError
from ..package.model import BaselineRVA, BlobKind, BlobTarget, Fixup, FixupKind, ImportTarget, Package
from ..pe.unwindinfo import RUNTIME_FUNCTION_SIZE
from ..process.win32mem import PAGE_EXECUTE_READ, PAGE_READONLY, PAGE_READWRITE
from ..process.win32mem import PAGE_SIZE as PAGE
from .imports import ResolvedImport, normalise_dll
from .provenance import MARKER_SIZE
from .redirects import fits_rel32, relay_thunk
from .region import Layout, Part

__all__ = ["build_parts", "import_key", "package_imports", "plan_layout", "thunk_keys"]

THUNK_SIZE = 16


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


# --------------------------------------------------------------------------
# Layout of the one allocation
# --------------------------------------------------------------------------


def plan_layout(package: Package, thunks: list[str]) -> Layout:
    offsets = [0] * len(package.blobs)
    offset = 0
    parts = []

    def place(kinds: tuple[BlobKind, ...]) -> None:
        nonlocal offset
        for blob in package.blobs:
            if blob.kind in kinds:
                offset = _align(offset, blob.alignment)
                offsets[blob.index] = offset
                offset += blob.size

    def close(name: str, start: int, protect: int) -> int:
        nonlocal offset
        if offset > start:
            parts.append(Part(name, start, _align(offset, PAGE) - start, protect))
        offset = _align(offset, PAGE)
        return offset

    place((BlobKind.CODE,))
    thunk_offsets = {}
    for key in thunks:
        offset = _align(offset, THUNK_SIZE)
        thunk_offsets[key] = offset
        offset += THUNK_SIZE
    start = close("code", 0, PAGE_EXECUTE_READ)
    marker_offset = offset
    offset += MARKER_SIZE
    place((BlobKind.RODATA,))
    offset = _align(offset, 4)
    table_offset = offset
    offset += RUNTIME_FUNCTION_SIZE * len(package.unwind)
    start = close("rodata", start, PAGE_READONLY)
    place((BlobKind.DATA,))
    place((BlobKind.BSS,))
    close("data", start, PAGE_READWRITE)
    return Layout(
        max(offset, PAGE), tuple(offsets), thunk_offsets, table_offset, len(package.unwind), tuple(parts), marker_offset
    )


def import_key(target: ImportTarget) -> tuple[str, str]:
    return normalise_dll(target.dll), target.name


def thunk_key(fixup: Fixup) -> str | None:
    """The relay thunk a fixup may need: a REL32 to an import (often more than 2 GiB away), an
    ALLOC_REL32 to code outside the allocation (a handler RVA in unwind info must be above its base)."""
    target = fixup.target
    if isinstance(target, ImportTarget) and fixup.kind in (FixupKind.REL32, FixupKind.ALLOC_REL32):
        return "{}!{}".format(*import_key(target))
    if isinstance(target, BaselineRVA) and fixup.kind is FixupKind.ALLOC_REL32 and fixup.addend == 0:
        return f"rva:{target.rva:#x}"
    return None


def build_parts(
    package: Package,
    layout: Layout,
    base_va: int,
    module_base: int,
    imports: dict[tuple[str, str], ResolvedImport],
    marker: bytes = b"",
) -> dict[str, bytes]:
    """The bytes of each part (bss left out: fresh pages are zero), fixups resolved, the region's marker."""
    memory = bytearray(layout.size)
    memory[layout.marker_offset : layout.marker_offset + len(marker)] = marker
    for blob in package.blobs:
        if blob.kind is not BlobKind.BSS:
            memory[layout.blob_offsets[blob.index] : layout.blob_offsets[blob.index] + blob.size] = blob.data
    thunk_targets = {}
    for fixup in package.fixups:
        key = thunk_key(fixup)
        if key is not None and isinstance(fixup.target, ImportTarget):
            thunk_targets[key] = imports[import_key(fixup.target)].va
        elif key is not None and isinstance(fixup.target, BaselineRVA):
            thunk_targets[key] = module_base + fixup.target.rva
    for key, offset in layout.thunk_offsets.items():
        memory[offset : offset + 14] = relay_thunk(thunk_targets[key])
    for fixup in package.fixups:
        field_va = base_va + layout.blob_offsets[fixup.blob] + fixup.offset
        what = f"fixup at blob {fixup.blob} offset {fixup.offset:#x}"
        target = fixup.target
        if isinstance(target, BaselineRVA):
            s = module_base + target.rva
        elif isinstance(target, BlobTarget):
            s = base_va + layout.blob_offsets[target.blob] + target.offset
        else:
            s = imports[import_key(target)].va
        key = thunk_key(fixup)
        if key is not None and key in layout.thunk_offsets:
            if fixup.kind is FixupKind.REL32:
                far = not fits_rel32(s + fixup.addend - field_va)
            else:
                far = not 0 <= s + fixup.addend - base_va < 1 << 32
            if far:
                s = base_va + layout.thunk_offsets[key]  # through the relay thunk
        if fixup.kind is FixupKind.REL32:
            value = s + fixup.addend - field_va
            if not fits_rel32(value):
                raise FixupError(f"{what}: {s:#x} is out of rel32 reach of {field_va:#x}")
            data = struct.pack("<i", value)
        elif fixup.kind is FixupKind.ABS64:
            value = s + fixup.addend
            if not 0 <= value < 1 << 64:
                raise FixupError(f"{what}: {value:#x} is not a 64-bit address")
            data = struct.pack("<Q", value)
        elif fixup.kind is FixupKind.IMAGE_REL32:
            value = s + fixup.addend - module_base
            if not 0 <= value < 1 << 32:
                raise FixupError(f"{what}: {s:#x} is not within 4 GiB above the module base {module_base:#x}")
            data = struct.pack("<I", value)
        else:  # ALLOC_REL32: relative to the allocation, the base the function table is registered with
            value = s + fixup.addend - base_va
            if not 0 <= value < 1 << 32:
                raise FixupError(f"{what}: {s:#x} is not within 4 GiB above the allocation base {base_va:#x}")
            data = struct.pack("<I", value)
        offset = field_va - base_va
        memory[offset : offset + len(data)] = data
    entries = sorted(
        (
            layout.blob_offsets[u.code_blob] + u.begin,
            layout.blob_offsets[u.code_blob] + u.end,
            layout.blob_offsets[u.unwind_blob] + u.unwind_offset,
        )
        for u in package.unwind
    )
    for i, entry in enumerate(entries):
        struct.pack_into("<III", memory, layout.table_offset + RUNTIME_FUNCTION_SIZE * i, *entry)
    parts = {}
    for part in layout.parts:
        end = part.offset + part.size
        if part.name == "data":  # only up to the last initialised byte
            initialised = [
                layout.blob_offsets[b.index] + b.size for b in package.blobs if b.kind is BlobKind.DATA
            ]
            end = max(initialised, default=part.offset)
        if end > part.offset:
            parts[part.name] = bytes(memory[part.offset : end])
    return parts


def package_imports(package: Package) -> list[ImportTarget]:
    seen: dict[tuple[str, str], ImportTarget] = {}
    for fixup in package.fixups:
        if isinstance(fixup.target, ImportTarget):
            seen.setdefault(import_key(fixup.target), fixup.target)
    return list(seen.values())


def thunk_keys(package: Package) -> list[str]:
    keys: dict[str, None] = {}
    for fixup in package.fixups:
        key = thunk_key(fixup)
        if key is not None:
            keys.setdefault(key)
    return list(keys)

