"""The emulator backend: a ProcessBackend over a Unicorn-emulated Windows x64 process.

``EmulatorBackend.load(path)`` maps a PE image the way the Windows loader
does, at a base other than its preferred one by default (sections with their
protections, DIR64 relocations, imports bound to model DLLs, TLS), and the
backend then answers every ``ProcessBackend`` request the apply engine makes,
failing where the agent would fail and with the same error types:

- read/write/query/protect/allocate_near/free follow VirtualQueryEx and
  friends (``Win32Error`` named after the Win32 call, as the agent reports);
  ``write`` goes through page protection, as WriteProcessMemory after
  VirtualProtectEx does;
- ``commit`` checks every write's expected bytes first (``BytesMismatchError``
  and nothing written) and writes them all; no thread runs between requests,
  so nothing is suspended and the pause is zero;
- ``remote_call`` runs the function in the emulated thread: the engine's
  calls of RtlAddFunctionTable, LoadLibraryA and GetProcAddress reach the
  models in ``hotpatch.emulation``.

Beyond the interface, the backend calls functions for ``hotpatch.calls``
(``run``) and allocates on the emulated C heap (``heap_allocate``).
``load_process`` maps an image with other DLLs of its program: those it
imports before it, the ones that import it (a driver, a probe) after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unicorn import UC_PROT_READ

from ..emulation.catalog import new_machine
from ..emulation.loader import load_image
from ..emulation.machine import DEFAULT_INSTRUCTION_LIMIT, LoadedModule
from ..emulation.space import (
    ERROR_INVALID_ADDRESS,
    ERROR_PARTIAL_COPY,
    check_protection,
    win32_error,
)
from ..errors import BackendError, BytesMismatchError, EmulationError
from ..image import Image
from ..win32mem import MEM_PRIVATE, Region
from .backend import REL32_REACH, CommitReport, CommitWrite, Module, ProcessBackend, ThreadSnapshot

__all__ = ["DEFAULT_INSTRUCTION_LIMIT", "EmulatorBackend", "RunResult"]

MAX_REGION_SIZE = 1 << 40
MAX_DISTANCE = 0x80000000
ALLOCATION_LABEL = "allocate_near"


@dataclass(frozen=True)
class RunResult:
    """One guest call: rax, and the memory it wrote in watched ranges as (VA, before, after) runs."""

    rax: int
    writes: tuple[tuple[int, bytes, bytes], ...]


class EmulatorBackend(ProcessBackend):
    """An emulated process holding one or more mapped images (see the module docstring)."""

    def __init__(self, instruction_limit: int = DEFAULT_INSTRUCTION_LIMIT) -> None:
        self.machine = new_machine(instruction_limit)
        self.pid = self.machine.pid
        self._watches: dict[int, int] = {}  # allocation base -> write-watch handle
        self._main: str | None = None  # the image under test, when it is not the first one loaded
        self._closed = False

    @classmethod
    def load(
        cls,
        image_or_path: Image | str | Path,
        base: int | None = None,
        *,
        run_dllmain: bool = False,
        instruction_limit: int = DEFAULT_INSTRUCTION_LIMIT,
    ) -> EmulatorBackend:
        """A new emulated process with ``image_or_path`` mapped (at ``base``, else away from its preferred base).

        With ``run_dllmain`` its TLS callbacks and DllMain run for DLL_PROCESS_ATTACH.
        """
        backend = cls(instruction_limit)
        backend.load_module(image_or_path, base, run_dllmain=run_dllmain)
        return backend

    @classmethod
    def load_process(
        cls,
        image_or_path: Image | str | Path,
        companions: Sequence[Image | str | Path] = (),
        *,
        name: str | None = None,
        instruction_limit: int = DEFAULT_INSTRUCTION_LIMIT,
    ) -> EmulatorBackend:
        """A process holding ``image_or_path`` (its ``main_module``, mapped as ``name``) and other DLLs.

        Each image is mapped after the companions it imports, directly or
        through each other (matched by file name, case aside), so its imports
        bind to them rather than to model DLLs; a companion that imports the
        image comes after it. Companions are mapped by their file names.
        """
        image = _image(image_or_path)
        main = (name or Path(image.path or "image.dll").name).lower()
        images = {main: image}
        for companion in map(_image, companions):
            images.setdefault(Path(companion.path or "").name.lower(), companion)
        order: list[str] = []

        def visit(key: str, path: tuple[str, ...]) -> None:
            if key in order or key in path:  # mapped already, or an import cycle (Windows breaks it the same way)
                return
            for entry in images[key].imports:
                if entry.dll.lower() in images:
                    visit(entry.dll.lower(), (*path, key))
            order.append(key)

        for key in images:
            visit(key, ())
        backend = cls(instruction_limit)
        for key in order:
            backend.load_module(images[key], name=name if key == main and name else None)
        backend._main = main
        return backend

    # ── modules ─────────────────────────────────────────────────────────

    def load_module(
        self,
        image_or_path: Image | str | Path,
        base: int | None = None,
        *,
        name: str | None = None,
        run_dllmain: bool = False,
    ) -> Module:
        """Map another image; its imports bind to images loaded before it, else to model DLLs."""
        self._check_open()
        loaded = load_image(self.machine, _image(image_or_path), base, name, run_dllmain)
        return _module(loaded)

    def provide_imports(self, imports: Iterable[tuple[str, str]]) -> None:
        """Make model DLLs export these (DLL, function) pairs, as the real DLLs would.

        A model DLL exports what the emulator models and what the images
        loaded so far import. A patch package may import more (``hotpatch
        verify`` passes its imports here before applying it): unmodelled ones
        get a stub that stops the emulation with a clear error only if called.
        """
        self._check_open()
        for dll, name in imports:
            loaded = self.machine.module_named(dll)
            if loaded is None or loaded.image is None:
                self.machine.model_export(dll, name)

    def main_module(self) -> Module:
        """The image under test: the first image loaded, or the one ``load_process`` was given."""
        if not self.machine.images:
            raise BackendError("no image is loaded in the emulator")
        main = self.machine.module_named(self._main) if self._main else None
        return _module(main if main is not None else self.machine.images[0])

    def image_of(self, module: Module | str) -> Image:
        """The parsed image behind a mapped module (not a model DLL)."""
        name = module if isinstance(module, str) else module.name
        loaded = self.machine.module_named(name)
        if loaded is None or loaded.image is None:
            raise BackendError(f"{name} is not an image mapped in the emulator")
        return loaded.image

    def modules(self) -> list[Module]:
        """The mapped images in load order, then the model DLLs."""
        self._check_open()
        return [_module(m) for m in self.machine.modules()]

    def images(self) -> list[Module]:
        """The mapped images (not the model DLLs), in load order."""
        self._check_open()
        return [_module(m) for m in self.machine.images]

    # ── memory ──────────────────────────────────────────────────────────

    def read(self, va: int, size: int) -> bytes:
        self._check_open()
        if size <= 0:
            raise ValueError("read size must be positive")
        if not self.machine.space.pages_allow(va, size, UC_PROT_READ):
            raise win32_error("ReadProcessMemory", ERROR_PARTIAL_COPY, f"{size} bytes at {va:#x} (0 read)")
        return bytes(self.machine.uc.mem_read(va, size))

    def write(self, va: int, data: bytes) -> None:
        self._check_open()
        if not data:
            raise ValueError("nothing to write")
        if not self.machine.space.committed(va, len(data)):
            raise win32_error("VirtualProtectEx", ERROR_INVALID_ADDRESS,
                              f"making {len(data):#x} bytes at {va:#x} writable")
        self.machine.poke(va, data)  # through page protection, and the translation cache is flushed

    def query(self, va: int) -> Region:
        self._check_open()
        return self.machine.space.query(va)

    def allocate_near(self, va: int, size: int, protect: int, reach: int = REL32_REACH) -> int:
        self._check_open()
        if size <= 0 or size > MAX_REGION_SIZE:
            raise BackendError(f"allocation size {size:#x} out of range")
        reach = reach or REL32_REACH
        if reach > MAX_DISTANCE:
            raise BackendError(f"max_distance {reach:#x} above 2 GiB")
        check_protection(protect, "VirtualAllocEx")
        space = self.machine.space
        base = space.find_anywhere(size) if va == 0 else space.find_near(va, size, reach)
        if base is None:
            where = "anywhere" if va == 0 else f"within {reach:#x} of {va:#x}"
            raise BackendError(f"NO_SPACE: no free {size:#x} bytes {where}")
        allocation = space.map(base, size, protect, MEM_PRIVATE, ALLOCATION_LABEL)
        self._watches[base] = self.machine.watch(base, allocation.end)
        return base

    def free(self, va: int) -> None:
        self._check_open()
        allocation = self.machine.space.allocation_at(va)
        if allocation is None or allocation.base != va or allocation.label not in (ALLOCATION_LABEL, "VirtualAlloc"):
            raise win32_error("VirtualFreeEx", ERROR_INVALID_ADDRESS, f"address {va:#x}")
        if va in self._watches:
            self.machine.unwatch(self._watches.pop(va))
        self.machine.space.unmap(va)

    def protect(self, va: int, size: int, protect: int) -> int:
        self._check_open()
        if size <= 0 or size > MAX_REGION_SIZE:
            raise BackendError(f"PROTECT size {size:#x} out of range")
        old = self.machine.space.set_protection(va, size, protect)
        self.machine.uc.ctl_remove_cache(va, va + size)
        return old

    def flush(self, va: int, size: int) -> None:
        self._check_open()
        if size:
            self.machine.uc.ctl_remove_cache(va, va + size)

    # ── execution ───────────────────────────────────────────────────────

    def remote_call(self, function_va: int, arg: int, timeout: float = 10.0, wait: bool = True) -> int:
        """Run ``function_va(arg)`` as a thread would; its 32-bit exit code (the thread id without ``wait``).

        The emulated process has one thread and nothing runs between
        requests, so the call always completes before this returns.
        """
        self._check_open()
        result = self.machine.call(function_va, [arg], timeout=timeout)
        return result & 0xFFFFFFFF if wait else self.machine.thread_id

    def run(self, function_va: int, args: Sequence[int] = (), *, timeout: float | None = None) -> RunResult:
        """Call ``function_va(*args)`` and record what it wrote in module data and allocations."""
        self._check_open()
        self.machine.start_recording()
        try:
            rax = self.machine.call(function_va, args, timeout=timeout)
        finally:
            writes = self.machine.stop_recording()
        return RunResult(rax, tuple(writes))

    def heap_allocate(self, data: bytes | int) -> int:
        """A block of the emulated C heap holding ``data`` (or that many zero bytes)."""
        self._check_open()
        content = bytes(data)
        va = self.machine.heap.allocate(len(content))
        if va is None:
            raise EmulationError(f"the emulated heap has no room for {len(content)} bytes")
        self.machine.poke(va, content)
        return va

    def heap_free(self, va: int, missing_ok: bool = False) -> None:
        """Free a block from ``heap_allocate`` (``missing_ok``: the guest may have freed it already)."""
        if not self.machine.heap.release(va) and not missing_ok:
            raise EmulationError(f"{va:#x} is not a live block of the emulated heap")

    @property
    def function_tables(self) -> dict[int, tuple[int, int]]:
        """Tables registered with RtlAddFunctionTable: table VA -> (entry count, base VA)."""
        return dict(self.machine.function_tables)

    @property
    def output(self) -> bytes:
        """What the guest printed (stdout, stderr, OutputDebugString), in order."""
        return b"".join(self.machine.output)

    # ── the commit ──────────────────────────────────────────────────────

    def commit(self, writes: Sequence[CommitWrite], max_attempts: int = 50, retry_sleep_ms: int = 2) -> CommitReport:
        """Check every write's expected bytes, then write them all; no thread runs, so none is suspended."""
        self._check_open()
        started = time.perf_counter()
        if not writes:
            raise ValueError("a commit needs at least one write")
        ordered = sorted(writes, key=lambda w: w.va)
        for before, after in zip(ordered, ordered[1:]):
            if before.va + len(before.new) > after.va:
                raise BackendError(f"writes overlap at {after.va:#x}")
        for index, w in enumerate(writes):
            if not self.machine.space.committed(w.va, len(w.new)):
                raise win32_error("ReadProcessMemory", ERROR_PARTIAL_COPY, f"{len(w.new)} bytes at {w.va:#x}")
            found = bytes(self.machine.uc.mem_read(w.va, len(w.expected)))
            if found != w.expected:
                raise BytesMismatchError(f"write {index}: the {len(w.new)} bytes at {w.va:#x} are not the expected "
                                         f"ones (found {found.hex()})", w.va, found)
        for w in writes:
            self.machine.poke(w.va, w.new)
        total_us = (time.perf_counter() - started) * 1e6
        return CommitReport(pause_us=0.0, total_us=total_us, attempts=1, suspended=False, threads=0)

    def suspend_resume_floor(self) -> CommitReport:
        self._check_open()
        return CommitReport(pause_us=0.0, total_us=0.0, attempts=1, suspended=False, threads=0)

    def thread_contexts(self, watch_va: int = 0, watch_size: int = 0) -> ThreadSnapshot:
        """No thread is running between requests: nothing is on any stack."""
        self._check_open()
        return ThreadSnapshot(0.0, ())

    def process_start_time(self) -> int:
        return self.machine.start_time

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"emulated process {self.pid}: backend already closed")


def _image(image_or_path: Image | str | Path) -> Image:
    return image_or_path if isinstance(image_or_path, Image) else Image.load(image_or_path)


def _module(loaded: LoadedModule) -> Module:
    preferred = loaded.image.image_base if loaded.image is not None else None
    return Module(loaded.name, loaded.path, loaded.base, loaded.size, preferred)
