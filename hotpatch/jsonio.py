"""JSON out, through orjson: the documents (functions, diff, batch results) run to megabytes.

orjson writes UTF-8 rather than ``\\u`` escapes and the same two-space layout as the standard
library's ``indent=2``; a document parses to the same value either way (docs/CLI.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = ["dumps", "dumps_streamed", "print_answer", "print_json", "write_json"]

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE


def dumps(document: Any, *, indent: bool = True) -> bytes:
    """The document as UTF-8 JSON bytes ending in a newline; two-space indented unless ``indent=False``."""
    return orjson.dumps(document, option=_OPTIONS | (orjson.OPT_INDENT_2 if indent else 0))


#: stands for the streamed list while the rest of the document is encoded (a NUL never occurs in our strings)
_PLACEHOLDER = "\x00hotpatch-streamed-list\x00"
#: list items encoded at a time
_CHUNK = 2048


def dumps_streamed(document: dict[str, Any], key: str, items: Iterable[Any]) -> Iterator[bytes]:
    """``dumps({**document, key: list(items)})`` in pieces, the same bytes: the list is encoded a chunk at a time
    and never held whole, nor its text (``document[key]`` gives the key's place and is not written).

    orjson's two-space layout puts an item of a list under a top-level key at four spaces; a chunk encoded
    on its own has them at two, so each of its line breaks gets two more spaces (a string never holds a raw
    line break: JSON escapes it).
    """
    head, tail = dumps({**document, key: _PLACEHOLDER}).split(orjson.dumps(_PLACEHOLDER), 1)
    yield head
    iterator = iter(items)
    chunk = list(islice(iterator, _CHUNK))
    if not chunk:
        yield b"[]"
    else:
        yield b"[\n"
        while chunk:
            text = orjson.dumps(chunk, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2)
            # the items without the chunk's own brackets: "[\n" + items + "\n]" indented whole is "[\n  " + the
            # items indented + "\n  ]", so one slice of it is the piece (one copy of megabytes, not three)
            yield text.replace(b"\n", b"\n  ")[2:-4]
            chunk = list(islice(iterator, _CHUNK))
            if chunk:
                yield b",\n"
        yield b"\n  ]"
    yield tail


def print_answer(document: Any, lines: Iterable[str], as_json: bool,
                 default: Callable[[Any], Any] | None = None) -> None:
    """A small command's answer on standard output: ``document`` as the standard library's indented JSON
    (``default`` for what JSON cannot hold), else ``lines``, one a line."""
    if as_json:
        json.dump(document, sys.stdout, indent=2, default=default)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


def print_json(document: Any, stream: IO[str] | None = None, pieces: Iterable[bytes] | None = None) -> None:
    """Write the document to standard output (or ``stream``) as indented JSON; ``pieces`` (from
    ``dumps_streamed``) are written instead of ``document`` when given."""
    out = stream or sys.stdout
    out.flush()
    buffer = getattr(out, "buffer", None)
    for piece in [dumps(document)] if pieces is None else pieces:
        if buffer is not None:
            buffer.write(piece)
        else:  # a text-only stream (tests capturing output)
            out.write(piece.decode())
    if buffer is not None:
        buffer.flush()


def write_json(path: str | Path, document: Any, pieces: Iterable[bytes] | None = None) -> None:
    """Write the document (or ``pieces`` from ``dumps_streamed``) to a file as indented JSON."""
    with open(path, "wb") as out:
        out.writelines([dumps(document)] if pieces is None else pieces)
