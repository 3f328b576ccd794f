"""Writing a train's outputs so that each file is complete or absent (temporary file, then rename)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import orjson

__all__ = ["write_bytes", "write_json"]


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a reader (or a resumed train) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    # os.open, not mkstemp: the file gets the user's umask like any other output, not 0600
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json(path: Path, document: dict[str, Any]) -> None:
    write_bytes(path, orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
