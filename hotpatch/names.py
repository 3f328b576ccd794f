"""Names read from a PE file as text: the one escaped form used everywhere they are shown.

Names in PE are bytes (export and import names, DLL names, COFF symbols,
section names); nothing makes them UTF-8, or printable. They are decoded
once, where the image is read: valid UTF-8 as it is, every other byte as
``\\xNN`` (Python's ``backslashreplace``), and every character that is not
printable (controls, line and paragraph separators) escaped the same way
(``\\xNN``, ``\\uNNNN``). The result is plain single-line text, so JSON
output, tables, one-line error messages and comparisons never meet bytes,
lone surrogates or line breaks, and a name shows the same in ``info``,
``functions``, ``diff`` and the reports.
"""

from __future__ import annotations

__all__ = ["pe_name"]


def _escape(char: str) -> str:
    if char == " " or char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def pe_name(raw: str | bytes | bytearray) -> str:
    """The text form of a name as LIEF or the headers give it (LIEF hands back bytes when it is not UTF-8)."""
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "backslashreplace")
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(map(_escape, text))
