"""Large tables as plain aligned text, written as they are formatted.

rich lays a whole table out in memory before it prints a line: for the 20,000
functions of a large image that is seconds of CPU for a few megabytes of text
(and columns cut at the terminal's width). Tables that grow with the image
(``functions``, the changed functions of ``diff``) are written here instead,
a block of lines at a time. Cells are plain text: names read from a file are
already printable single-line text (``hotpatch.names``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

__all__ = ["write_columns"]

_BLOCK = 2048  # rows joined into one write


def write_columns(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """``header`` and ``rows`` as left-aligned columns two spaces apart, each as wide as its widest cell."""
    out = out or sys.stdout
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, title in enumerate(header)]
    last = len(header) - 1

    def line(cells: Sequence[str]) -> str:
        # the last column is not padded: no trailing blanks
        return "  ".join(cell.ljust(widths[i]) if i < last else cell for i, cell in enumerate(cells)) + "\n"

    out.write(line(header))
    for start in range(0, len(rows), _BLOCK):
        out.write("".join(line(row) for row in rows[start:start + _BLOCK]))
