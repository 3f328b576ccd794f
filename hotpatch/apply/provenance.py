"""What the journal claims, checked against the kept package and the target's memory.

The journal is a file on the host: whoever can edit it could otherwise make
``rollback`` write bytes of their choosing into the target ("restore these
original bytes"), or make ``recover`` free a region the process is using
("this allocation is ours, retained"). So before anything is written or freed
because of a record:

- the package the record names is read back from the copy kept beside the
  journal, and must hash to the record's ``package_sha256``;
- the module must be loaded at the record's base with the package's identity;
- the allocation must be one region whose base, size and per-part protection
  are those the package's layout gives, holding the marker the engine wrote
  into it at apply time (``region_marker``: the package's content hash, the
  region's address and the process's start time, so a marker copied from
  another process or region does not pass);
- the sites, and so every byte a rollback writes (original and redirect),
  are derived again from the package, the module base and the allocation,
  and must equal the journal's; the function table and the libraries must
  be where the package's layout and the process's module list put them.

Anything else raises ``JournalError`` before the first write.
"""

from __future__ import annotations

import struct

from ..errors import BackendError, IdentityMismatchError, JournalError, ProcessGoneError
from ..package.format import content_sha256_of
from ..package.model import ImportTarget, Package
from ..process.win32mem import PAGE_READWRITE
from .backend import ProcessBackend
from .imports import normalise_dll
from .journal import ALLOCATED, INTENT, LOADED, REGISTERED, RETAINED, PackageRecord
from .redirects import SiteRedirect, plan_site
from .region import Layout
from .status import check_identity, read_image

__all__ = ["MARKER_MAGIC", "MARKER_SIZE", "check_allocation", "check_libraries", "derive_sites", "region_marker"]

MARKER_MAGIC = b"hotpatch.region\x01"
MARKER_SIZE = 64


def region_marker(content_sha256: bytes, base_va: int, start_time: int) -> bytes:
    """The 64 bytes written at the start of a package's read-only part: magic, package hash, where, whose."""
    return MARKER_MAGIC + content_sha256 + struct.pack("<QQ", base_va, start_time)


def _refuse(record: PackageRecord, why: str) -> JournalError:
    return JournalError(f"journal record of package {record.package_id} refused: {why}; nothing was changed")


def check_allocation(backend: ProcessBackend, record: PackageRecord, package: Package, layout: Layout,
                     start_time: int) -> None:
    """The record's allocation is the region we made for this package in this process (see the docstring)."""
    allocation = record.allocation
    size, parts = layout.size, layout.parts
    if allocation is None or allocation.state not in (ALLOCATED, RETAINED):
        raise _refuse(record, "it has no allocation to check")
    va = allocation.va
    if allocation.size != size:
        raise _refuse(record, f"allocation size {allocation.size:#x}, the package's layout needs {size:#x}")
    try:
        for part in parts:
            region = backend.query(va + part.offset)
            if region.allocation_base_va != va or not region.is_committed:
                raise _refuse(record, f"{va + part.offset:#x} is not inside an allocation at {va:#x}")
            if region.protect not in (part.protect, PAGE_READWRITE) or region.base_va + region.size < va + part.offset:
                raise _refuse(record, f"{part.name} at {va + part.offset:#x} has protection {region.protect:#x}")
        after = backend.query(va + size)
        if after.allocation_base_va == va and not after.is_free:
            raise _refuse(record, f"the allocation at {va:#x} is larger than {size:#x} bytes")
        marker = backend.read(va + layout.marker_offset, MARKER_SIZE)
    except ProcessGoneError:
        raise
    except BackendError as exc:
        raise _refuse(record, f"the allocation at {va:#x} cannot be read back ({exc})") from None
    if marker != region_marker(content_sha256_of(package), va, start_time):
        raise _refuse(record, f"the region at {va:#x} does not hold our marker for this package and process")
    table = record.function_table
    if table is not None and table.state in (INTENT, REGISTERED):
        wanted = (va + layout.table_offset, layout.table_count, va)
        if (table.va, table.count, table.base) != wanted:
            raise _refuse(record, f"function table at {table.va:#x}, the package's layout puts it at {wanted[0]:#x}")


def check_libraries(backend: ProcessBackend, record: PackageRecord, package: Package) -> None:
    """Each library the record would free is one the package imports, loaded where the record says."""
    imported = {normalise_dll(f.target.dll) for f in package.fixups if isinstance(f.target, ImportTarget)}
    loaded = [lib for lib in record.libraries if lib.state == LOADED]
    if not loaded:
        return
    modules = {(normalise_dll(m.name), m.base_va) for m in backend.modules()}
    for library in loaded:
        dll = normalise_dll(library.dll)
        if dll not in imported or (dll, library.hmodule) not in modules:
            raise _refuse(record, f"library {library.dll} at {library.hmodule:#x} is not one the package loaded")


def derive_sites(
    backend: ProcessBackend, record: PackageRecord, package: Package, layout: Layout
) -> list[SiteRedirect]:
    """The record's redirects, derived again from the package; they must equal the journal's."""
    allocation = record.allocation
    if allocation is None:
        raise _refuse(record, "it has no allocation")
    module = next((m for m in backend.modules()
                   if m.name.lower() == record.module_name.lower() and m.base_va == record.module_base), None)
    if module is None:
        raise _refuse(record, f"{record.module_name} is not loaded at {record.module_base:#x}")
    try:
        check_identity(read_image(backend, module), package.target)
    except IdentityMismatchError as exc:
        raise _refuse(record, str(exc)) from None
    offsets = layout.blob_offsets
    sites = [plan_site(site, module.base_va, allocation.va + offsets[site.target_blob] + site.target_offset)
             for site in package.sites]
    if sites != record.sites:
        raise _refuse(record, "its sites are not the ones the package gives at this module base and allocation")
    return sites
