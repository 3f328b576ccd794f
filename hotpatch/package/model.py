"""The patch package model: what a .hpk file holds, as frozen dataclasses.

Every record checks itself when it is built (records.py), and ``Package`` checks the
references between records (fixups inside their blob, sites aimed at code
blobs, ...), so a model that exists can always be written, and the reader gets
the same checks for free by building the model. The checks run in the order
docs/FORMAT.md gives ("Validation order"), which the C reader follows too, so
both readers report the same error family for the same bad input.

Addresses are named by kind: ``rva`` is relative to the target module's base,
``offset`` is relative to the start of a blob.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PackageFieldError, PackageLayoutError, PackageLimitError, PackageVersionError
from ..pe.unwindinfo import UNW_FLAG_CHAININFO, UNW_FLAG_EHANDLER, UNW_FLAG_UHANDLER, fixed_size
from .records import (
    FORMAT_VERSION,
    LIMITS,
    PADDING_JMP_SIZE,
    U32_MAX,
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    FixupTarget,
    ImportTarget,
    Limits,
    Metadata,
    PatchSite,
    Strategy,
    TargetIdentity,
    UnwindEntry,
    check_bytes,
    check_text,
    check_uint,
)

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
    "PADDING_JMP_SIZE",
    "PatchSite",
    "Strategy",
    "TargetIdentity",
    "UnwindEntry",
]


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
        if self.signature is not None and len(check_bytes("signature", self.signature)) != 64:
            raise PackageFieldError("signature: must be 64 bytes")
        if self.signer_public_key is not None and len(check_bytes("public key", self.signer_public_key)) != 32:
            raise PackageFieldError("signer public key: must be 32 bytes")

    # -- identity (the content digest, the id and the signature state are functions of the format:
    #    hotpatch.package.format.content_sha256_of, package_id_of, signature_state_of)

    @property
    def signer_key_hex(self) -> str | None:
        return None if self.signer_public_key is None else self.signer_public_key.hex()


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
