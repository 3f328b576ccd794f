"""The .hpk byte format: the writer (specified in docs/FORMAT.md), reading, and a package's identity.

``load``/``loads`` check through reader.py and remember the content digest they computed; a
package's digest, id and signature state are functions of the format (``content_sha256_of``,
``package_id_of``, ``signature_state_of``), so the model stays plain data.

The writer emits the one canonical layout of a model (sections in a fixed
order, 8-byte aligned, zero padding, strings in order of first use), so the
same model always gives the same bytes. The reader (reader.py) accepts
exactly that layout; the record structures are wire.py's.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PackageLimitError, PackageSignatureError
from .model import FORMAT_VERSION, LIMITS, BaselineRVA, Blob, BlobKind, BlobTarget, Fixup, Metadata, Package, PatchSite
from .reader import read, read_file
from .signing import sign_digest, verify
from .wire import (
    BASELINE,
    BLOB,
    FIXUP,
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
    STRINGS,
    TARGET,
    U16,
    UNWIND,
    Section,
    TargetKind,
    align8,
    signed_message,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "SIGNATURE_BLOCK_SIZE",
    "Section",
    "content_sha256_of",
    "dumps",
    "encode_content",
    "load",
    "loads",
    "package_id_of",
    "save",
    "signature_state_of",
    "signed_message",
]



class _StringTable:
    """Strings referenced by index, each stored once, in order of first use."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.index)
        return self.index[text]

    def encode(self) -> bytes:
        if len(self.index) > LIMITS.strings:
            raise PackageLimitError(f"{len(self.index)} distinct strings, the limit is {LIMITS.strings}")
        entries, data = [], bytearray()
        for text in self.index:
            raw = text.encode("utf-8")
            entries.append(STRINGS.pack(len(data), len(raw)))
            data += raw + b"\x00"
        return STRINGS.pack(len(self.index), 0) + b"".join(entries) + bytes(data)


def _str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return U16.pack(len(raw)) + raw + b"\x00"


def _encode_metadata(metadata: Metadata) -> bytes:
    created = 0 if metadata.created is None else metadata.created
    flags = 0 if metadata.created is None else METADATA_CREATED
    parts = [METADATA.pack(created, flags, len(metadata.cve_ids)), _str(metadata.description), _str(metadata.creator)]
    parts += [_str(cve) for cve in metadata.cve_ids]
    return b"".join(parts)


def _encode_blobs(blobs: tuple[Blob, ...]) -> tuple[bytes, bytes]:
    table, data = [], bytearray()
    for blob in blobs:
        if blob.kind is BlobKind.BSS:
            table.append(BLOB.pack(blob.kind, blob.alignment_log2, 0, blob.size, 0, 0))
            continue
        data += bytes(align8(len(data)) - len(data))
        table.append(BLOB.pack(blob.kind, blob.alignment_log2, 0, blob.size, len(data), len(blob.data)))
        data += blob.data
    return b"".join(table), bytes(data)


def _encode_fixup(fixup: Fixup, strings: _StringTable) -> bytes:
    target = fixup.target
    if isinstance(target, BaselineRVA):
        kind, a, b = TargetKind.BASELINE_RVA, target.rva, 0
    elif isinstance(target, BlobTarget):
        kind, a, b = TargetKind.BLOB, target.blob, target.offset
    else:
        kind, a, b = TargetKind.IMPORT, strings.add(target.dll), strings.add(target.name)
    return FIXUP.pack(fixup.blob, fixup.offset, fixup.kind, kind, 0, a, b, 0, fixup.addend)


def _encode_site(site: PatchSite, strings: _StringTable) -> bytes:
    fallbacks = bytes(f.code for f in site.fallbacks).ljust(2, b"\x00")
    flags = 0 if site.padding_rva is None else SITE_HAS_PADDING
    return SITE.pack(
        site.rva, strings.add(site.function), site.target_blob, site.target_offset,
        site.strategy.code, len(site.fallbacks), fallbacks, len(site.expected), len(site.padding_expected),
        flags, site.padding_rva or 0, 0, site.expected, site.padding_expected,
    )


def encode_content(package: Package) -> bytes:
    """Header, section table and sections: the bytes the content SHA-256 covers."""
    strings = _StringTable()
    target = package.target
    blob_table, blob_data = _encode_blobs(package.blobs)
    payloads = [
        TARGET.pack(strings.add(target.module_name), target.timedatestamp, target.size_of_image,
                     target.checksum, target.code_sha256),
        BASELINE.pack(strings.add(package.baseline_id), package.sequence),
        _encode_metadata(package.metadata),
        blob_table,
        blob_data,
        b"".join(_encode_fixup(fixup, strings) for fixup in package.fixups),
        b"".join(_encode_site(site, strings) for site in package.sites),
        b"".join(UNWIND.pack(u.code_blob, u.begin, u.end, u.unwind_blob, u.unwind_offset, 0) for u in package.unwind),
    ]
    payloads.append(strings.encode())
    table, body, offset = [], bytearray(), SECTIONS_START
    for kind, payload in zip(Section, payloads):
        table.append(SECTION_ENTRY.pack(kind, 0, offset, len(payload)))
        body += payload + bytes(align8(len(payload)) - len(payload))
        offset = align8(offset + len(payload))
    if offset + HASH_SIZE + SIGNATURE_BLOCK_SIZE > LIMITS.file_size:
        raise PackageLimitError(f"the package would take {offset} bytes, the limit is {LIMITS.file_size}")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, SECTION_COUNT, 0, offset)
    return header + b"".join(table) + bytes(body)


def dumps(package: Package, sign_key: Ed25519PrivateKey | None = None) -> bytes:
    """The .hpk bytes: content, content SHA-256, and the signature block when signed."""
    content = encode_content(package)
    digest = hashlib.sha256(content).digest()
    if sign_key is not None:
        public_key, signature = sign_digest(sign_key, digest)
        return content + digest + public_key + signature
    if package.signature is None or package.signer_public_key is None:
        return content + digest
    if not verify(package.signer_public_key, package.signature, digest):
        raise PackageSignatureError("the signature the package carries does not match its content; sign it again")
    return content + digest + package.signer_public_key + package.signature


def save(package: Package, path: str | Path, sign_key: Ed25519PrivateKey | None = None) -> None:
    """``dumps`` into a file."""
    Path(path).write_bytes(dumps(package, sign_key))


def loads(
    data: bytes | bytearray | memoryview,
    trusted_keys: Iterable[bytes | str] | None = None,
    require_signature: bool = False,
) -> Package:
    """Parse and check .hpk bytes; every problem raises a ``PackageError`` subclass.

    A signed package must verify; ``trusted_keys`` (raw 32-byte or hex Ed25519 public keys)
    demands a signature by one of them; ``require_signature`` demands a valid signature.
    """
    return _remember(*read(data, trusted_keys=trusted_keys, require_signature=require_signature))


def load(
    path: str | Path, trusted_keys: Iterable[bytes | str] | None = None, require_signature: bool = False
) -> Package:
    """``loads`` on a file; a file beyond the size limit is refused before it is read."""
    return _remember(*read_file(path, trusted_keys=trusted_keys, require_signature=require_signature))


# ---------------------------------------------------------------- identity

# content digests by package object: a Package is frozen, so its content (and digest) never changes;
# an entry goes when its package does
_DIGESTS: dict[int, bytes] = {}


def _remember(package: Package, digest: bytes) -> Package:
    _DIGESTS[id(package)] = digest
    weakref.finalize(package, _DIGESTS.pop, id(package), None)
    return package


def content_sha256_of(package: Package) -> bytes:
    """SHA-256 of the content (everything before the hash); the signature signs it."""
    digest = _DIGESTS.get(id(package))
    if digest is None:
        digest = hashlib.sha256(encode_content(package)).digest()
        _remember(package, digest)
    return digest


def package_id_of(package: Package) -> str:
    """A stable short id: the first 8 bytes of the content SHA-256, in hex."""
    return content_sha256_of(package)[:8].hex()


def signature_state_of(package: Package) -> str:
    """"unsigned", "valid" (verifies against the content) or "invalid"."""
    if package.signature is None or package.signer_public_key is None:
        return "unsigned"
    return "valid" if verify(package.signer_public_key, package.signature, content_sha256_of(package)) else "invalid"
