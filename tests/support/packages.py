"""Package models for tests, built with the model rather than the builder.

Synthetic ones (``rich_model``, ``minimal_model``) hold every kind of blob, fixup, site and unwind
entry, for the format's round trips and the readers' fuzz; ``package`` and ``simple`` redirect
exports of a real fixture DLL to assembled code, for the live tests.
"""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from hotpatch.apply.redirects import assemble
from hotpatch.package.model import (
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    FixupTarget,
    ImportTarget,
    Metadata,
    Package,
    PatchSite,
    Strategy,
    TargetIdentity,
    UnwindEntry,
)
from hotpatch.pe.image import Image

# ---------------------------------------------------------------- synthetic packages

# UNWIND_INFO: version 1 with two codes; with an exception handler RVA; chained to another function
UNWIND_PLAIN = bytes([0x01, 0x04, 0x02, 0x00, 0x04, 0x02, 0x01, 0x50])
UNWIND_HANDLER = bytes([0x09, 0x01, 0x01, 0x00, 0x01, 0x50, 0x00, 0x00]) + bytes(4)
UNWIND_CHAINED = bytes([0x21, 0x00, 0x00, 0x00]) + struct.pack("<III", 0x1000, 0x1040, 0x2000)
RODATA_UNWIND = UNWIND_PLAIN + UNWIND_HANDLER + UNWIND_CHAINED + b"hello, world\x00\x00\x00\x00"


def synthetic_identity(module: str = "target.dll") -> TargetIdentity:
    return TargetIdentity(module, 0x5F3E2A10, 0x40000, 0x0004_A1B2, bytes(range(1, 33)))


def rich_model(rng: random.Random, *, unicode: bool = True) -> Package:
    """Several blobs of each kind, fixups of each kind and target, sites of each strategy, unwind entries."""
    def code(size: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(size))

    blobs = (
        Blob(0, BlobKind.CODE, 16, code(64), 64),
        Blob(1, BlobKind.CODE, 16, code(40), 40),
        Blob(2, BlobKind.RODATA, 8, RODATA_UNWIND, len(RODATA_UNWIND)),
        Blob(3, BlobKind.RODATA, 4, b"constant table", 14),
        Blob(4, BlobKind.DATA, 8, code(24), 24),
        Blob(5, BlobKind.DATA, 1, b"\x01\x02\x03", 3),
        Blob(6, BlobKind.BSS, 16, b"", 256),
        Blob(7, BlobKind.BSS, 4096, b"", 4096),
        Blob(8, BlobKind.CODE, 1, code(20), 20),
    )
    kernel32 = "KERNEL32.dll"
    fixups = (
        Fixup(0, 1, FixupKind.REL32, BaselineRVA(0x1200), -4),
        Fixup(0, 8, FixupKind.REL32, BlobTarget(3, 4), -4),
        Fixup(0, 16, FixupKind.REL32, ImportTarget(kernel32, "GetTickCount"), -4),
        Fixup(0, 24, FixupKind.ABS64, BlobTarget(6, 0)),
        Fixup(0, 32, FixupKind.ABS64, BaselineRVA(0x3000), 0x10),
        Fixup(0, 40, FixupKind.ABS64, ImportTarget(kernel32, "Sleep")),
        Fixup(0, 48, FixupKind.IMAGE_REL32, BaselineRVA(0x2000)),
        Fixup(0, 52, FixupKind.IMAGE_REL32, BlobTarget(1, 0)),
        Fixup(0, 56, FixupKind.IMAGE_REL32, ImportTarget("ucrtbase.dll", "memcpy"), 1 << 40),
        Fixup(2, 16, FixupKind.IMAGE_REL32, BlobTarget(1, 8)),  # the exception handler RVA of UNWIND_HANDLER
        Fixup(4, 0, FixupKind.ABS64, BlobTarget(0, 64)),  # one past the end of a blob is a valid target
        Fixup(4, 8, FixupKind.ABS64, ImportTarget("ucrtbase.dll", "memset"), -(1 << 63)),
        Fixup(8, 3, FixupKind.REL32, ImportTarget("ucrtbase.dll", "memcpy"), -4),
    )
    sites = (
        PatchSite(0x1100, "patched_entry", code(14), 0, 0, Strategy.SHORT_JMP_PADDING,
                  (Strategy.REL32_JMP, Strategy.ABS_JMP), 0x10F8, b"\xcc" * 8),
        PatchSite(0x1200, "with_fallback", code(14), 1, 0, Strategy.REL32_JMP, (Strategy.ABS_JMP,)),
        PatchSite(0x1300, "absolute", code(16), 8, 0, Strategy.ABS_JMP),
        PatchSite(0x1400, "rel32_only", code(5), 0, 32, Strategy.REL32_JMP),
        PatchSite(0x1500, "padding_after", b"\xeb\x10", 1, 8, Strategy.SHORT_JMP_PADDING, (), 0x1502, b"\x90" * 5),
        PatchSite(0x1600, "short_function", b"\x31\xc0\xc3" + b"\xcc" * 11, 1, 16, Strategy.SHORT_JMP_PADDING,
                  (Strategy.ABS_JMP,), 0x1608, b"\xcc" * 6),
    )
    unwind = (
        UnwindEntry(0, 0, 30, 2, 0),
        UnwindEntry(0, 30, 64, 2, 8),
        UnwindEntry(1, 0, 40, 2, 20),
        UnwindEntry(8, 0, 20, 2, 0),
    )
    description = "Fix für das Überlauf-Problem — ✓ 🔒" if unicode else "Fix the overflow"
    metadata = Metadata(description, ("CVE-2024-0001", "CVE-2024-21338"), "hotpatch 0.1.0", 1_700_000_000)
    return Package(
        target=synthetic_identity("målmodul.dll" if unicode else "target.dll"), baseline_id="2024.01-baseline",
        sequence=3, metadata=metadata, blobs=blobs, fixups=fixups, sites=sites, unwind=unwind,
    )


def minimal_model() -> Package:
    """One code blob, one site: the smallest useful package, no metadata."""
    return Package(
        target=synthetic_identity(), baseline_id="b", sequence=0,
        blobs=(Blob(0, BlobKind.CODE, 1, b"\xc3", 1),),
        sites=(PatchSite(0x1000, "f", b"\x55\x48\x89\xe5\x90", 0, 0, Strategy.REL32_JMP),),
    )


# ---------------------------------------------------------------- packages for a fixture DLL


@dataclass
class Code:
    """A blob assembled line by line; a line may carry a rel32 fixup on its last four bytes."""

    blob: int
    data: bytearray = field(default_factory=bytearray)
    fixups: list[Fixup] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def label(self, name: str, align: int = 16) -> None:
        while len(self.data) % align:
            self.data += b"\xcc"
        self.labels[name] = len(self.data)

    def asm(self, text: str, target: FixupTarget | None = None) -> None:
        # Far placeholders make keystone pick the rel32/disp32 forms; the fixup overwrites them.
        encoding = assemble(text.replace("FAR", "0x10000000"), 0)
        self.data += encoding
        if target is not None:
            self.fixups.append(Fixup(self.blob, len(self.data) - 4, FixupKind.REL32, target, -4))


def identity_of(dll: Path, changed: dict[int, bytes] | None = None) -> TargetIdentity:
    """The DLL's identity; with ``changed`` (rva -> bytes), that of its code so modified."""
    image = Image.load(dll)
    ident = image.identity
    code_sha256 = bytes.fromhex(ident.code_sha256)
    if changed:
        memory = bytearray(image.memory)
        for rva, data in changed.items():
            memory[rva : rva + len(data)] = data
        code_sha256 = hashlib.sha256(
            b"".join(memory[s.rva : s.end_rva] for s in image.sections if s.executable)
        ).digest()
    return TargetIdentity(dll.name, ident.timedatestamp, ident.size_of_image, ident.checksum, code_sha256)


def export_rva(dll: Path, name: str) -> int:
    (rva,) = [e.rva for e in Image.load(dll).exports if e.name == name]
    return rva


def site(dll: Path, name: str, offset: int = 0, strategy: Strategy = Strategy.REL32_JMP, **kw: object) -> PatchSite:
    rva = export_rva(dll, name)
    kw.setdefault("fallbacks", (Strategy.ABS_JMP,))
    size = 16 if Strategy.ABS_JMP in (strategy, *kw["fallbacks"]) else 5  # type: ignore[operator]
    return PatchSite(rva, name, Image.load(dll).read(rva, size), 0, offset, strategy, **kw)  # type: ignore[arg-type]


def package(dll: Path, functions: dict[str, str], baseline_id: str = "body", sequence: int = 1, **kw: object):
    """A package redirecting each named export to the assembly given (BASELINE:name is a rel32 to it)."""
    code = Code(0)
    sites = []
    for name, text in functions.items():
        code.label(name)
        for line in text.strip().splitlines():
            target = None
            if "BASELINE:" in line:
                line, _, callee = line.partition("BASELINE:")
                line += "FAR"
                target = BaselineRVA(export_rva(dll, callee.strip()))
            code.asm(line.strip(), target)
        sites.append(site(dll, name, code.labels[name]))
    blob = Blob(0, BlobKind.CODE, 16, bytes(code.data), len(code.data))
    return Package(
        target=identity_of(dll),
        baseline_id=baseline_id,
        sequence=sequence,
        blobs=(blob,),
        fixups=tuple(code.fixups),
        sites=tuple(sites),
        **kw,  # type: ignore[arg-type]
    )


def simple(dll: Path) -> Package:
    """scale(x) = 5x - 2 (33 for 7)."""
    return package(dll, {"scale": "lea rax, [rcx + rcx*4 - 2]\nret"}, baseline_id="simple")
