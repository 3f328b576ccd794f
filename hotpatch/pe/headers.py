"""The PE32+ x86-64 headers: DOS stub pointer, COFF header, optional header, data directories, sections.

One reader for every place that needs them: an image file (``read_file_headers``), a mapped image or
a process's memory (``read_headers`` over any ``read(offset, size)`` callable that returns up to
``size`` bytes, fewer past the end). It checks the structure (signatures, magic, machine, that each
part is there) and raises the ``ImageError`` subclass that names what is wrong; the policy checks of a
whole file (sizes, overlaps, directories inside the image) are ``hotpatch.image``'s.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import (
    CorruptImageError,
    NotPE32PlusError,
    NotPEError,
    TruncatedImageError,
    UnsupportedArchitectureError,
)
from ..names import pe_name

__all__ = [
    "DIRECTORY_BASERELOC", "DIRECTORY_EXCEPTION", "DIRECTORY_EXPORT", "DIRECTORY_IAT", "DIRECTORY_IMPORT",
    "DIRECTORY_LOAD_CONFIG", "DIRECTORY_SECURITY", "DIRECTORY_TLS", "MACHINE_AMD64", "MACHINE_NAMES",
    "MAGIC_PE32", "MAGIC_PE32_PLUS", "OPTIONAL_IMAGE_BASE", "PEHeaders", "Read", "SectionHeader",
    "first_page", "read_file_headers", "read_headers",
]

#: ``read(offset, size)``: up to ``size`` bytes at ``offset`` (fewer past the end of what there is)
Read = Callable[[int, int], bytes]

MACHINE_AMD64 = 0x8664
MACHINE_NAMES = {0x14C: "i386", 0x8664: "x86-64", 0xAA64: "ARM64", 0xA641: "ARM64EC", 0x1C4: "ARMNT"}
MAGIC_PE32 = 0x10B
MAGIC_PE32_PLUS = 0x20B

DIRECTORY_EXPORT = 0
DIRECTORY_IMPORT = 1
DIRECTORY_EXCEPTION = 3
DIRECTORY_SECURITY = 4  # its "RVA" is a file offset
DIRECTORY_BASERELOC = 5
DIRECTORY_TLS = 9
DIRECTORY_LOAD_CONFIG = 10
DIRECTORY_IAT = 12

#: offset of ImageBase in the PE32+ optional header (the loader rewrites it when it maps elsewhere)
OPTIONAL_IMAGE_BASE = 24
_OPTIONAL_MIN = 112  # the PE32+ optional header up to NumberOfRvaAndSizes
_MAX_SECTIONS = 96


@dataclass(frozen=True)
class SectionHeader:
    """One section table entry, as the file says it."""

    name: str
    virtual_size: int
    rva: int
    raw_size: int
    raw_offset: int
    characteristics: int


@dataclass(frozen=True)
class PEHeaders:
    """What the headers of a PE32+ x86-64 image say; offsets are from the start of the image."""

    pe_offset: int
    machine: int
    timedatestamp: int
    optional_offset: int
    optional_size: int
    entry_rva: int
    image_base: int
    section_alignment: int
    size_of_image: int
    size_of_headers: int
    checksum: int
    #: NumberOfRvaAndSizes as declared (``directories`` holds that many (rva, size) pairs)
    directory_count: int
    directories: tuple[tuple[int, int], ...]
    #: the section table in file order
    sections: tuple[SectionHeader, ...]

    def directory(self, index: int) -> tuple[int, int]:
        """(RVA, size) of data directory ``index``; (0, 0) when the header declares fewer."""
        return self.directories[index] if index < len(self.directories) else (0, 0)


def read_file_headers(data: bytes, label: str) -> PEHeaders:
    """The headers of an image file held in ``data`` (messages name the file's size)."""
    return read_headers(lambda offset, size: data[offset:offset + size], label, len(data))


def read_headers(read: Read, label: str, size: int | None = None) -> PEHeaders:
    """Read and check the headers through ``read``; ``size``, when known, is the whole length."""
    known = f" ({size} bytes)" if size is not None else ""
    dos = read(0, 0x40)
    if len(dos) < 2 or dos[:2] != b"MZ":
        raise NotPEError(f"{label}: not a PE file (no MZ signature)")
    if len(dos) < 0x40:
        raise TruncatedImageError(f"{label}: truncated DOS header ({len(dos)} bytes)")
    (pe,) = struct.unpack_from("<I", dos, 0x3C)
    coff = read(pe, 24)
    if len(coff) < 24:
        raise TruncatedImageError(f"{label}: truncated: PE header at {pe:#x} is past the end{known}")
    if coff[:4] != b"PE\0\0":
        raise NotPEError(f"{label}: not a PE file (no PE signature at {pe:#x})")
    machine, section_count, timedatestamp, _, _, optional_size, _ = struct.unpack_from("<HHIIIHH", coff, 4)
    optional = pe + 24
    magic_bytes = read(optional, 2)
    if len(magic_bytes) < 2:
        raise TruncatedImageError(f"{label}: truncated optional header")
    (magic,) = struct.unpack("<H", magic_bytes)
    arch = MACHINE_NAMES.get(machine, hex(machine))
    if magic == MAGIC_PE32:
        raise NotPE32PlusError(f"{label}: PE32 ({arch}) image; only PE32+ x86-64 is supported")
    if magic != MAGIC_PE32_PLUS:
        raise CorruptImageError(f"{label}: unknown optional header magic {magic:#x}")
    if machine != MACHINE_AMD64:
        raise UnsupportedArchitectureError(f"{label}: {arch} image; only PE32+ x86-64 is supported")
    header = read(optional, optional_size) if optional_size >= _OPTIONAL_MIN else b""
    if len(header) < max(optional_size, _OPTIONAL_MIN):
        raise TruncatedImageError(f"{label}: truncated optional header ({optional_size} bytes declared)")
    entry_rva, = struct.unpack_from("<I", header, 16)
    image_base, section_alignment = struct.unpack_from("<QI", header, OPTIONAL_IMAGE_BASE)
    size_of_image, size_of_headers, checksum = struct.unpack_from("<III", header, 56)
    (directory_count,) = struct.unpack_from("<I", header, 108)
    if directory_count > 16 or _OPTIONAL_MIN + 8 * directory_count > optional_size:
        raise CorruptImageError(f"{label}: corrupt data directory count {directory_count}")
    directories = tuple(struct.iter_unpack("<II", header[_OPTIONAL_MIN:_OPTIONAL_MIN + 8 * directory_count]))
    if section_count == 0 or section_count > _MAX_SECTIONS:
        raise CorruptImageError(f"{label}: corrupt section count {section_count}")
    table = read(optional + optional_size, 40 * section_count)
    if len(table) < 40 * section_count:
        raise TruncatedImageError(f"{label}: truncated section table")
    sections = tuple(
        SectionHeader(pe_name(raw[0].rstrip(b"\0")), raw[1], raw[2], raw[3], raw[4], raw[9])
        for raw in struct.iter_unpack("<8sIIIIIIHHI", table))
    return PEHeaders(pe, machine, timedatestamp, optional, optional_size, entry_rva, image_base, section_alignment,
                     size_of_image, size_of_headers, checksum, directory_count, directories, sections)


def first_page(read: Read, page: int = 0x1000) -> Read:
    """``read`` with the first page fetched once: a process's headers then cost one remote read, not five."""
    head = read(0, page)

    def cached(offset: int, size: int) -> bytes:
        if offset + size <= len(head):
            return head[offset:offset + size]
        return read(offset, size)

    return cached
