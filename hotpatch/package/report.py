"""A readable and JSON view of a package, for ``hotpatch inspect`` and ``hotpatch build --json``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import capstone

from .model import BaselineRVA, BlobKind, BlobTarget, ImportTarget, Package

__all__ = ["package_json", "disassemble_blob"]


def _target(target: object) -> dict[str, Any]:
    """Where a fixup points, nested under ``target`` so a blob target never hides the fixup's own place."""
    if isinstance(target, BaselineRVA):
        return {"baseline_rva": target.rva}
    if isinstance(target, BlobTarget):
        return {"blob": target.blob, "offset": target.offset}
    assert isinstance(target, ImportTarget)
    return {"import": f"{target.dll}!{target.name}"}


def package_json(package: Package, with_fixups: bool = False) -> dict[str, Any]:
    """Identity, metadata, signature state, sites with strategies, blobs, fixups by kind."""
    meta = package.metadata
    document: dict[str, Any] = {
        "schema": "hotpatch.package/1",
        "package_id": package.package_id,
        "format_version": package.format_version,
        "target": {
            "module": package.target.module_name,
            "timedatestamp": package.target.timedatestamp,
            "size_of_image": package.target.size_of_image,
            "checksum": package.target.checksum,
            "code_sha256": package.target.code_sha256.hex(),
        },
        "baseline_id": package.baseline_id,
        "sequence": package.sequence,
        "metadata": {"description": meta.description, "cve_ids": list(meta.cve_ids), "creator": meta.creator,
                     "created": meta.created},
        "signature": {"state": package.signature_state, "public_key": package.signer_key_hex},
        "content_sha256": package.content_sha256.hex(),
        "sites": [
            {"function": s.function, "rva": s.rva, "strategy": s.strategy.name.lower(),
             "fallbacks": [f.name.lower() for f in s.fallbacks], "target_blob": s.target_blob,
             "target_offset": s.target_offset, "expected": s.expected.hex(), "padding_rva": s.padding_rva}
            for s in package.sites
        ],
        "blobs": [{"index": b.index, "kind": b.kind.name.lower(), "size": b.size, "alignment": b.alignment}
                  for b in package.blobs],
        "fixups_by_kind": dict(sorted(Counter(f.kind.name.lower() for f in package.fixups).items())),
        "fixups_by_target": dict(sorted(Counter(type(f.target).__name__ for f in package.fixups).items())),
        "imports": sorted({f"{f.target.dll}!{f.target.name}" for f in package.fixups
                           if isinstance(f.target, ImportTarget)}),
        "unwind_entries": len(package.unwind),
    }
    if with_fixups:
        document["fixups"] = [{"blob": f.blob, "offset": f.offset, "kind": f.kind.name.lower(),
                               "addend": f.addend, "target": _target(f.target)} for f in package.fixups]
    return document


def disassemble_blob(package: Package, index: int, limit: int = 64) -> list[str]:
    """The first instructions of a code blob (fixup fields show as zeros until apply time)."""
    blob = package.blobs[index]
    if blob.kind is not BlobKind.CODE:
        return []
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    lines = []
    for address, _, mnemonic, operands in md.disasm_lite(blob.data, 0):
        lines.append(f"{address:#06x}  {mnemonic} {operands}".rstrip())
        if len(lines) >= limit:
            break
    return lines
