"""The .hpk layout as constants: magic, section kinds, record structures, flags (docs/FORMAT.md).

``format`` writes it and ``reader`` checks it; native/hpk/ states the same in C.
"""

from __future__ import annotations

import enum
import struct

from .model import BlobKind, FixupKind, Strategy
from .signing import SIGNATURE_CONTEXT

__all__ = [
    "BASELINE",
    "BLOB",
    "BLOB_KINDS",
    "FIXUP",
    "FIXUP_KINDS",
    "HASH_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "METADATA",
    "METADATA_CREATED",
    "SECTIONS_START",
    "SECTION_COUNT",
    "SECTION_ENTRY",
    "SIGNATURE_BLOCK_SIZE",
    "SITE",
    "SITE_HAS_PADDING",
    "STRATEGY_CODES",
    "STRINGS",
    "Section",
    "TARGET",
    "TARGET_KINDS",
    "TargetKind",
    "U16",
    "UNWIND",
    "align8",
    "signed_message",
]

MAGIC = b"\x89HPK\r\n\x1a\n"
HEADER_SIZE = 32
HASH_SIZE = 32
SIGNATURE_BLOCK_SIZE = 32 + 64  # Ed25519 public key, then signature


class Section(enum.IntEnum):
    """Section kinds; a version 1 file has each exactly once, in this order."""

    TARGET = 1
    BASELINE = 2
    METADATA = 3
    BLOBS = 4
    BLOB_DATA = 5
    FIXUPS = 6
    SITES = 7
    UNWIND = 8
    STRINGS = 9


class TargetKind(enum.IntEnum):
    BASELINE_RVA = 1
    BLOB = 2
    IMPORT = 3


BLOB_KINDS = frozenset(int(kind) for kind in BlobKind)
FIXUP_KINDS = frozenset(int(kind) for kind in FixupKind)
TARGET_KINDS = frozenset(int(kind) for kind in TargetKind)
STRATEGY_CODES = frozenset(strategy.code for strategy in Strategy)

SECTION_COUNT = len(Section)
SECTIONS_START = HEADER_SIZE + 16 * SECTION_COUNT

HEADER = struct.Struct("<8sHHIIIQ")
SECTION_ENTRY = struct.Struct("<IIII")  # kind, reserved, offset, size
TARGET = struct.Struct("<IIII32s")  # module name, TimeDateStamp, SizeOfImage, CheckSum, code SHA-256
BASELINE = struct.Struct("<II")  # baseline id, sequence
METADATA = struct.Struct("<QII")  # created, flags, CVE count
BLOB = struct.Struct("<BBHIII")  # kind, log2 alignment, reserved, size, data offset, data size
FIXUP = struct.Struct("<IIBBHIIIq")  # blob, offset, kind, target kind, reserved, a, b, reserved, addend
SITE = struct.Struct("<IIIIBB2sBBHII32s32s")
UNWIND = struct.Struct("<IIIIII")  # code blob, begin, end, info blob, info offset, reserved
STRINGS = struct.Struct("<II")  # count, reserved; then count x (offset, length)
U16 = struct.Struct("<H")

METADATA_CREATED = 1
SITE_HAS_PADDING = 1


def align8(value: int) -> int:
    return (value + 7) & ~7


def signed_message(content_sha256: bytes) -> bytes:
    """The bytes the Ed25519 signature signs: a fixed 16-byte context, then the content SHA-256."""
    return SIGNATURE_CONTEXT + content_sha256
