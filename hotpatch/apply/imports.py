"""Resolving a package's imports (``ImportTarget``: dll!name) to addresses in the target.

A DLL the process has loaded is found in its module list by name
(case-insensitive, ".dll" implied), and the function in its export directory
as the target's memory holds it (forwarders followed). A DLL it has not
loaded is loaded with LoadLibraryA called in the target: that runs the DLL's
initialisation there, so it is done only when the apply really proceeds (not
in a dry run), it is journaled, and the reference is dropped again
(FreeLibrary) when the package is undone or rolled back. API-set names
(api-ms-win-...) are never in the module list; LoadLibraryA resolves them to
their host DLL, which only takes another reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BackendError, FixupError
from ..package.model import ImportTarget
from ..process.win32mem import PAGE_READWRITE
from .backend import Module, ProcessBackend, call_function, find_export

__all__ = ["ImportResolver", "ResolvedImport", "free_library", "normalise_dll", "system_function"]

LOAD_TIMEOUT = 60.0


def normalise_dll(name: str) -> str:
    name = name.lower()
    return name if "." in name else name + ".dll"


def find_module(backend: ProcessBackend, dll: str, modules: list[Module] | None = None) -> Module | None:
    wanted = normalise_dll(dll)
    for module in modules if modules is not None else backend.modules():
        if module.name.lower() == wanted:
            return module
    return None


def system_function(backend: ProcessBackend, name: str, dlls: tuple[str, ...] = ("kernel32.dll", "ntdll.dll")) -> int:
    """The VA of a system export, from the first of ``dlls`` that has it."""
    modules = backend.modules()
    for dll in dlls:
        module = find_module(backend, dll, modules)
        if module is None:
            continue
        try:
            return find_export(backend, module, name)
        except BackendError:
            continue
    raise FixupError(f"{name} is not exported by {' or '.join(dlls)} in process {backend.pid}")


def free_library(backend: ProcessBackend, hmodule: int) -> bool:
    """FreeLibrary(hmodule) in the target; whether it succeeded."""
    return bool(call_function(backend, system_function(backend, "FreeLibrary"), hmodule) & 0xFFFFFFFF)


@dataclass(frozen=True)
class ResolvedImport:
    dll: str
    name: str
    va: int  # 0 when the DLL is not loaded and the resolver may not load it
    module_base: int
    loaded_by_us: bool = False

    def to_json(self) -> dict[str, object]:
        return {"dll": self.dll, "name": self.name, "va": self.va, "loaded": self.loaded_by_us}


class ImportResolver:
    """Resolves ImportTargets in one process, loading missing DLLs when ``load_missing``.

    ``on_load(dll, state, hmodule)`` is called before a load ("intent") and
    after it ("loaded"), so the caller can journal it.
    """

    def __init__(
        self,
        backend: ProcessBackend,
        load_missing: bool = True,
        on_load: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.backend = backend
        self.load_missing = load_missing
        self.on_load = on_load
        self.loaded: list[tuple[str, int]] = []  # (dll, hmodule) loaded by this resolver
        self._modules: list[Module] | None = None
        self._cache: dict[tuple[str, str], ResolvedImport] = {}

    def resolve(self, target: ImportTarget) -> ResolvedImport:
        key = (normalise_dll(target.dll), target.name)
        if key not in self._cache:
            self._cache[key] = self._resolve(target)
        return self._cache[key]

    def _resolve(self, target: ImportTarget) -> ResolvedImport:
        if self._modules is None:
            self._modules = self.backend.modules()
        module = find_module(self.backend, target.dll, self._modules)
        loaded_by_us = False
        if module is None:
            if not self.load_missing:
                return ResolvedImport(target.dll, target.name, 0, 0)
            module = self._load(target.dll)
            loaded_by_us = True
        try:
            va = find_export(self.backend, module, target.name)
        except BackendError as exc:
            raise FixupError(f"import {target.dll}!{target.name}: {exc}") from None
        return ResolvedImport(target.dll, target.name, va, module.base_va, loaded_by_us)

    def _load(self, dll: str) -> Module:
        load_library = system_function(self.backend, "LoadLibraryA")
        name = dll.encode("ascii", "strict") + b"\0" if dll.isascii() else None
        if name is None:
            raise FixupError(f"import DLL name {dll!r} is not ASCII")
        if self.on_load:
            self.on_load(dll, "intent", 0)
        page = self.backend.allocate_near(0, 0x1000, PAGE_READWRITE)
        try:
            self.backend.write(page, name)
            hmodule = call_function(self.backend, load_library, page, timeout=LOAD_TIMEOUT)
        finally:
            self.backend.free(page)
        if not hmodule:
            raise FixupError(f"LoadLibraryA({dll}) failed in process {self.backend.pid}")
        self.loaded.append((dll, hmodule))
        if self.on_load:
            self.on_load(dll, "loaded", hmodule)
        self._modules = self.backend.modules()
        for module in self._modules:
            if module.base_va == hmodule:
                return module
        raise FixupError(f"LoadLibraryA({dll}) returned {hmodule:#x}, which is not in the module list")
