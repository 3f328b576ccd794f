"""JSON-ready views of images and functions, shared by the CLI and the Python API."""

from __future__ import annotations

from typing import Any

from ..analysis.functions import FunctionTable
from ..collector import gc_paused
from ..pe.image import Image

__all__ = ["function_rows", "image_info"]


def image_info(image: Image, table: FunctionTable) -> dict[str, Any]:
    return {
        "schema": "hotpatch.info/1",
        "path": image.path,
        "identity": image.identity.to_json(),
        "image_base": image.image_base,
        "entry_rva": image.entry_rva,
        "sections": [
            {"name": s.name, "rva": s.rva, "virtual_size": s.virtual_size, "raw_size": s.raw_size,
             "permissions": s.permissions}
            for s in image.sections
        ],
        "counts": {
            "functions": len(table),
            "functions_by_source": table.counts_by_source(),
            "imports": len(image.imports),
            "exports": len(image.exports),
            "relocations": len(image.relocations),
            "symbols": len(image.symbols),
            "runtime_functions": len(image.runtime_functions),
            "instructions": sum(a.instruction_count for a in table.analyses),
        },
        "coverage": table.coverage(),
        "has_tls": image.has_tls,
        "load_config": image.load_config,
    }


def function_rows(table: FunctionTable) -> list[dict[str, Any]]:
    # analyses run parallel to functions (analysis_of is a lookup by index); tens of thousands of rows
    # are acyclic dicts, so the collector is paused rather than scanning them again and again
    with gc_paused():
        return [
            {
                "name": f.name,
                "rva": f.rva,
                "size": f.end_rva - f.rva,
                "fragments": [list(r) for r in f.fragments] if f.fragments else [],
                "sources": list(f.sources),
                "pad_before": f.pad_before,
                "pad_after": f.pad_after,
                "instructions": a.instruction_count,
                "references": len(a.raw_refs),
                "fingerprint": f.fingerprint,
            }
            for f, a in zip(table.functions, table.analyses, strict=True)
        ]
