"""Mapping a PE32+ image into the emulated process, as the Windows loader does.

Sections get their protections (headers read-only, code execute-read,
writable data write-copy), DIR64 base relocations are applied for the
chosen base, the optional header's ImageBase is updated, imports are bound
(to an export of an image loaded earlier, else to a model DLL stub), the TLS
directory gets its index and its block, and, when asked, the TLS callbacks
and the entry point run with DLL_PROCESS_ATTACH.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import BackendError, EmulationError
from ..image import Image, Section
from ..pe.headers import DIRECTORY_TLS, OPTIONAL_IMAGE_BASE, PEHeaders, read_headers
from ..win32mem import (
    MEM_IMAGE,
    MEM_PRIVATE,
    PAGE_EXECUTE,
    PAGE_EXECUTE_READ,
    PAGE_EXECUTE_WRITECOPY,
    PAGE_NOACCESS,
    PAGE_READONLY,
    PAGE_READWRITE,
    PAGE_WRITECOPY,
)
from .machine import PROCESS_DATA_BASE, TLS_ARRAY_OFFSET, LoadedModule, Machine
from .space import GRANULE, PAGE, align_up

__all__ = ["DEFAULT_BASE_SHIFT", "load_image", "section_protection"]

#: Where an image goes by default: this far above its preferred base, so relocations are exercised.
DEFAULT_BASE_SHIFT = 0x10000000
DLL_PROCESS_ATTACH = 1
MAX_TLS_INDEX = 512
TLS_FLOOR = 0x7FFC00000000  # TLS blocks go up here, away from what the program allocates


def section_protection(section: Section) -> int:
    """The page protection the loader gives a section (writable image pages start as write-copy)."""
    r, w, x = section.readable, section.writable, section.executable
    if x:
        return PAGE_EXECUTE_WRITECOPY if w else (PAGE_EXECUTE_READ if r else PAGE_EXECUTE)
    if w:
        return PAGE_WRITECOPY
    return PAGE_READONLY if r else PAGE_NOACCESS


def default_base(machine: Machine, image: Image, size: int) -> int:
    candidate = image.image_base + DEFAULT_BASE_SHIFT
    if machine.space.is_free(candidate, size):
        return candidate
    found = machine.space.find_anywhere(size, floor=candidate)
    if found is None:
        raise BackendError(f"no room to map {image.name} ({size:#x} bytes) in the emulator")
    return found


def load_image(
    machine: Machine,
    image: Image,
    base: int | None = None,
    name: str | None = None,
    run_dllmain: bool = False,
) -> LoadedModule:
    """Map ``image`` at ``base`` (default: away from its preferred base) and bind it."""
    size = align_up(image.identity.size_of_image, PAGE)
    name = name or (Path(image.path).name if image.path else "image.dll")
    if machine.module_named(name) is not None:
        raise BackendError(f"a module named {name} is already loaded in the emulator")
    if base is None:
        base = default_base(machine, image, size)
    if base % GRANULE or not machine.space.is_free(base, size):
        raise BackendError(f"cannot map {name} at {base:#x}: not 64 KiB aligned or not free")
    memory = bytearray(image.memory.ljust(size, b"\0"))
    delta = base - image.image_base
    if delta:
        for rva in image.relocations:
            (value,) = struct.unpack_from("<Q", memory, rva)
            struct.pack_into("<Q", memory, rva, (value + delta) & 0xFFFFFFFFFFFFFFFF)
    headers = read_headers(lambda offset, size: bytes(memory[offset:offset + size]), name)
    struct.pack_into("<Q", memory, headers.optional_offset + OPTIONAL_IMAGE_BASE, base)  # the loader's rebase

    module = LoadedModule(name, image.path or name, base, size, image=image)
    for entry in image.imports:
        va = resolve_import(machine, name, entry.dll, entry.name, entry.ordinal)
        struct.pack_into("<Q", memory, entry.iat_rva, va)

    allocation = machine.space.map(base, size, PAGE_READONLY, MEM_IMAGE, name)
    allocation.allocation_protect = PAGE_EXECUTE_WRITECOPY
    machine.poke(base, bytes(memory))
    for section in image.sections:
        end = align_up(section.end_rva, PAGE)
        if end > section.rva:
            machine.space.set_protection(base + section.rva, end - section.rva, section_protection(section))
            if section.writable:
                machine.watch(base + section.rva, base + section.end_rva)
    machine.images.append(module)
    if len(machine.images) == 1:
        machine.poke(machine.peb + 0x10, base.to_bytes(8, "little"))  # PEB.ImageBaseAddress
    callbacks = _setup_tls(machine, module, memory, headers)
    if run_dllmain:
        _process_attach(machine, module, callbacks)
    return module


def resolve_import(machine: Machine, importer: str, dll: str, name: str | None, ordinal: int | None,
                   depth: int = 0) -> int:
    """The VA an import binds to: an export of a loaded image, else a model DLL stub."""
    module = machine.module_named(dll)
    if module is not None and module.image is not None:
        for export in module.image.exports:
            if (name is not None and export.name == name) or (name is None and export.ordinal == ordinal):
                if export.forwarder:
                    target_dll, _, target = export.forwarder.rpartition(".")
                    if depth > 8 or target.startswith("#"):
                        raise EmulationError(f"{dll}!{name}: forwarder {export.forwarder} cannot be followed")
                    return resolve_import(machine, importer, target_dll + ".dll", target, None, depth + 1)
                return module.base + export.rva
        symbol = name if name is not None else f"#{ordinal}"
        raise EmulationError(f"{importer} imports {dll}!{symbol}, which {module.name} does not export")
    return machine.model_export(dll, name if name is not None else f"#{ordinal}")


def _setup_tls(machine: Machine, module: LoadedModule, memory: bytearray, headers: PEHeaders) -> list[int]:
    """Give the image its TLS index and this thread its TLS block; the callback VAs."""
    tls_rva, tls_size = headers.directory(DIRECTORY_TLS)
    if not tls_rva or tls_size < 40:
        return []
    start, end, index_va, callbacks_va, zero_fill = struct.unpack_from("<QQQQI", memory, tls_rva)
    index = sum(1 for m in machine.images if m.tls_index is not None)
    if index >= MAX_TLS_INDEX:
        raise EmulationError("too many modules with TLS in the emulator")
    module.tls_index = index
    base = module.base
    template = bytes(memory[start - base : end - base]) if end > start else b""
    # its own allocation, not the C heap: heap addresses then depend only on what the program allocates
    size = len(template) + zero_fill or 1
    block = machine.space.find_anywhere(size, floor=TLS_FLOOR)
    if block is None:
        raise EmulationError("no room for a TLS block in the emulator")
    machine.space.map(block, size, PAGE_READWRITE, MEM_PRIVATE, f"TLS block of {module.name}")
    machine.poke(block, template + bytes(zero_fill))
    machine.poke(PROCESS_DATA_BASE + TLS_ARRAY_OFFSET + 8 * index, block.to_bytes(8, "little"))
    if index_va:
        machine.poke(index_va, index.to_bytes(4, "little"))
    callbacks = []
    if callbacks_va:
        at = callbacks_va
        while len(callbacks) < 64:
            (callback,) = struct.unpack("<Q", machine.read(at, 8, "TLS callbacks"))
            if not callback:
                break
            callbacks.append(callback)
            at += 8
    return callbacks


def _process_attach(machine: Machine, module: LoadedModule, callbacks: list[int]) -> None:
    for callback in callbacks:
        machine.call(callback, [module.base, DLL_PROCESS_ATTACH, 0])
    image = module.image
    if image is not None and image.entry_rva:
        result = machine.call(module.base + image.entry_rva, [module.base, DLL_PROCESS_ATTACH, 0])
        if not result & 0xFFFFFFFF:
            raise EmulationError(f"{module.name}: DllMain returned FALSE for DLL_PROCESS_ATTACH")

