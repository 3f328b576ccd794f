"""Helpers for tests that drive the emulator backend: a modelled system DLL by name, code assembled
into a fresh executable allocation."""

from __future__ import annotations

from hotpatch.apply.backend import Module
from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.process.win32mem import PAGE_EXECUTE_READ, PAGE_READWRITE
from hotpatch.x86 import assemble


def model_module(backend: EmulatorBackend, name: str) -> Module:
    """A module the emulator maps (the image or a modelled system DLL such as ``kernel32.dll``)."""
    return next(m for m in backend.modules() if m.name == name)


def place_code(backend: EmulatorBackend, code: str, near: int = 0) -> int:
    """Assemble ``code`` into a new executable allocation; its VA."""
    va = backend.allocate_near(near, 0x1000, PAGE_READWRITE)
    backend.write(va, assemble(code, va))
    backend.protect(va, 0x1000, PAGE_EXECUTE_READ)
    return va
