"""x86-64 facts every stage shares: the 64-bit word mask, and the one place capstone and keystone are set up.

``disassembler()`` decodes text and lengths (``disasm_lite``);
``disassembler(detail=True)`` also operands, registers and groups, which
costs several times more. ``assemble(text, va)`` is keystone's 64-bit mode.
The instances are made once per thread and mode: a capstone or keystone
handle must not be shared between threads (batch and rollout workers run
jobs on threads), and making one per call costs more than the call.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import capstone

__all__ = ["MASK64", "assemble", "assembler", "capstone_symbol", "disassembler"]

#: An unsigned 64-bit register or memory word.
MASK64 = (1 << 64) - 1

_local = threading.local()


def capstone_symbol(name: str, module: str) -> int:
    """The address of libcapstone's C function ``name``, for the compiled modules (``module``) that call the
    C API directly; they are built for capstone 5.0."""
    lib = _libcapstone()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.cs_version(ctypes.byref(major), ctypes.byref(minor))
    if (major.value, minor.value) != (5, 0):
        raise ImportError(f"{module} was built for capstone 5.0, found libcapstone {major.value}.{minor.value}")
    address = ctypes.cast(getattr(lib, name, None), ctypes.c_void_p).value
    if not address:
        raise ImportError(f"libcapstone has no {name}")
    return int(address)


_LIBRARY = {"darwin": "libcapstone.dylib", "win32": "capstone.dll", "cygwin": "capstone.dll"}.get(
    sys.platform, "libcapstone.so")


@functools.cache
def _libcapstone() -> ctypes.CDLL:
    """The libcapstone the Python binding would load first (``$LIBCAPSTONE_PATH``, then the wheel's own lib/),
    opened without importing the binding: its import sets up every architecture's constants, a third of
    ``hotpatch functions`` on a small DLL. Anywhere else, the binding's own search finds it."""
    spec = importlib.util.find_spec("capstone")
    folders = [os.environ.get("LIBCAPSTONE_PATH")]
    folders += [str(Path(f) / "lib") for f in (spec.submodule_search_locations or [])] if spec else []
    for folder in filter(None, folders):
        path = Path(folder) / _LIBRARY
        if path.is_file():
            return ctypes.CDLL(str(path))
    import capstone

    return capstone._cs


def disassembler(detail: bool = False) -> capstone.Cs:
    """This thread's 64-bit capstone instance, with or without instruction details."""
    key = "cs_detail" if detail else "cs_lite"
    md = getattr(_local, key, None)
    if md is None:
        import capstone

        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        md.detail = detail
        setattr(_local, key, md)
    return md


def assembler() -> Any:  # keystone has no type stubs
    """This thread's 64-bit keystone instance (Intel syntax)."""
    ks = getattr(_local, "ks", None)
    if ks is None:
        import keystone  # only the builder, the backends and code models assemble: import on first use

        ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
        _local.ks = ks
    return ks


def assemble(text: str, va: int = 0) -> bytes:
    """The machine code of ``text`` placed at ``va`` (rel32 operands are computed from it)."""
    encoding, _ = assembler().asm(text, va)
    return bytes(encoding or b"")  # keystone answers None for empty text
