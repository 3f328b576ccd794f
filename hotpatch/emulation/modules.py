"""The modules of an emulated process: mapped images and model DLLs, and the model stubs they export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import models
from .modeldll import ModelDll

if TYPE_CHECKING:
    from ..pe.image import Image

__all__ = ["LoadedModule", "Stub"]


@dataclass
class LoadedModule:
    """A module of the emulated process: a mapped image or a model DLL."""

    name: str
    path: str
    base: int
    size: int
    image: Image | None = None
    model: ModelDll | None = None
    tls_index: int | None = None

    def contains(self, va: int) -> bool:
        return self.base <= va < self.base + self.size


@dataclass(frozen=True)
class Stub:
    """The export of a model DLL at one address, and the model that runs there (None: unmodelled)."""

    dll: str
    name: str
    model: models.Model | None
