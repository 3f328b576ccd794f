"""A machine with everything the emulator models: the import models and SEH dispatch.

``crt``, ``jumps``, ``stdio``, ``win32``, ``winsock`` and ``seh`` register their models in
``models.REGISTRY`` when imported; importing them here, above ``machine``,
completes the registry before any machine uses it.
"""

from __future__ import annotations

from . import crt, jumps, stdio, win32, winsock  # noqa: F401 - they register their models on import
from .machine import DEFAULT_INSTRUCTION_LIMIT, Machine
from .models import REGISTRY
from .seh import dispatch_fault

__all__ = ["new_machine"]


def new_machine(instruction_limit: int = DEFAULT_INSTRUCTION_LIMIT) -> Machine:
    """A new emulated process with every model and exception dispatch through the guest's handlers."""
    return Machine(REGISTRY, dispatch_fault, instruction_limit)
