"""The checking .hpk reader: every field and bound checked before it is used, in the order docs/FORMAT.md
gives; every problem is a ``PackageError`` subclass. The C reader in native/hpk/ follows the same order."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from ..errors import (
    PackageEncodingError,
    PackageError,
    PackageFieldError,
    PackageHashError,
    PackageLayoutError,
    PackageLimitError,
    PackageMagicError,
    PackageSignatureError,
    PackageTruncatedError,
    PackageUnsignedError,
    PackageUntrustedError,
    PackageVersionError,
)
from .model import (
    FORMAT_VERSION,
    LIMITS,
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    ImportTarget,
    Metadata,
    Package,
    PatchSite,
    Strategy,
    TargetIdentity,
    UnwindEntry,
)
from .signing import normalize_public_keys, verify
from .wire import (
    BASELINE,
    BLOB,
    BLOB_KINDS,
    FIXUP,
    FIXUP_KINDS,
    HASH_SIZE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    METADATA,
    METADATA_CREATED,
    SECTION_COUNT,
    SECTION_ENTRY,
    SECTIONS_START,
    SIGNATURE_BLOCK_SIZE,
    SITE,
    SITE_HAS_PADDING,
    STRATEGY_CODES,
    STRINGS,
    TARGET,
    TARGET_KINDS,
    U16,
    UNWIND,
    Section,
    TargetKind,
    align8,
)

__all__ = ["read", "read_file"]


def _decode_text(what: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageEncodingError(f"{what}: invalid UTF-8 at byte {exc.start}") from None
    if "\x00" in text:
        raise PackageEncodingError(f"{what}: contains a NUL byte")
    return text


def _reserved_zero(what: str, *fields: int) -> None:
    """Reserved fields are 0 (docs/FORMAT.md), so that a later format version can give them a meaning."""
    if any(fields):
        raise PackageFieldError(f"{what}: reserved field is not 0")


class _Reader:
    """One pass over one file, in the validation order of docs/FORMAT.md."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sections: dict[Section, tuple[int, int]] = {}
        self.strings: list[str] = []

    # -- header, hash, section table

    def read_header(self) -> tuple[int, bool]:
        data = self.data
        if data[:8] != MAGIC[: len(data[:8])]:
            raise PackageMagicError("not a hotpatch package (bad magic)")
        if len(data) < HEADER_SIZE:
            raise PackageTruncatedError(f"{len(data)} bytes: shorter than the {HEADER_SIZE}-byte header")
        _, version, header_size, flags, section_count, reserved, content_size = HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise PackageVersionError(f"format version {version} is not supported (only {FORMAT_VERSION})")
        if len(data) > LIMITS.file_size:
            raise PackageLimitError(f"{len(data)} bytes: larger than the {LIMITS.file_size}-byte limit")
        if header_size != HEADER_SIZE:
            raise PackageLayoutError(f"header size {header_size}, expected {HEADER_SIZE}")
        if flags:
            raise PackageFieldError(f"header flags {flags:#x}: no flag is defined")
        if section_count != SECTION_COUNT:
            raise PackageLayoutError(f"{section_count} sections, expected {SECTION_COUNT}")
        _reserved_zero("header", reserved)
        if content_size < SECTIONS_START or content_size % 8:
            raise PackageLayoutError(f"content size {content_size} is not a valid content size")
        if content_size > len(data) - HASH_SIZE:
            raise PackageTruncatedError(f"{len(data)} bytes: content and hash need {content_size + HASH_SIZE}")
        trailer = len(data) - content_size - HASH_SIZE
        if 0 < trailer < SIGNATURE_BLOCK_SIZE:
            raise PackageTruncatedError(f"signature block of {trailer} bytes, expected {SIGNATURE_BLOCK_SIZE}")
        if trailer > SIGNATURE_BLOCK_SIZE:
            raise PackageLayoutError(f"{trailer - SIGNATURE_BLOCK_SIZE} bytes after the signature block")
        return content_size, trailer == SIGNATURE_BLOCK_SIZE

    def check_hash(self, content_size: int) -> bytes:
        digest = hashlib.sha256(memoryview(self.data)[:content_size]).digest()
        if digest != self.data[content_size : content_size + HASH_SIZE]:
            raise PackageHashError("content SHA-256 mismatch: the package is corrupt or was altered")
        return digest

    def _check_zero(self, begin: int, end: int, what: str) -> None:
        if any(self.data[begin:end]):
            raise PackageLayoutError(f"{what}: padding is not zero")

    def read_section_table(self, content_size: int) -> None:
        expected, previous_end = SECTIONS_START, SECTIONS_START
        for position, kind in enumerate(Section):
            raw_kind, reserved, offset, size = SECTION_ENTRY.unpack_from(self.data, HEADER_SIZE + 16 * position)
            if raw_kind != kind:
                raise PackageLayoutError(f"section {position} has kind {raw_kind}, expected {kind.name}")
            _reserved_zero(f"section {kind.name}", reserved)
            if offset != expected:
                raise PackageLayoutError(f"section {kind.name} at {offset:#x}, expected {expected:#x}")
            if size > content_size - offset:
                raise PackageLayoutError(f"section {kind.name} ({size} bytes at {offset:#x}) is past the content")
            self._check_zero(previous_end, offset, f"before section {kind.name}")
            self.sections[kind] = (offset, size)
            previous_end = offset + size
            expected = align8(previous_end)
        if expected != content_size:
            raise PackageLayoutError(f"content size {content_size}, the sections end at {expected}")
        self._check_zero(previous_end, content_size, "after the last section")

    def section(self, kind: Section) -> bytes:
        offset, size = self.sections[kind]
        return self.data[offset : offset + size]

    # -- strings

    def read_strings(self) -> None:
        table = self.section(Section.STRINGS)
        if len(table) < STRINGS.size:
            raise PackageLayoutError("string table: shorter than its header")
        count, reserved = STRINGS.unpack_from(table)
        _reserved_zero("string table", reserved)
        if count > LIMITS.strings:
            raise PackageLimitError(f"{count} strings, the limit is {LIMITS.strings}")
        data_start = STRINGS.size + 8 * count
        if data_start > len(table):
            raise PackageLayoutError(f"string table: {count} entries do not fit")
        expected = 0
        for index in range(count):
            offset, length = STRINGS.unpack_from(table, STRINGS.size + 8 * index)
            if offset != expected:
                raise PackageLayoutError(f"string {index} at {offset}, expected {expected}")
            if length > LIMITS.string_bytes:
                raise PackageLimitError(f"string {index}: {length} bytes, the limit is {LIMITS.string_bytes}")
            begin = data_start + offset
            if begin + length + 1 > len(table):
                raise PackageLayoutError(f"string {index} runs past the string table")
            if table[begin + length] != 0:
                raise PackageEncodingError(f"string {index}: no NUL terminator")
            self.strings.append(_decode_text(f"string {index}", table[begin : begin + length]))
            expected = offset + length + 1
        if data_start + expected != len(table):
            raise PackageLayoutError("string table: bytes after the last string")

    def string(self, what: str, index: int) -> str:
        if index >= len(self.strings):
            raise PackageLayoutError(f"{what}: string {index} does not exist ({len(self.strings)} strings)")
        return self.strings[index]

    @staticmethod
    def _nonempty(what: str, text: str) -> str:
        if not text:
            raise PackageFieldError(f"{what}: must not be empty")
        return text

    # -- singleton sections

    def read_target(self) -> TargetIdentity:
        raw = self.section(Section.TARGET)
        if len(raw) != TARGET.size:
            raise PackageLayoutError(f"target section: {len(raw)} bytes, expected {TARGET.size}")
        name, timedatestamp, size_of_image, checksum, code_sha256 = TARGET.unpack(raw)
        module_name = self.string("module name", name)
        return TargetIdentity(module_name, timedatestamp, size_of_image, checksum, code_sha256)

    def read_baseline(self) -> tuple[str, int]:
        raw = self.section(Section.BASELINE)
        if len(raw) != BASELINE.size:
            raise PackageLayoutError(f"baseline section: {len(raw)} bytes, expected {BASELINE.size}")
        name, sequence = BASELINE.unpack(raw)
        return self._nonempty("baseline id", self.string("baseline id", name)), sequence

    def read_metadata(self) -> Metadata:
        raw = self.section(Section.METADATA)
        if len(raw) < METADATA.size:
            raise PackageLayoutError("metadata section: shorter than its header")
        created, flags, cve_count = METADATA.unpack_from(raw)
        if flags & ~METADATA_CREATED:
            raise PackageFieldError(f"metadata flags {flags:#x}")
        if not flags & METADATA_CREATED and created:
            raise PackageFieldError("metadata: a creation time without its flag")
        if cve_count > LIMITS.cve_ids:
            raise PackageLimitError(f"{cve_count} CVE ids, the limit is {LIMITS.cve_ids}")
        position = METADATA.size

        def text(what: str) -> str:
            nonlocal position
            if position + 2 > len(raw):
                raise PackageLayoutError(f"metadata: {what} runs past the section")
            (length,) = U16.unpack_from(raw, position)
            if length > LIMITS.string_bytes:
                raise PackageLimitError(f"metadata: {what} of {length} bytes, the limit is {LIMITS.string_bytes}")
            begin = position + 2
            if begin + length + 1 > len(raw):
                raise PackageLayoutError(f"metadata: {what} runs past the section")
            if raw[begin + length] != 0:
                raise PackageEncodingError(f"metadata: {what} has no NUL terminator")
            position = begin + length + 1
            return _decode_text(f"metadata: {what}", raw[begin : begin + length])

        description, creator = text("description"), text("creator")
        cve_ids = tuple(self._nonempty(f"CVE id {i}", text(f"CVE id {i}")) for i in range(cve_count))
        if position != len(raw):
            raise PackageLayoutError("metadata: bytes after the last CVE id")
        return Metadata(description, cve_ids, creator, created if flags & METADATA_CREATED else None)

    # -- record sections

    def _records(self, kind: Section, record: struct.Struct, limit: int) -> Iterable[tuple]:
        raw = self.section(kind)
        if len(raw) % record.size:
            raise PackageLayoutError(f"{kind.name} section: {len(raw)} bytes is not a whole number of records")
        if len(raw) // record.size > limit:
            raise PackageLimitError(f"{len(raw) // record.size} {kind.name.lower()} records, the limit is {limit}")
        return record.iter_unpack(raw)

    def read_blobs(self) -> tuple[Blob, ...]:
        data = self.section(Section.BLOB_DATA)
        blobs: list[Blob] = []
        data_end, total = 0, 0
        for index, fields in enumerate(self._records(Section.BLOBS, BLOB, LIMITS.blobs)):
            kind, log2, reserved, size, data_offset, data_size = fields
            what = f"blob {index}"
            if kind not in BLOB_KINDS:
                raise PackageFieldError(f"{what}: unknown kind {kind}")
            if log2 > 12:
                raise PackageFieldError(f"{what}: alignment 2**{log2} is above 4096")
            _reserved_zero(what, reserved)
            if size == 0:
                raise PackageFieldError(f"{what}: size must not be 0")
            if size > LIMITS.blob_size:
                raise PackageLimitError(f"{what}: size {size} exceeds the limit {LIMITS.blob_size}")
            if kind == BlobKind.BSS:
                if data_offset or data_size:
                    raise PackageLayoutError(f"{what}: a BSS blob carries no bytes")
                content = b""
            else:
                if data_size != size:
                    raise PackageLayoutError(f"{what}: {data_size} bytes of data for size {size}")
                if data_offset != align8(data_end):
                    raise PackageLayoutError(f"{what}: data at {data_offset:#x}, expected {align8(data_end):#x}")
                if data_offset + data_size > len(data):
                    raise PackageLayoutError(f"{what}: data runs past the blob data section")
                if any(data[data_end:data_offset]):
                    raise PackageLayoutError(f"{what}: padding before its data is not zero")
                content = data[data_offset : data_offset + data_size]
                data_end = data_offset + data_size
            total += size
            if total > LIMITS.total_blob_size:
                raise PackageLimitError(f"blobs take more than {LIMITS.total_blob_size} bytes in memory")
            blobs.append(Blob(index, BlobKind(kind), 1 << log2, content, size))
        if data_end != len(data):
            raise PackageLayoutError("blob data section: bytes after the last blob's data")
        return tuple(blobs)

    def read_fixups(self) -> tuple[Fixup, ...]:
        fixups: list[Fixup] = []
        previous = (-1, -1)
        for index, fields in enumerate(self._records(Section.FIXUPS, FIXUP, LIMITS.fixups)):
            blob, offset, kind, target_kind, reserved, a, b, reserved2, addend = fields
            what = f"fixup {index}"
            if kind not in FIXUP_KINDS:
                raise PackageFieldError(f"{what}: unknown kind {kind}")
            if target_kind not in TARGET_KINDS:
                raise PackageFieldError(f"{what}: unknown target kind {target_kind}")
            _reserved_zero(what, reserved, reserved2)
            target: BaselineRVA | BlobTarget | ImportTarget
            if target_kind == TargetKind.BASELINE_RVA:
                if b:
                    raise PackageFieldError(f"{what}: second target field of an RVA target is not 0")
                target = BaselineRVA(a)
            elif target_kind == TargetKind.BLOB:
                target = BlobTarget(a, b)
            else:
                dll, name = self.string(f"{what} DLL", a), self.string(f"{what} symbol", b)
                target = ImportTarget(self._nonempty(f"{what} DLL", dll), self._nonempty(f"{what} symbol", name))
            if (blob, offset) <= previous:
                raise PackageLayoutError(f"{what}: not in (blob, offset) order")
            previous = (blob, offset)
            fixups.append(Fixup(blob, offset, FixupKind(kind), target, addend))
        return tuple(fixups)

    def read_sites(self) -> tuple[PatchSite, ...]:
        sites: list[PatchSite] = []
        previous = -1
        for index, fields in enumerate(self._records(Section.SITES, SITE, LIMITS.sites)):
            (rva, function, target_blob, target_offset, strategy, fallback_count, fallback_bytes,
             expected_size, padding_size, flags, padding_rva, reserved, expected, padding) = fields
            what = f"site {index}"
            name = self.string(f"{what} function", function)
            if strategy not in STRATEGY_CODES:
                raise PackageFieldError(f"{what}: unknown strategy {strategy}")
            if fallback_count > 2:
                raise PackageFieldError(f"{what}: {fallback_count} fallbacks, at most 2")
            used, unused = fallback_bytes[:fallback_count], fallback_bytes[fallback_count:]
            if any(f not in STRATEGY_CODES for f in used) or any(unused):
                raise PackageFieldError(f"{what}: bad fallback strategies {fallback_bytes.hex()}")
            if not 1 <= expected_size <= LIMITS.expected_bytes or padding_size > LIMITS.expected_bytes:
                raise PackageFieldError(f"{what}: expected/padding sizes {expected_size}/{padding_size}")
            if flags & ~SITE_HAS_PADDING or reserved:
                raise PackageFieldError(f"{what}: unknown flags or reserved field set")
            if not flags & SITE_HAS_PADDING and (padding_rva or padding_size):
                raise PackageFieldError(f"{what}: padding fields without the padding flag")
            if any(expected[expected_size:]) or any(padding[padding_size:]):
                raise PackageFieldError(f"{what}: bytes after the expected or padding bytes are not 0")
            site = PatchSite(
                rva, self._nonempty(f"{what} function", name), expected[:expected_size], target_blob,
                target_offset, Strategy.from_code(strategy),
                tuple(Strategy.from_code(f) for f in fallback_bytes[:fallback_count]),
                padding_rva if flags & SITE_HAS_PADDING else None, padding[:padding_size],
            )
            if rva <= previous:
                raise PackageLayoutError(f"{what}: not in RVA order")
            previous = rva
            sites.append(site)
        return tuple(sites)

    def read_unwind(self) -> tuple[UnwindEntry, ...]:
        entries: list[UnwindEntry] = []
        previous = (-1, -1)
        for index, fields in enumerate(self._records(Section.UNWIND, UNWIND, LIMITS.unwind_entries)):
            code_blob, begin, end, unwind_blob, unwind_offset, reserved = fields
            _reserved_zero(f"unwind entry {index}", reserved)
            entry = UnwindEntry(code_blob, begin, end, unwind_blob, unwind_offset)
            if (code_blob, begin) <= previous:
                raise PackageLayoutError(f"unwind entry {index}: not in (blob, begin) order")
            previous = (code_blob, begin)
            entries.append(entry)
        return tuple(entries)


def _parse(data: bytes) -> tuple[Package, bytes]:
    reader = _Reader(data)
    content_size, signed = reader.read_header()
    digest = reader.check_hash(content_size)
    reader.read_section_table(content_size)
    reader.read_strings()
    target = reader.read_target()
    baseline_id, sequence = reader.read_baseline()
    metadata = reader.read_metadata()
    blobs = reader.read_blobs()
    fixups = reader.read_fixups()
    sites = reader.read_sites()
    unwind = reader.read_unwind()
    public_key = signature = None
    if signed:
        block = content_size + HASH_SIZE
        public_key, signature = data[block : block + 32], data[block + 32 : block + SIGNATURE_BLOCK_SIZE]
    package = Package(
        target=target, baseline_id=baseline_id, sequence=sequence, metadata=metadata, blobs=blobs,
        fixups=fixups, sites=sites, unwind=unwind, signature=signature, signer_public_key=public_key,
    )
    return package, digest


def read(
    data: bytes | bytearray | memoryview,
    trusted_keys: Iterable[bytes | str] | None = None,
    require_signature: bool = False,
) -> tuple[Package, bytes]:
    """Parse and check .hpk bytes: the package and its content SHA-256; every problem raises a ``PackageError``.

    The structure is checked first, then the signature: a signed package must
    verify; ``trusted_keys`` (raw 32-byte or hex Ed25519 public keys) demands a
    signature by one of them; ``require_signature`` demands a valid signature.
    """
    trusted = None if trusted_keys is None else normalize_public_keys(trusted_keys)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PackageFieldError(f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    try:
        package, digest = _parse(raw)
    except PackageError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError) as exc:
        # A reader bug must still reach the caller as a PackageError; the mutation tests fail on this message.
        raise PackageLayoutError(f"internal reader error ({type(exc).__name__}: {exc})") from None
    if package.signature is None or package.signer_public_key is None:
        if require_signature or trusted is not None:
            raise PackageUnsignedError("the package is not signed, and a signature is required")
        return package, digest
    if not verify(package.signer_public_key, package.signature, digest):
        raise PackageSignatureError("the Ed25519 signature does not verify: the package was altered or mis-signed")
    if trusted is not None and package.signer_public_key not in trusted:
        raise PackageUntrustedError(f"signed by {package.signer_public_key.hex()}, which is not a trusted key")
    return package, digest


def read_file(
    path: str | Path, trusted_keys: Iterable[bytes | str] | None = None, require_signature: bool = False
) -> tuple[Package, bytes]:
    """``read`` on a file; a file beyond the size limit is refused before it is read."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size > LIMITS.file_size:
                raise PackageLimitError(f"{path}: larger than the {LIMITS.file_size}-byte limit")
            data = handle.read(LIMITS.file_size + 1)  # a pipe has no size: read one byte past the limit
    except OSError as exc:
        raise PackageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return read(data, trusted_keys=trusted_keys, require_signature=require_signature)
