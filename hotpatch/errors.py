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
    "NotHotpatchableError",
    "VerifyError",
    "DiffError",
    "PackageError",
    "PackageTruncatedError",
    "PackageMagicError",
    "PackageVersionError",
    "PackageHashError",
    "PackageLimitError",
    "PackageLayoutError",
    "PackageFieldError",
    "PackageEncodingError",
    "PackageSignatureError",
    "PackageUnsignedError",
    "PackageUntrustedError",
    "PackageKeyError",
    "ApplyError",
    "BackendError",
    "Win32Error",
    "ProcessGoneError",
    "BusyError",
    "BytesMismatchError",
    "AgentProtocolError",
    "WineError",
    "RemoteTimeoutError",
    "EmulationError",
    "UnmodelledImportError",
    "EmulationFaultError",
    "InstructionLimitError",
    "GuestExceptionError",
    "InputsError",
    "RefusedError",
    "IdentityMismatchError",
    "SiteMismatchError",
    "SequenceError",
    "PidReusedError",
    "FixupError",
    "JournalError",
    "StepFailedError",
    "CacheError",
    "ManifestError",
    "OtherBaselineError",
    "BatchError",
    "ReportError",
    "RolloutError",
    "PlanError",
    "RolloutLockedError",
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


class Win32Error(BackendError):
    """A Win32 call failed in the agent; ``call`` names it and ``code`` is its GetLastError()."""

    def __init__(self, message: str, call: str = "", code: int = 0) -> None:
        super().__init__(message)
        self.call = call
        self.code = code


class ProcessGoneError(BackendError):
    """The target process does not exist (any more), or has exited."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class BusyError(BackendError):
    """A thread kept executing inside bytes about to change, through every retry."""

    def __init__(self, message: str, thread_id: int = 0, rip: int = 0) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.rip = rip


class BytesMismatchError(BackendError):
    """The target does not hold the bytes a write expected to replace; nothing was written."""

    def __init__(self, message: str, va: int = 0, found: bytes = b"") -> None:
        super().__init__(message)
        self.va = va
        self.found = found


class AgentProtocolError(BackendError):
    """The agent died, did not answer in time, or the two sides disagree about the protocol."""


class WineError(BackendError):
    """Wine, needed to run the agent on this system, is missing or its prefix cannot be prepared."""


class PackageTruncatedError(PackageError):
    """The package ends before a structure it declares (header, section table, hash or signature)."""


class PackageMagicError(PackageError):
    """Not a hotpatch package: the file does not start with the .hpk magic."""


class PackageVersionError(PackageError):
    """A package format version this reader does not support."""


class PackageHashError(PackageError):
    """The content SHA-256 does not match: the package is corrupt or was altered."""


class PackageLimitError(PackageError):
    """A count or size exceeds a documented limit of the format."""


class PackageLayoutError(PackageError):
    """Sections or records overlap, are out of order, or point outside their range or at a missing blob."""


class PackageFieldError(PackageError):
    """A field holds a value the format does not define (unknown kind, reserved bits set, bad alignment)."""


class PackageEncodingError(PackageError):
    """A string is not valid UTF-8, contains NUL, or lacks its terminator."""


class PackageSignatureError(PackageError):
    """The Ed25519 signature over the content does not verify."""


class PackageUnsignedError(PackageSignatureError):
    """A signature is required (or keys are trusted) but the package carries none."""


class PackageUntrustedError(PackageSignatureError):
    """The signature verifies, but the signer's key is not one of the trusted keys."""


class PackageKeyError(PackageError):
    """A signing key or public key cannot be read."""


class RemoteTimeoutError(BackendError):
    """A function called in the target did not return in time; its thread may still be running."""

    def __init__(self, message: str, thread_id: int = 0) -> None:
        super().__init__(message)
        self.thread_id = thread_id


class EmulationError(BackendError):
    """Emulated code could not run as asked (the emulator backend behind ``hotpatch verify``)."""


class UnmodelledImportError(EmulationError):
    """Emulated code called an imported function the emulator has no model for."""

    def __init__(self, message: str, dll: str = "", name: str = "") -> None:
        super().__init__(message)
        self.dll = dll
        self.name = name


class EmulationFaultError(EmulationError):
    """Emulated code faulted: a bad memory access, an invalid instruction, a CPU exception."""

    def __init__(self, message: str, rip: int = 0, va: int = 0, instruction: str = "") -> None:
        super().__init__(message)
        self.rip = rip
        self.va = va
        self.instruction = instruction


class InstructionLimitError(EmulationError):
    """Emulated code ran past its instruction limit (most likely an endless loop)."""

    def __init__(self, message: str, rip: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.rip = rip
        self.limit = limit


class GuestExceptionError(EmulationError):
    """A Windows exception raised in emulated code reached no handler (the process would have died)."""

    def __init__(self, message: str, code: int = 0, address: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.address = address


class NotHotpatchableError(HotpatchError):
    """The update needs a new baseline (a reboot): the verdict's reasons say why. Nothing was written."""

    exit_code = 3

    def __init__(self, reasons: tuple) -> None:
        self.reasons = tuple(reasons)
        kinds = ", ".join(sorted({r.kind for r in self.reasons})) or "unknown"
        super().__init__(f"not hotpatchable, needs a new baseline: {kinds}")


# ---------------------------------------------------------------- live apply


class RefusedError(ApplyError):
    """The package does not fit the process as it is now; nothing was changed."""


class IdentityMismatchError(RefusedError):
    """The loaded module is not the package's baseline (name, TimeDateStamp, SizeOfImage, CheckSum, code)."""


class SiteMismatchError(RefusedError):
    """A patch site does not hold the bytes the package (or our earlier redirect) expects there."""

    def __init__(self, message: str, va: int = 0, found: bytes = b"") -> None:
        super().__init__(message)
        self.va = va
        self.found = found


class OtherBaselineError(RefusedError):
    """The process runs another baseline of the module (a package of it is applied): restart onto this one."""


class PidReusedError(RefusedError):
    """The pid now names another process than the one the journal patched: that one exited and Windows (or
    Wine) gave its pid to a new process. Nothing was changed; exit code 6, so scripts can tell it apart."""

    exit_code = 6


class SequenceError(RefusedError):
    """A package of the same baseline with an equal or higher sequence number is already applied."""


class FixupError(ApplyError):
    """A fixup or redirect cannot be resolved in this process (out of reach, import not found)."""


class JournalError(ApplyError):
    """The host-side journal of a process cannot be read, written or locked."""


class StepFailedError(ApplyError):
    """A step of an apply, rollback or recovery failed; ``cause`` says why.

    ``undone`` tells whether everything the transaction had done was undone,
    so the process is as it was: the exit code is then 1 (refused or failed
    safely), or 5 when the trust policy refused the package. Otherwise it is
    4: the process may be half-changed, and ``hotpatch recover`` is the next
    thing to run.
    """

    def __init__(self, message: str, step: str, cause: BaseException, undone: bool = True) -> None:
        super().__init__(message)
        self.step = step
        self.cause = cause
        self.undone = undone
        if not undone:
            self.exit_code = 4
        elif isinstance(cause, PackageUnsignedError | PackageUntrustedError):
            self.exit_code = 5  # the trust policy refused it: nothing was touched
        elif isinstance(cause, PidReusedError):
            self.exit_code = cause.exit_code  # nothing was touched, and the process asked for is not there
        else:
            self.exit_code = 1


class InputsError(HotpatchError):
    """An inputs file or call specification is malformed, or names a function that does not exist."""


class VerifyError(HotpatchError):
    """``hotpatch verify`` cannot run the comparison it was asked for (bad input: exit 2)."""


# ---------------------------------------------------------------- servicing program


class CacheError(HotpatchError):
    """The analysis cache cannot be used (its directory is not the user's own, or cannot be made)."""


class ManifestError(HotpatchError):
    """A release-train manifest is malformed; the message names the release, module and field."""


class BatchError(HotpatchError):
    """A batch manifest, release folder or results file that cannot be used."""


class ReportError(HotpatchError):
    """A document the HTML report cannot be made from."""


# ---------------------------------------------------------------- health gate and rollouts


class RolloutError(HotpatchError):
    """A rollout cannot run as asked: unknown rollout, unreadable state database (bad input: exit 2)."""


class PlanError(RolloutError):
    """A rollout plan is malformed; the message names the field. Nothing was applied anywhere."""


class RolloutLockedError(RolloutError):
    """Another orchestrator holds the rollout (the state database says who); nothing was done."""

    exit_code = 1
