"""The command line's large tables (``functions``, the changed functions of ``diff``): every row, every cell
whole, in aligned plain-text columns."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from hotpatch.cli import commands as cli
from hotpatch.cli.columns import write_columns

FIXTURES = Path(__file__).resolve().parents[1] / "build" / "fixtures"


def test_columns_align_on_the_widest_cell_and_keep_every_row() -> None:
    out = io.StringIO()
    rows = [(f"f{i}", f"{i:#x}", "x" * (i % 7)) for i in range(5000)]  # more rows than one block
    write_columns(("name", "rva", "what"), rows, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + len(rows)
    assert lines[0] == "name   rva     what"
    starts = {line.index("0x") for line in lines[1:]}
    assert starts == {len("f4999") + 2}  # the rva column starts at one place on every line
    assert [line.split()[0] for line in lines[1:]] == [row[0] for row in rows]
    assert not any(line.endswith(" ") for line in lines[1:] if line.split()[-1].startswith("x"))


def test_functions_table_lists_what_json_lists(capfd: pytest.CaptureFixture[str]) -> None:
    dll = str(FIXTURES / "body_change" / "baseline.dll")
    assert cli.main(["functions", dll, "--json"]) == 0
    rows = json.loads(capfd.readouterr().out)["functions"]
    assert cli.main(["functions", dll]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "rva", "size", "sources", "pad", "before", "pad", "after", "fingerprint"]
    assert len(lines) == 1 + len(rows)
    for line, row in zip(lines[1:], rows):
        cells = line.split()
        assert cells[0] == (row["name"] or "-") and int(cells[1], 16) == row["rva"]
        assert cells[-1] == row["fingerprint"]  # whole, not cut at a terminal's width


def test_diff_table_lists_the_changed_functions(capfd: pytest.CaptureFixture[str]) -> None:
    case = FIXTURES / "body_change"
    assert cli.main(["diff", str(case / "baseline.dll"), str(case / "patched.dll")]) == 0
    out = capfd.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("status"))
    assert out[header + 1].split()[:2] == ["changed", "scale"]
    assert out[header + 2].startswith("verdict:")
