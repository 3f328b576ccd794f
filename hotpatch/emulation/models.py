"""The registry of import models: which DLLs export what, and the Python that runs for it.

A model is registered for one or more DLL families:

- ``crt``: msvcrt.dll, ucrtbase.dll, vcruntime140*.dll, msvcr*.dll and the
  api-ms-win-crt-* API sets;
- ``kernel32``: kernel32.dll, kernelbase.dll and the api-ms-win-core-* API sets;
- ``ntdll``: ntdll.dll.

A model either runs Python when the CPU reaches its stub (``run``: takes a
``ModelCall``, returns rax or None to leave it) or is a few instructions of
real code (``code``) for functions that call back into the guest. The
implementations live in ``crt``, ``stdio``, ``win32`` and ``seh``; they register
themselves when first needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .machine import ModelCall

__all__ = ["FAMILIES", "Model", "code_model", "family_of", "model", "models_for", "lookup"]

FAMILIES = ("crt", "kernel32", "ntdll")
Run = Callable[["ModelCall"], "int | None"]


@dataclass(frozen=True)
class Model:
    name: str
    run: Run | None  # None: the stub's code does the work
    code: bytes = b""  # the stub's code when it is not a plain ret


_REGISTRY: dict[str, dict[str, Model]] = {family: {} for family in FAMILIES}


def family_of(dll: str) -> str | None:
    """The family of models a DLL gets, or None for a DLL the emulator knows nothing of."""
    name = dll.lower()
    if name == "ntdll.dll":
        return "ntdll"
    if name in ("kernel32.dll", "kernelbase.dll") or name.startswith("api-ms-win-core-"):
        return "kernel32"
    if (name in ("msvcrt.dll", "ucrtbase.dll", "ucrtbased.dll") or name.startswith(("vcruntime", "msvcr"))
            or name.startswith("api-ms-win-crt-")):
        return "crt"
    return None


def model(*names: str, families: Iterable[str] = ("crt",)) -> Callable[[Run], Run]:
    """Register the decorated function as the model of ``names`` in ``families``."""

    def register(run: Run) -> Run:
        for family in families:
            for name in names:
                _REGISTRY[family][name] = Model(name, run)
        return run

    return register


def code_model(name: str, asm: str, families: Iterable[str] = ("crt",)) -> None:
    """Register a model implemented by x86-64 code (position independent), assembled with keystone."""
    import keystone

    encoding, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64).asm(asm, 0)
    for family in families:
        _REGISTRY[family][name] = Model(name, None, bytes(encoding))


@lru_cache(maxsize=1)
def _load() -> None:
    from . import crt, seh, stdio, win32  # noqa: F401 - they register their models on import


def models_for(family: str | None) -> list[Model]:
    """Every model of ``family``, in a stable order."""
    if family is None:
        return []
    _load()
    return [_REGISTRY[family][name] for name in sorted(_REGISTRY[family])]


def lookup(family: str | None, name: str) -> Model | None:
    if family is None:
        return None
    _load()
    return _REGISTRY[family].get(name)
