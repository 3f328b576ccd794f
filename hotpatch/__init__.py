"""hotpatch: rebootless updates for x64 Windows PE images.

Public API::

    image = hotpatch.Image.load("baseline.dll")
    table = hotpatch.discover(image)      # functions with references and fingerprints
"""

from __future__ import annotations

__version__ = "0.1.0"

from .analysis import FunctionAnalysis, JumpTable, Reference, backend  # noqa: E402
from .errors import (  # noqa: E402
    AnalysisError,
    CorruptImageError,
    HotpatchError,
    ImageError,
    NotPE32PlusError,
    NotPEError,
    TruncatedImageError,
    UnsupportedArchitectureError,
)
from .functions import Function, FunctionTable, discover  # noqa: E402
from .image import Image  # noqa: E402
from .package import Package  # noqa: E402

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
