"""The registry of import models: which DLLs export what, and the Python that runs for it.

A model is registered for one or more DLL families:

- ``crt``: msvcrt.dll, ucrtbase.dll, vcruntime140*.dll, msvcr*.dll and the
  api-ms-win-crt-* API sets;
- ``kernel32``: kernel32.dll, kernelbase.dll and the api-ms-win-core-* API sets;
- ``ntdll``: ntdll.dll;
- ``ws2_32``: ws2_32.dll and wsock32.dll.

A model either runs Python when the CPU reaches its stub (``run``: takes a
``ModelCall``, returns rax or None to leave it) or is a few instructions of
real code (``code``) for functions that call back into the guest. The
implementations live in ``crt``, ``jumps``, ``stdio``, ``win32``, ``winsock`` and ``seh``; they register
themselves in ``REGISTRY`` when imported, and ``catalog`` hands the complete
registry to each ``Machine`` (this module imports none of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "REGISTRY", "Model", "ModelRegistry", "code_model", "family_of", "model"]

FAMILIES = ("crt", "kernel32", "ntdll", "ws2_32")
#: takes a ``machine.ModelCall`` (the machine sits above this module, so it is not named here)
Run = Callable[[Any], "int | None"]


@dataclass(frozen=True)
class Model:
    name: str
    run: Run | None  # None: the stub's code does the work
    code: bytes = b""  # the stub's code when it is not a plain ret


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
    if name in ("ws2_32.dll", "wsock32.dll"):
        return "ws2_32"
    return None


class ModelRegistry:
    """The models of each family, by export name."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, Model]] = {family: {} for family in FAMILIES}

    def add(self, family: str, model: Model) -> None:
        self._models[family][model.name] = model

    def models_for(self, family: str | None) -> list[Model]:
        """Every model of ``family``, in a stable order."""
        if family is None:
            return []
        return [self._models[family][name] for name in sorted(self._models[family])]

    def lookup(self, family: str | None, name: str) -> Model | None:
        if family is None:
            return None
        return self._models[family].get(name)


#: where the model modules (crt, jumps, stdio, win32, winsock, seh) register; ``catalog`` imports them all
REGISTRY = ModelRegistry()


def model(*names: str, families: Iterable[str] = ("crt",)) -> Callable[[Run], Run]:
    """Register the decorated function as the model of ``names`` in ``families``."""

    def register(run: Run) -> Run:
        for family in families:
            for name in names:
                REGISTRY.add(family, Model(name, run))
        return run

    return register


def code_model(name: str, asm: str, families: Iterable[str] = ("crt",)) -> None:
    """Register a model implemented by x86-64 code (position independent), assembled with keystone."""
    import keystone

    encoding, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64).asm(asm, 0)
    for family in families:
        REGISTRY.add(family, Model(name, None, bytes(encoding)))
