"""What the target's memory says: a loaded module's identity, and the state of each patch site.

The identity is read from the module's own headers in the target
(TimeDateStamp, SizeOfImage, CheckSum), never from a file on disk, which may
have been replaced since the process loaded it. The code SHA-256 is the one
``Image.identity`` computes over the file's executable sections; in memory
those bytes differ where the loader applied base relocations, so they are
reverted first with the module's own relocation table and the delta between
its actual base and its preferred one. Wine leaves the ImageBase field of the
header alone; Windows may rewrite it when it relocates an image, and so does
the emulator. A backend that mapped the file itself (the emulator) knows the
preferred base from that file and says so in ``Module.preferred_base``; only
that base is used then. Otherwise the package does not carry the preferred
base, so when the header's base does not explain the code, the usual default
bases are tried too. A module that still
does not match is refused. Code our own journal says we patched is put back
to its original bytes before hashing.

A site is "original" when every byte a redirect would change holds the
original, "ours" when it holds exactly the journaled redirect, and "foreign"
otherwise.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, IdentityMismatchError, ImageError, ProcessGoneError
from ..package.model import TargetIdentity
from ..pe.headers import DIRECTORY_BASERELOC, DIRECTORY_IAT, first_page, read_headers
from .backend import Module, ProcessBackend
from .journal import RETAINED, ProcessJournal
from .redirects import Patch, SiteRedirect

__all__ = [
    "CODE_HASH_LIMIT",
    "COMMON_BASES",
    "CodeHash",
    "LoadedImage",
    "PackageStatus",
    "ProcessStatus",
    "SiteState",
    "check_identity",
    "code_sha256",
    "process_status",
    "read_image",
    "site_state",
]

#: executable bytes above which the code hash is not computed (one read per section)
CODE_HASH_LIMIT = 64 << 20
#: preferred bases tried when the header's does not explain relocated code (MSVC DLL, MSVC EXE, old DLL, old EXE)
COMMON_BASES = (0x180000000, 0x140000000, 0x10000000, 0x400000)

_SCN_CNT_CODE = 0x20
_SCN_MEM_EXECUTE = 0x20000000
_REL_ABSOLUTE, _REL_HIGHLOW, _REL_DIR64 = 0, 3, 10

ORIGINAL, OURS, FOREIGN = "original", "ours", "foreign"


@dataclass(frozen=True)
class LoadedSection:
    name: str
    rva: int
    virtual_size: int
    raw_size: int
    characteristics: int

    @property
    def end_rva(self) -> int:  # as hotpatch.image.Section.end_rva
        return self.rva + max(self.virtual_size, self.raw_size if self.virtual_size == 0 else 0)

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & (_SCN_MEM_EXECUTE | _SCN_CNT_CODE))


@dataclass(frozen=True)
class LoadedImage:
    """A module's PE headers as they are in the target's memory."""

    module: Module
    timedatestamp: int
    size_of_image: int
    checksum: int
    header_image_base: int
    sections: tuple[LoadedSection, ...]
    reloc_rva: int
    reloc_size: int
    iat_rva: int
    iat_size: int

    @property
    def base_va(self) -> int:
        return self.module.base_va

    def identity_json(self) -> dict[str, Any]:
        return {
            "module": self.module.name,
            "base": self.base_va,
            "timedatestamp": self.timedatestamp,
            "size_of_image": self.size_of_image,
            "checksum": self.checksum,
        }


def read_image(backend: ProcessBackend, module: Module) -> LoadedImage:
    """Parse ``module``'s headers from the target's memory."""
    what = f"{module.name} at {module.base_va:#x}"
    try:
        headers = read_headers(first_page(lambda offset, size: backend.read(module.base_va + offset, size)), what)
    except ImageError as exc:
        raise BackendError(f"{what}: no PE32+ x86-64 header in memory ({exc})") from None
    sections = [LoadedSection(s.name, s.rva, s.virtual_size, s.raw_size, s.characteristics) for s in headers.sections]
    return LoadedImage(
        module, headers.timedatestamp, headers.size_of_image, headers.checksum, headers.image_base, tuple(sections),
        *headers.directory(DIRECTORY_BASERELOC), *headers.directory(DIRECTORY_IAT),
    )


def check_identity(image: LoadedImage, identity: TargetIdentity) -> None:
    """Refuse unless the loaded module's headers are the package's baseline's."""
    found = (image.timedatestamp, image.size_of_image, image.checksum)
    wanted = (identity.timedatestamp, identity.size_of_image, identity.checksum)
    if found != wanted:
        names = ("TimeDateStamp", "SizeOfImage", "CheckSum")
        diffs = [f"{n} {f:#x} (package {w:#x})" for n, f, w in zip(names, found, wanted) if f != w]
        raise IdentityMismatchError(
            f"{image.module.name} at {image.base_va:#x} is not the package's baseline: " + ", ".join(diffs)
        )


@dataclass(frozen=True)
class CodeHash:
    """The outcome of the code hash check: "verified", "mismatch" or "skipped" (with why)."""

    state: str
    sha256: str | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "sha256": self.sha256, "note": self.note}


def code_sha256(
    backend: ProcessBackend, image: LoadedImage, wanted: bytes, ours: Iterable[Patch] = ()
) -> CodeHash:
    """Hash the module's executable sections as the file holds them and compare with ``wanted``."""
    code = [s for s in image.sections if s.executable]
    total = sum(s.end_rva - s.rva for s in code)
    if total > CODE_HASH_LIMIT:
        return CodeHash("skipped", note=f"{total} bytes of code, above the {CODE_HASH_LIMIT} byte limit")
    if image.iat_size and any(s.rva < image.iat_rva + image.iat_size and image.iat_rva < s.end_rva for s in code):
        return CodeHash("skipped", note="the import address table lies in an executable section")
    memory = {
        s.rva: bytes(backend.read(image.base_va + s.rva, s.end_rva - s.rva)) for s in code if s.end_rva > s.rva
    }
    patched = {rva: bytearray(data) for rva, data in memory.items()}
    for patch in ours:  # our own redirects go back to the original bytes
        _overlay(patched, code, patch.va - image.base_va, patch.original)
    slots = _relocations_in(backend, image, code)
    if slots is None:
        return CodeHash("skipped", note="unsupported base relocation type in code")
    # The preferred base: the file's when the backend mapped the file itself and knows it; else the header's,
    # unless the loader rewrote it; then a usual default.
    if image.module.preferred_base is not None:
        bases = [image.module.preferred_base]
    else:
        bases = [image.header_image_base] + ([b for b in COMMON_BASES if b != image.header_image_base] if slots else [])
    found = ""
    for preferred in bases:
        found = _digest(patched, code, slots, image.base_va - preferred)
        if found == wanted.hex():
            note = f"{len(slots)} relocated slots reverted for base {preferred:#x}" if slots else ""
            return CodeHash("verified", found, note)
    note = "the code in memory differs from the package's baseline"
    if slots:
        note += f" (with its {len(slots)} relocated slots reverted for base " + ", ".join(f"{b:#x}" for b in bases)
        note += ")"
    first = _digest(patched, code, slots, image.base_va - bases[0])
    return CodeHash("mismatch", first, note)


def _digest(memory: dict[int, bytearray], code: list[LoadedSection], slots: list[tuple[int, int]], delta: int) -> str:
    data = {rva: bytearray(section) for rva, section in memory.items()}
    for rva, width in slots:
        section = next(s for s in code if s.rva <= rva and rva + width <= s.end_rva)
        fmt = "<Q" if width == 8 else "<I"
        (value,) = struct.unpack_from(fmt, data[section.rva], rva - section.rva)
        struct.pack_into(fmt, data[section.rva], rva - section.rva, (value - delta) & ((1 << (8 * width)) - 1))
    digest = hashlib.sha256()
    for section in code:
        digest.update(data.get(section.rva, b""))
    return digest.hexdigest()


def _overlay(memory: dict[int, bytearray], code: list[LoadedSection], rva: int, data: bytes) -> None:
    for i, byte in enumerate(data):
        for section in code:
            if section.rva <= rva + i < section.end_rva and section.rva in memory:
                memory[section.rva][rva + i - section.rva] = byte


def _relocations_in(
    backend: ProcessBackend, image: LoadedImage, code: list[LoadedSection]
) -> list[tuple[int, int]] | None:
    """(rva, width) of every relocated slot inside an executable section; None if a type is unsupported."""
    if not image.reloc_size or image.reloc_rva + image.reloc_size > image.size_of_image:
        return []
    table = backend.read(image.base_va + image.reloc_rva, image.reloc_size)
    slots = []
    offset = 0
    while offset + 8 <= len(table):
        page, block_size = struct.unpack_from("<II", table, offset)
        if block_size < 8 or offset + block_size > len(table):
            break
        for (entry,) in struct.iter_unpack("<H", table[offset + 8 : offset + block_size]):
            kind, rva = entry >> 12, page + (entry & 0xFFF)
            if kind == _REL_ABSOLUTE:
                continue
            width = {_REL_DIR64: 8, _REL_HIGHLOW: 4}.get(kind)
            inside = any(s.rva <= rva < s.end_rva for s in code)
            if width is None:
                if inside:
                    return None
                continue
            if inside:
                slots.append((rva, width))
        offset += block_size
    return slots


@dataclass(frozen=True)
class SiteState:
    """One site of a journaled package, as found in memory."""

    rva: int
    function: str
    strategy: str
    state: str  # original | ours | foreign
    found: str  # hex of the bytes found where the redirect goes

    def to_json(self) -> dict[str, Any]:
        return {
            "rva": self.rva,
            "function": self.function,
            "strategy": self.strategy,
            "state": self.state,
            "found": self.found,
        }


def site_state(backend: ProcessBackend, site: SiteRedirect) -> SiteState:
    found = [backend.read(patch.va, len(patch.redirect)) for patch in site.patches]
    if all(f == p.redirect for f, p in zip(found, site.patches)):
        state = OURS
    elif all(f == p.original for f, p in zip(found, site.patches)):
        state = ORIGINAL
    else:
        state = FOREIGN
    return SiteState(site.rva, site.function, site.strategy.name, state, " ".join(f.hex() for f in found))


@dataclass(frozen=True)
class PackageStatus:
    package_id: str
    baseline_id: str
    sequence: int
    module: str
    module_base: int
    phase: str
    allocation: str
    sites: tuple[SiteState, ...]

    @property
    def state(self) -> str:
        """ours / original / foreign for the whole package ("mixed" when sites disagree)."""
        states = {s.state for s in self.sites}
        return states.pop() if len(states) == 1 else ("mixed" if states else "empty")

    def to_json(self) -> dict[str, Any]:
        return {
            "package_id": self.package_id,
            "baseline_id": self.baseline_id,
            "sequence": self.sequence,
            "module": self.module,
            "module_base": self.module_base,
            "phase": self.phase,
            "allocation": self.allocation,
            "state": self.state,
            "sites": [s.to_json() for s in self.sites],
        }


@dataclass(frozen=True)
class ProcessStatus:
    pid: int
    start_time: int
    packages: tuple[PackageStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "packages": [p.to_json() for p in self.packages]}


def process_status(backend: ProcessBackend, journal: ProcessJournal) -> ProcessStatus:
    """The journal's live packages (and retained code) in ``backend``'s process, each site read from memory."""
    packages = []
    for record in journal.records:
        retained = record.allocation is not None and record.allocation.state == RETAINED
        if not (record.live or retained):
            continue
        sites = []
        for site in record.sites:
            try:
                sites.append(site_state(backend, site))
            except ProcessGoneError:
                raise
            except BackendError as exc:
                sites.append(SiteState(site.rva, site.function, site.strategy.name, "unreadable", str(exc)))
        packages.append(
            PackageStatus(
                record.package_id,
                record.baseline_id,
                record.sequence,
                record.module_name,
                record.module_base,
                record.phase,
                record.allocation.state if record.allocation else "none",
                tuple(sites),
            )
        )
    return ProcessStatus(journal.pid, journal.start_time, tuple(packages))
