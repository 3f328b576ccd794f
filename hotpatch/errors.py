"""The one error tree of hotpatch.

Every failure the user can cause (bad input, refused update, unreachable
process) is a ``HotpatchError``; the CLI maps each family to an exit code and
prints its one-line message, never a traceback.
"""

from __future__ import annotations

__all__ = [
    "HotpatchError",
    "ImageError",
    "NotPEError",
    "TruncatedImageError",
    "UnsupportedArchitectureError",
    "NotPE32PlusError",
    "CorruptImageError",
    "AnalysisError",
    "DiffError",
    "PackageError",
    "ApplyError",
    "BackendError",
]


class HotpatchError(Exception):
    """Base of every error hotpatch raises on purpose."""

    #: exit code the CLI uses for this family of errors
    exit_code = 2


class ImageError(HotpatchError):
    """The file is not an image hotpatch can work with."""


class NotPEError(ImageError):
    """No MZ/PE signatures: not a Portable Executable at all."""


class TruncatedImageError(ImageError):
    """Headers or section data extend past the end of the file."""


class NotPE32PlusError(ImageError):
    """A PE32 (32-bit) image; only PE32+ x86-64 is supported."""


class UnsupportedArchitectureError(ImageError):
    """A PE32+ image for another machine (ARM64, ARM64EC/ARM64X, ...)."""


class CorruptImageError(ImageError):
    """A header or data directory is inconsistent with the image layout."""


class AnalysisError(HotpatchError):
    """The analysis core could not run (for example, the extension is missing)."""


class DiffError(HotpatchError):
    """Two images cannot be diffed (for example, they are not versions of one module)."""


class PackageError(HotpatchError):
    """A patch package is malformed, tampered with, or not trusted."""


class ApplyError(HotpatchError):
    """Applying, rolling back or inspecting a live patch failed; the target was left unchanged."""

    exit_code = 1


class BackendError(ApplyError):
    """The process backend (native agent or emulator) failed to do what was asked."""
