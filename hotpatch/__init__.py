"""hotpatch: rebootless updates for x64 Windows PE images.

Public API::

    image = hotpatch.Image.load("baseline.dll")
    table = hotpatch.discover(image)      # functions with references and fingerprints
"""

from __future__ import annotations

__version__ = "0.1.0"

from importlib import import_module
from typing import Any

# Loaded on first use: LIEF's native module alone takes over a second to import, and
# `hotpatch --version` or a package inspection need none of it.
_LAZY = {
    "FunctionAnalysis": ".analysis.api", "JumpTable": ".analysis.api", "Reference": ".analysis.api",
    "backend": ".analysis.api",
    "AnalysisError": ".errors", "CorruptImageError": ".errors", "HotpatchError": ".errors", "ImageError": ".errors",
    "NotPE32PlusError": ".errors", "NotPEError": ".errors", "TruncatedImageError": ".errors",
    "UnsupportedArchitectureError": ".errors",
    "Function": ".analysis.functions", "FunctionTable": ".analysis.functions", "discover": ".analysis.functions",
    "Image": ".pe.image",
    "Package": ".package",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hotpatch' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AnalysisError",
    "CorruptImageError",
    "Function",
    "FunctionAnalysis",
    "FunctionTable",
    "HotpatchError",
    "Image",
    "ImageError",
    "JumpTable",
    "NotPE32PlusError",
    "NotPEError",
    "Package",
    "Reference",
    "TruncatedImageError",
    "UnsupportedArchitectureError",
    "__version__",
    "backend",
    "discover",
]
