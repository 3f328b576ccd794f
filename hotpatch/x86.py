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
import threading
from typing import Any

import capstone

__all__ = ["MASK64", "assemble", "assembler", "capstone_symbol", "disassembler"]

#: An unsigned 64-bit register or memory word.
MASK64 = (1 << 64) - 1

_local = threading.local()


def capstone_symbol(name: str, module: str) -> int:
    """The address of libcapstone's C function ``name`` in the library capstone's Python binding loaded, for
    the compiled modules (``module``) that call the C API directly; they are built for capstone 5.0."""
    if capstone.cs_version()[:2] != (5, 0):
        raise ImportError(f"{module} was built for capstone 5.0, found {capstone.__version__}")
    address = ctypes.cast(getattr(capstone._cs, name), ctypes.c_void_p).value
    if not address:
        raise ImportError(f"libcapstone has no {name}")
    return int(address)


def disassembler(detail: bool = False) -> capstone.Cs:
    """This thread's 64-bit capstone instance, with or without instruction details."""
    key = "cs_detail" if detail else "cs_lite"
    md = getattr(_local, key, None)
    if md is None:
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
