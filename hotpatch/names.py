"""Names read from a PE file as text: the one escaped form used everywhere they are shown.

Names in PE are bytes (export and import names, DLL names, COFF symbols,
section names); nothing makes them UTF-8. They are decoded once, where the
image is read: valid UTF-8 as it is, every other byte as ``\\xNN``
(Python's ``backslashreplace``). The result is plain text, so JSON output,
tables and comparisons never meet bytes or lone surrogates, and a name shows
the same in ``info``, ``functions``, ``diff`` and the reports.
"""

from __future__ import annotations

__all__ = ["pe_name"]


def pe_name(raw: str | bytes | bytearray) -> str:
    """The text form of a name as LIEF or the headers give it (LIEF hands back bytes when it is not UTF-8)."""
    if isinstance(raw, str):
        return raw
    return bytes(raw).decode("utf-8", "backslashreplace")
