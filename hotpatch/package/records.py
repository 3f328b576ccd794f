"""The records of a patch package, each a frozen dataclass that checks its own fields when built.

Target identity, blobs, fixups and their targets, patch sites, unwind
entries, metadata; the format's limits. ``model.Package`` holds them and
checks the references between them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import PackageEncodingError, PackageFieldError, PackageLayoutError, PackageLimitError
from ..verdict.strategy import PADDING_JMP_SIZE, Strategy

# the helpers (check_*, U32_MAX) are for model.py; __all__ is what the package model re-exports
__all__ = [
    "FORMAT_VERSION",
    "LIMITS",
    "PADDING_JMP_SIZE",
    "BaselineRVA",
    "Blob",
    "BlobKind",
    "BlobTarget",
    "Fixup",
    "FixupKind",
    "FixupTarget",
    "ImportTarget",
    "Limits",
    "Metadata",
    "PatchSite",
    "Strategy",
    "TargetIdentity",
    "UnwindEntry",
    "check_enum",
]

FORMAT_VERSION = 1

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    """The documented limits of format version 1 (docs/FORMAT.md, "Limits")."""

    file_size: int = 256 << 20
    blobs: int = 65536
    blob_size: int = 64 << 20
    total_blob_size: int = 256 << 20
    fixups: int = 1 << 20
    sites: int = 65536
    unwind_entries: int = 1 << 18
    strings: int = 1 << 21
    string_bytes: int = 4096
    cve_ids: int = 1024
    expected_bytes: int = 32
    alignment: int = 4096


LIMITS = Limits()


class BlobKind(enum.IntEnum):
    """What a blob holds, which decides the protection it gets in the target."""

    CODE = 1  # read + execute
    RODATA = 2  # read only (constants, string literals, unwind info)
    DATA = 3  # read + write, initialised
    BSS = 4  # read + write, zero-initialised: no bytes in the package


class FixupKind(enum.IntEnum):
    """How a fixup's value is computed and stored (S = target address, A = addend, P = field address)."""

    REL32 = 1  # S + A - P, signed 32-bit
    ABS64 = 2  # S + A, 64-bit
    IMAGE_REL32 = 3  # S + A - module_base, unsigned 32-bit
    ALLOC_REL32 = 4  # S + A - allocation_base, unsigned 32-bit (RVAs inside unwind info registered for new code)

    @property
    def width(self) -> int:
        """Bytes the fixup writes."""
        return 8 if self is FixupKind.ABS64 else 4



def check_text(what: str, text: str, *, empty_ok: bool = True) -> bytes:
    """The UTF-8 bytes of a string field, after the rules every string of the format obeys."""
    if not isinstance(text, str):
        raise PackageFieldError(f"{what}: expected a string, got {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PackageEncodingError(f"{what}: not encodable as UTF-8 ({exc.reason})") from None
    if len(raw) > LIMITS.string_bytes:
        raise PackageLimitError(f"{what}: {len(raw)} bytes, the limit is {LIMITS.string_bytes}")
    if "\x00" in text:
        raise PackageEncodingError(f"{what}: contains a NUL character")
    if not empty_ok and not raw:
        raise PackageFieldError(f"{what}: must not be empty")
    return raw


def check_uint(what: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PackageFieldError(f"{what}: expected an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise PackageFieldError(f"{what}: {value} is outside 0..{maximum:#x}")


def check_enum(what: str, value: object, enum_type: type[enum.Enum]) -> None:
    if not isinstance(value, enum_type):
        raise PackageFieldError(f"{what}: {value!r} is not a {enum_type.__name__}")


def check_bytes(what: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise PackageFieldError(f"{what}: expected bytes, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class TargetIdentity:
    """The module a package applies to: it must match the loaded module exactly."""

    module_name: str
    timedatestamp: int
    size_of_image: int
    checksum: int
    code_sha256: bytes

    def __post_init__(self) -> None:
        check_text("module name", self.module_name, empty_ok=False)
        check_uint("TimeDateStamp", self.timedatestamp, U32_MAX)
        check_uint("SizeOfImage", self.size_of_image, U32_MAX)
        if self.size_of_image == 0:
            raise PackageFieldError("SizeOfImage: must not be 0")
        check_uint("CheckSum", self.checksum, U32_MAX)
        if len(check_bytes("code SHA-256", self.code_sha256)) != 32:
            raise PackageFieldError(f"code SHA-256: {len(self.code_sha256)} bytes, expected 32")


@dataclass(frozen=True)
class Blob:
    """New code or data the apply step places in the target, near the image."""

    index: int
    kind: BlobKind
    alignment: int
    data: bytes
    size: int

    def __post_init__(self) -> None:
        check_uint("blob index", self.index, U32_MAX)
        check_enum(f"blob {self.index} kind", self.kind, BlobKind)
        check_uint(f"blob {self.index} alignment", self.alignment, U32_MAX)
        if self.alignment & (self.alignment - 1) or not 1 <= self.alignment <= LIMITS.alignment:
            raise PackageFieldError(f"blob {self.index}: alignment {self.alignment} is not a power of 2 up to 4096")
        check_uint(f"blob {self.index} size", self.size, U32_MAX)
        if self.size == 0:
            raise PackageFieldError(f"blob {self.index}: size must not be 0")
        if self.size > LIMITS.blob_size:
            raise PackageLimitError(f"blob {self.index}: size {self.size} exceeds the limit {LIMITS.blob_size}")
        data = check_bytes(f"blob {self.index} data", self.data)
        if self.kind is BlobKind.BSS:
            if data:
                raise PackageLayoutError(f"blob {self.index}: a BSS blob carries no bytes")
        elif len(data) != self.size:
            raise PackageLayoutError(f"blob {self.index}: {len(data)} bytes of data for size {self.size}")

    @property
    def alignment_log2(self) -> int:
        return self.alignment.bit_length() - 1


@dataclass(frozen=True)
class BaselineRVA:
    """S = module_base + rva: existing code or data of the baseline."""

    rva: int

    def __post_init__(self) -> None:
        check_uint("fixup target RVA", self.rva, U32_MAX)


@dataclass(frozen=True)
class BlobTarget:
    """S = address of the blob + offset: new code or data of the package."""

    blob: int
    offset: int

    def __post_init__(self) -> None:
        check_uint("fixup target blob", self.blob, U32_MAX)
        check_uint("fixup target offset", self.offset, U32_MAX)


@dataclass(frozen=True)
class ImportTarget:
    """S = address of ``dll!name`` in the target process, resolved at apply time."""

    dll: str
    name: str

    def __post_init__(self) -> None:
        check_text("import DLL name", self.dll, empty_ok=False)
        check_text("import symbol name", self.name, empty_ok=False)


FixupTarget = BaselineRVA | BlobTarget | ImportTarget


@dataclass(frozen=True)
class Fixup:
    """A field inside a blob that the apply step fills with an address."""

    blob: int
    offset: int
    kind: FixupKind
    target: FixupTarget
    addend: int = 0

    def __post_init__(self) -> None:
        check_uint("fixup blob", self.blob, U32_MAX)
        check_uint("fixup offset", self.offset, U32_MAX)
        check_enum("fixup kind", self.kind, FixupKind)
        if not isinstance(self.target, BaselineRVA | BlobTarget | ImportTarget):
            raise PackageFieldError(f"fixup target: {self.target!r} is not a fixup target")
        if not isinstance(self.addend, int) or not I64_MIN <= self.addend <= I64_MAX:
            raise PackageFieldError(f"fixup addend: {self.addend!r} is not a signed 64-bit integer")

    @property
    def end(self) -> int:
        return self.offset + self.kind.width


@dataclass(frozen=True)
class PatchSite:
    """Where a changed function of the baseline is redirected to its new code.

    ``expected`` holds the original bytes at ``rva`` for every byte any of the
    strategies (preferred and fallbacks) may overwrite; ``padding_expected``
    the original bytes of the padding a SHORT_JMP_PADDING redirect uses.
    """

    rva: int
    function: str
    expected: bytes
    target_blob: int
    target_offset: int
    strategy: Strategy
    fallbacks: tuple[Strategy, ...] = ()
    padding_rva: int | None = None
    padding_expected: bytes = b""

    def __post_init__(self) -> None:
        check_uint("site RVA", self.rva, U32_MAX)
        name = f"site {self.rva:#x}"
        check_text(f"{name} function", self.function, empty_ok=False)
        check_uint(f"{name} target blob", self.target_blob, U32_MAX)
        check_uint(f"{name} target offset", self.target_offset, U32_MAX)
        check_enum(f"{name} strategy", self.strategy, Strategy)
        if not isinstance(self.fallbacks, tuple) or len(self.fallbacks) > 2:
            raise PackageFieldError(f"{name}: fallbacks must be a tuple of at most 2 strategies")
        for fallback in self.fallbacks:
            check_enum(f"{name} fallback", fallback, Strategy)
        strategies = (self.strategy, *self.fallbacks)
        if len(set(strategies)) != len(strategies):
            raise PackageFieldError(f"{name}: a strategy appears twice among strategy and fallbacks")
        expected = check_bytes(f"{name} expected bytes", self.expected)
        if not 1 <= len(expected) <= LIMITS.expected_bytes:
            raise PackageFieldError(f"{name}: {len(expected)} expected bytes, must be 1..32")
        padding = check_bytes(f"{name} padding bytes", self.padding_expected)
        if len(padding) > LIMITS.expected_bytes:
            raise PackageFieldError(f"{name}: {len(padding)} padding bytes, must be at most 32")
        widest = max(s.width for s in strategies)
        if len(expected) < widest:
            raise PackageFieldError(f"{name}: {len(expected)} expected bytes, its strategies overwrite {widest}")
        if Strategy.SHORT_JMP_PADDING in strategies:
            self._check_padding(name)
        elif self.padding_rva is not None or padding:
            raise PackageFieldError(f"{name}: padding given but no strategy uses it")

    def _check_padding(self, name: str) -> None:
        if self.padding_rva is None:
            raise PackageFieldError(f"{name}: SHORT_JMP_PADDING needs a padding RVA")
        check_uint(f"{name} padding RVA", self.padding_rva, U32_MAX)
        if len(self.padding_expected) < PADDING_JMP_SIZE:
            raise PackageFieldError(f"{name}: {len(self.padding_expected)} padding bytes, the jump needs 5")
        displacement = self.padding_rva - (self.rva + 2)
        if not -128 <= displacement <= 127:
            raise PackageFieldError(f"{name}: padding at {self.padding_rva:#x} is out of reach of a short jump")
        if self.padding_rva < self.rva + 2 and self.rva < self.padding_end:
            raise PackageFieldError(f"{name}: padding overlaps the short jump")
        for rva in range(max(self.rva, self.padding_rva), min(self.rva + len(self.expected), self.padding_end)):
            if self.expected[rva - self.rva] != self.padding_expected[rva - self.padding_rva]:
                raise PackageFieldError(f"{name}: expected and padding bytes disagree at {rva:#x}")

    @property
    def end(self) -> int:
        """One past the last baseline byte any strategy may overwrite at the site."""
        return self.rva + len(self.expected)

    @property
    def padding_end(self) -> int:
        return (self.padding_rva or 0) + len(self.padding_expected)

    @property
    def footprint(self) -> tuple[int, int]:
        """The baseline RVA range [begin, end) holding every byte the site may overwrite."""
        if self.padding_rva is None:
            return self.rva, self.end
        return min(self.rva, self.padding_rva), max(self.end, self.padding_end)


@dataclass(frozen=True)
class UnwindEntry:
    """A RUNTIME_FUNCTION for new code; its UNWIND_INFO lives in an RODATA blob."""

    code_blob: int
    begin: int
    end: int
    unwind_blob: int
    unwind_offset: int

    def __post_init__(self) -> None:
        check_uint("unwind code blob", self.code_blob, U32_MAX)
        check_uint("unwind begin", self.begin, U32_MAX)
        check_uint("unwind end", self.end, U32_MAX)
        check_uint("unwind info blob", self.unwind_blob, U32_MAX)
        check_uint("unwind info offset", self.unwind_offset, U32_MAX)
        if self.begin >= self.end:
            raise PackageFieldError(f"unwind entry {self.begin:#x}..{self.end:#x}: begin must be below end")


@dataclass(frozen=True)
class Metadata:
    """What the package is for and who made it; ``created`` is seconds since the Unix epoch (UTC)."""

    description: str = ""
    cve_ids: tuple[str, ...] = ()
    creator: str = ""
    created: int | None = None

    def __post_init__(self) -> None:
        check_text("description", self.description)
        check_text("creator", self.creator)
        if not isinstance(self.cve_ids, tuple):
            raise PackageFieldError("CVE ids: expected a tuple of strings")
        if len(self.cve_ids) > LIMITS.cve_ids:
            raise PackageLimitError(f"{len(self.cve_ids)} CVE ids, the limit is {LIMITS.cve_ids}")
        for cve in self.cve_ids:
            check_text("CVE id", cve, empty_ok=False)
        if self.created is not None:
            check_uint("creation time", self.created, U64_MAX)
