"""JSON out, through orjson: the documents (functions, diff, batch results) run to megabytes.

orjson writes UTF-8 rather than ``\\u`` escapes and the same two-space layout as the standard
library's ``indent=2``; a document parses to the same value either way (docs/CLI.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = ["dumps", "print_json", "write_json"]

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE


def dumps(document: Any, *, indent: bool = True) -> bytes:
    """The document as UTF-8 JSON bytes ending in a newline; two-space indented unless ``indent=False``."""
    return orjson.dumps(document, option=_OPTIONS | (orjson.OPT_INDENT_2 if indent else 0))


def print_json(document: Any, stream: IO[str] | None = None) -> None:
    """Write the document to standard output (or ``stream``) as indented JSON."""
    out = stream or sys.stdout
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.write(dumps(document))
        buffer.flush()
    else:  # a text-only stream (tests capturing output)
        out.write(dumps(document).decode())


def write_json(path: str | Path, document: Any) -> None:
    """Write the document to a file as indented JSON."""
    Path(path).write_bytes(dumps(document))
