"""The patch package model: what a .hpk file holds, as frozen dataclasses.

Every record checks itself when it is built, and ``Package`` checks the
references between records (fixups inside their blob, sites aimed at code
blobs, ...), so a model that exists can always be written, and the reader gets
the same checks for free by building the model. The checks run in the order
docs/FORMAT.md gives ("Validation order"), which the C reader follows too, so
both readers report the same error family for the same bad input.

Addresses are named by kind: ``rva`` is relative to the target module's base,
``offset`` is relative to the start of a blob.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    PackageEncodingError,
    PackageFieldError,
    PackageLayoutError,
    PackageLimitError,
    PackageVersionError,
)
from ..strategy import PADDING_JMP_SIZE, Strategy
from ..unwindinfo import UNW_FLAG_CHAININFO, UNW_FLAG_EHANDLER, UNW_FLAG_UHANDLER, fixed_size

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "FORMAT_VERSION",
    "LIMITS",
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
    "Package",
    "PatchSite",
    "Strategy",
    "TargetIdentity",
    "UnwindEntry",
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


def _check_enum(what: str, value: object, enum_type: type[enum.Enum]) -> None:
    if not isinstance(value, enum_type):
        raise PackageFieldError(f"{what}: {value!r} is not a {enum_type.__name__}")


def _check_bytes(what: str, value: object) -> bytes:
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
        if len(_check_bytes("code SHA-256", self.code_sha256)) != 32:
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
        _check_enum(f"blob {self.index} kind", self.kind, BlobKind)
        check_uint(f"blob {self.index} alignment", self.alignment, U32_MAX)
        if self.alignment & (self.alignment - 1) or not 1 <= self.alignment <= LIMITS.alignment:
            raise PackageFieldError(f"blob {self.index}: alignment {self.alignment} is not a power of 2 up to 4096")
        check_uint(f"blob {self.index} size", self.size, U32_MAX)
        if self.size == 0:
            raise PackageFieldError(f"blob {self.index}: size must not be 0")
        if self.size > LIMITS.blob_size:
            raise PackageLimitError(f"blob {self.index}: size {self.size} exceeds the limit {LIMITS.blob_size}")
        data = _check_bytes(f"blob {self.index} data", self.data)
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
        _check_enum("fixup kind", self.kind, FixupKind)
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
        _check_enum(f"{name} strategy", self.strategy, Strategy)
        if not isinstance(self.fallbacks, tuple) or len(self.fallbacks) > 2:
            raise PackageFieldError(f"{name}: fallbacks must be a tuple of at most 2 strategies")
        for fallback in self.fallbacks:
            _check_enum(f"{name} fallback", fallback, Strategy)
        strategies = (self.strategy, *self.fallbacks)
        if len(set(strategies)) != len(strategies):
            raise PackageFieldError(f"{name}: a strategy appears twice among strategy and fallbacks")
        expected = _check_bytes(f"{name} expected bytes", self.expected)
        if not 1 <= len(expected) <= LIMITS.expected_bytes:
            raise PackageFieldError(f"{name}: {len(expected)} expected bytes, must be 1..32")
        padding = _check_bytes(f"{name} padding bytes", self.padding_expected)
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


# ---------------------------------------------------------------- package


def _sorted(items: tuple, key: object) -> tuple:
    return tuple(sorted(items, key=key))  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class Package:
    """A patch package: new code and data for one baseline module, and where to redirect.

    Fixups are kept in (blob, offset) order, sites in RVA order and unwind
    entries in (code blob, begin) order, whatever order they are given in:
    that is the order the file stores them in.
    """

    format_version: int = FORMAT_VERSION
    target: TargetIdentity
    baseline_id: str
    sequence: int
    metadata: Metadata = field(default_factory=Metadata)
    blobs: tuple[Blob, ...] = ()
    fixups: tuple[Fixup, ...] = ()
    sites: tuple[PatchSite, ...] = ()
    unwind: tuple[UnwindEntry, ...] = ()
    signature: bytes | None = None
    signer_public_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise PackageVersionError(f"format version {self.format_version} is not supported (only {FORMAT_VERSION})")
        for name, kind in (("blobs", Blob), ("fixups", Fixup), ("sites", PatchSite), ("unwind", UnwindEntry)):
            items = getattr(self, name)
            if not isinstance(items, tuple | list) or not all(isinstance(item, kind) for item in items):
                raise PackageFieldError(f"{name}: expected a tuple of {kind.__name__}")
        object.__setattr__(self, "blobs", tuple(self.blobs))
        object.__setattr__(self, "fixups", _sorted(tuple(self.fixups), lambda f: (f.blob, f.offset)))
        object.__setattr__(self, "sites", _sorted(tuple(self.sites), lambda s: s.rva))
        object.__setattr__(self, "unwind", _sorted(tuple(self.unwind), lambda u: (u.code_blob, u.begin)))
        if not isinstance(self.target, TargetIdentity) or not isinstance(self.metadata, Metadata):
            raise PackageFieldError("target and metadata must be TargetIdentity and Metadata")
        check_text("baseline id", self.baseline_id, empty_ok=False)
        check_uint("sequence", self.sequence, U32_MAX)
        self._check_counts()
        self._check_blobs()
        self._check_fixups()
        self._check_sites()
        self._check_unwind()
        self._check_signature_fields()

    # -- structure

    def _check_counts(self) -> None:
        for name, count, limit in (
            ("blobs", len(self.blobs), LIMITS.blobs),
            ("fixups", len(self.fixups), LIMITS.fixups),
            ("sites", len(self.sites), LIMITS.sites),
            ("unwind entries", len(self.unwind), LIMITS.unwind_entries),
        ):
            if count > limit:
                raise PackageLimitError(f"{count} {name}, the limit is {limit}")

    def _check_blobs(self) -> None:
        total = 0
        for position, blob in enumerate(self.blobs):
            if blob.index != position:
                raise PackageLayoutError(f"blob at position {position} has index {blob.index}")
            total += blob.size
            if total > LIMITS.total_blob_size:
                raise PackageLimitError(f"blobs take more than {LIMITS.total_blob_size} bytes in memory")

    def _blob(self, what: str, index: int) -> Blob:
        if index >= len(self.blobs):
            raise PackageLayoutError(f"{what}: blob {index} does not exist ({len(self.blobs)} blobs)")
        return self.blobs[index]

    def _check_fixups(self) -> None:
        previous: Fixup | None = None
        for fixup in self.fixups:
            what = f"fixup at blob {fixup.blob} offset {fixup.offset:#x}"
            blob = self._blob(what, fixup.blob)
            if blob.kind is BlobKind.BSS:
                raise PackageLayoutError(f"{what}: a BSS blob has no bytes to fix up")
            if fixup.end > blob.size:
                raise PackageLayoutError(f"{what}: {fixup.kind.width} bytes do not fit in size {blob.size}")
            if previous is not None and previous.blob == fixup.blob and fixup.offset < previous.end:
                raise PackageLayoutError(f"{what}: overlaps the fixup at offset {previous.offset:#x}")
            target = fixup.target
            if isinstance(target, BaselineRVA):
                if target.rva >= self.target.size_of_image:
                    raise PackageLayoutError(f"{what}: target RVA {target.rva:#x} is outside the image")
            elif isinstance(target, BlobTarget):
                aimed = self._blob(f"{what} target", target.blob)
                if target.offset > aimed.size:
                    raise PackageLayoutError(f"{what}: target offset {target.offset:#x} is past blob {target.blob}")
            previous = fixup

    def _check_sites(self) -> None:
        previous: PatchSite | None = None
        for site in self.sites:
            what = f"site {site.rva:#x}"
            blob = self._blob(what, site.target_blob)
            if blob.kind is not BlobKind.CODE:
                raise PackageLayoutError(f"{what}: target blob {site.target_blob} is not code")
            if site.target_offset >= blob.size:
                raise PackageLayoutError(f"{what}: target offset {site.target_offset:#x} is past its blob")
            if site.end > self.target.size_of_image:
                raise PackageLayoutError(f"{what}: expected bytes run past the image")
            if site.padding_rva is not None and site.padding_end > self.target.size_of_image:
                raise PackageLayoutError(f"{what}: padding runs past the image")
            if previous is not None and site.footprint[0] < previous.footprint[1]:
                raise PackageLayoutError(f"{what}: overlaps the site at {previous.rva:#x}")
            previous = site

    def _check_unwind(self) -> None:
        previous: UnwindEntry | None = None
        for entry in self.unwind:
            what = f"unwind entry {entry.code_blob}:{entry.begin:#x}"
            code = self._blob(what, entry.code_blob)
            if code.kind is not BlobKind.CODE:
                raise PackageLayoutError(f"{what}: blob {entry.code_blob} is not code")
            if entry.end > code.size:
                raise PackageLayoutError(f"{what}: end {entry.end:#x} is past its blob")
            if previous is not None and previous.code_blob == entry.code_blob and entry.begin < previous.end:
                raise PackageLayoutError(f"{what}: overlaps the entry at {previous.begin:#x}")
            info = self._blob(f"{what} info", entry.unwind_blob)
            if info.kind is not BlobKind.RODATA:
                raise PackageLayoutError(f"{what}: unwind info blob {entry.unwind_blob} is not read-only data")
            if entry.unwind_offset % 4 or info.alignment < 4:
                raise PackageLayoutError(f"{what}: unwind info is not 4-byte aligned")
            _check_unwind_info(what, info.data, entry.unwind_offset)
            previous = entry

    def _check_signature_fields(self) -> None:
        if (self.signature is None) != (self.signer_public_key is None):
            raise PackageFieldError("signature and signer public key come together or not at all")
        if self.signature is not None and len(_check_bytes("signature", self.signature)) != 64:
            raise PackageFieldError("signature: must be 64 bytes")
        if self.signer_public_key is not None and len(_check_bytes("public key", self.signer_public_key)) != 32:
            raise PackageFieldError("signer public key: must be 32 bytes")

    # -- identity and serialisation

    @functools.cached_property
    def content_sha256(self) -> bytes:
        """SHA-256 of the content (everything before the hash); the signature signs it."""
        from .format import encode_content

        return hashlib.sha256(encode_content(self)).digest()

    @property
    def package_id(self) -> str:
        """A stable short id: the first 8 bytes of the content SHA-256, in hex."""
        return self.content_sha256[:8].hex()

    @property
    def signature_state(self) -> str:
        """"unsigned", "valid" (verifies against the content) or "invalid"."""
        if self.signature is None or self.signer_public_key is None:
            return "unsigned"
        from .signing import verify

        return "valid" if verify(self.signer_public_key, self.signature, self.content_sha256) else "invalid"

    @property
    def signer_key_hex(self) -> str | None:
        return None if self.signer_public_key is None else self.signer_public_key.hex()

    def dumps(self, sign_key: Ed25519PrivateKey | None = None) -> bytes:
        """The .hpk bytes; signed with ``sign_key`` if given, else with the signature the model carries."""
        from .format import dumps

        return dumps(self, sign_key)

    def save(self, path: str | Path, sign_key: Ed25519PrivateKey | None = None) -> None:
        Path(path).write_bytes(self.dumps(sign_key))

    @classmethod
    def loads(
        cls, data: bytes, trusted_keys: list[bytes] | None = None, require_signature: bool = False
    ) -> Package:
        """Parse and check a package; any problem raises a ``PackageError`` subclass.

        With ``trusted_keys`` the package must be signed by one of them (raw
        32-byte Ed25519 public keys); ``require_signature`` asks for a valid
        signature by any key.
        """
        from .format import loads

        return loads(data, trusted_keys=trusted_keys, require_signature=require_signature)

    @classmethod
    def load(
        cls, path: str | Path, trusted_keys: list[bytes] | None = None, require_signature: bool = False
    ) -> Package:
        from .format import load

        return load(path, trusted_keys=trusted_keys, require_signature=require_signature)




def unwind_info_size(data: bytes, offset: int) -> int:
    """Bytes of the UNWIND_INFO at ``offset`` that the OS reads, checked fields first."""
    header = data[offset]
    version, flags = header & 7, header >> 3
    if version not in (1, 2):
        raise PackageFieldError(f"unwind info at {offset:#x}: version {version}")
    if flags & ~7 or (flags & UNW_FLAG_CHAININFO and flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER)):
        raise PackageFieldError(f"unwind info at {offset:#x}: flags {flags:#x}")
    return fixed_size(flags, data[offset + 2])


def _check_unwind_info(what: str, data: bytes, offset: int) -> None:
    if offset + 4 > len(data):
        raise PackageLayoutError(f"{what}: unwind info at {offset:#x} is past its blob")
    if offset + unwind_info_size(data, offset) > len(data):
        raise PackageLayoutError(f"{what}: unwind info at {offset:#x} runs past its blob")
