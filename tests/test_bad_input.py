"""Hostile PE input through the CLI: names that are not UTF-8, a SizeOfImage the sections do not need,
values LIEF's enums do not know. Fixtures are patched byte-wise; every run ends in exit 0 with clean
stderr or exit 2 with one line (tests/fuzz_pe.py does the same at scale)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from hotpatch import CorruptImageError, Image
from hotpatch.cli import commands as cli
from hotpatch.names import pe_name

BAD = b"\xff\xfe"


@pytest.fixture(scope="module")
def dll(built_fixtures: Path) -> Path:
    return built_fixtures / "body_change" / "baseline.dll"  # COFF symbols kept


def _headers(data: bytes) -> tuple[int, int]:
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    return pe, pe + 24


def _file_offset(image: Image, rva: int) -> int:
    section = image.section_from_rva(rva)
    assert section is not None
    return section.raw_offset + rva - section.rva


def _symbol_name_offset(data: bytes, name: bytes) -> int:
    """Where a COFF symbol's name bytes are: inline (up to 8 bytes) or in the string table."""
    pe, _ = _headers(data)
    table, count = struct.unpack_from("<II", data, pe + 12)
    strings = table + 18 * count
    for index in range(count):
        record = table + 18 * index
        if data[record:record + 4] == bytes(4):
            at = strings + struct.unpack_from("<I", data, record + 4)[0]
            if data[at:at + len(name) + 1] == name + b"\0":
                return at
        elif data[record:record + 8].rstrip(b"\0") == name:
            return record
    raise AssertionError(f"no symbol {name!r}")


def _strings(document: object) -> set[str]:
    """Every string in a JSON document, and every word of each."""
    if isinstance(document, str):
        return {document, *document.split()}
    if isinstance(document, dict):
        return set().union(*map(_strings, document.values())) if document else set()
    if isinstance(document, list):
        return set().union(*map(_strings, document)) if document else set()
    return set()


def run(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def test_pe_name_escapes_what_is_not_utf8() -> None:
    assert pe_name(b"scale") == "scale"
    assert pe_name("déjà") == "déjà"
    assert pe_name("déjà".encode()) == "déjà"
    assert pe_name(b"\xffcale\x80") == "\\xffcale\\x80"
    json.dumps(pe_name(b"\xed\xa0\x80"))  # an encoded surrogate is escaped too, so JSON can hold it
    # one line whatever the bytes: controls and separators are escaped as well
    assert pe_name(b"a\nb\r\x1c\x7f") == "a\\x0ab\\x0d\\x1c\\x7f"
    assert pe_name("x\u2028y\x85") == "x\\u2028y\\x85"
    assert pe_name(b"two words") == "two words"


def test_non_utf8_symbol_name_is_shown_escaped(dll: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    image = Image.load(dll)
    exported = {e.name for e in image.exports}
    # a function known only by its COFF symbol, so that name is the one shown
    symbol = next(s for s in image.symbols if s.is_function and s.name not in exported and len(s.name) > 3
                  and s.name.isidentifier() and not s.name.startswith("_"))
    data = bytearray(dll.read_bytes())
    at = _symbol_name_offset(bytes(data), symbol.name.encode())
    data[at:at + 2] = BAD
    bad = tmp_path / "symbol.dll"
    bad.write_bytes(data)
    escaped = "\\xff\\xfe" + symbol.name[2:]

    assert Image.load(bad).symbols != image.symbols
    assert escaped in {s.name for s in Image.load(bad).symbols}
    code, out, err = run(capfd, "info", str(bad))
    assert (code, err) == (0, "")
    code, out, err = run(capfd, "functions", "--json", str(bad))
    assert (code, err) == (0, "")
    assert escaped in {row["name"] for row in json.loads(out)["functions"]}
    code, out, err = run(capfd, "functions", str(bad))
    assert (code, err) == (0, "")


def test_non_utf8_export_name_keeps_json_whole(dll: Path, built_fixtures: Path, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    image = Image.load(dll)
    export = next(e for e in image.exports if e.name == "scale")
    data = bytearray(dll.read_bytes())
    _, optional = _headers(bytes(data))
    directory = _file_offset(image, struct.unpack_from("<I", data, optional + 112)[0])
    count, _, names = struct.unpack_from("<III", data, directory + 24)
    for index in range(count):
        at = _file_offset(image, struct.unpack_from("<I", data, _file_offset(image, names) + 4 * index)[0])
        if data[at:at + 6] == b"scale\0":
            data[at:at + 2] = BAD
    bad = tmp_path / "export.dll"
    bad.write_bytes(data)

    assert "\\xff\\xfeale" in {e.name for e in Image.load(bad).exports if e.rva == export.rva}
    code, out, err = run(capfd, "functions", "--json", str(bad))
    assert (code, err) == (0, "")
    assert "\\xff\\xfeale" in {row["name"] for row in json.loads(out)["functions"]}
    code, out, err = run(capfd, "diff", "--json", str(bad), str(built_fixtures / "body_change" / "patched.dll"))
    assert err == "" and code in (0, 3)
    document = json.loads(out)  # one whole document
    assert "\\xff\\xfeale" in _strings(document)


def test_size_of_image_the_sections_do_not_need_is_refused(dll: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    data = dll.read_bytes()
    _, optional = _headers(data)
    size_of_image = struct.unpack_from("<I", data, optional + 56)[0]
    for value, why in ((0xFFFFFFFF, "above the limit"), (size_of_image + 0x1000, "larger than the sections need"),
                       (0x7FFFF000, "larger than the sections need")):
        bad = bytearray(data)
        struct.pack_into("<I", bad, optional + 56, value)
        path = tmp_path / f"soi-{value:x}.dll"
        path.write_bytes(bad)
        started = time.monotonic()
        code, out, err = run(capfd, "info", str(path))
        assert code == 2 and err.count("\n") == 1 and why in err and "SizeOfImage" in err
        assert time.monotonic() - started < 5
        with pytest.raises(CorruptImageError):
            Image.load(bytes(bad))


def test_corrupt_section_alignment_is_refused(dll: Path) -> None:
    data = bytearray(dll.read_bytes())
    _, optional = _headers(bytes(data))
    for value in (0, 0x1001):
        struct.pack_into("<I", data, optional + 32, value)
        with pytest.raises(CorruptImageError, match="SectionAlignment"):
            Image.load(bytes(data))


def test_values_lief_does_not_know_leave_stderr_clean(dll: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    image = Image.load(dll)
    data = bytes(dll.read_bytes())
    _, optional = _headers(data)
    reloc = _file_offset(image, struct.unpack_from("<I", data, optional + 112 + 8 * 5)[0])
    bad_reloc = bytearray(data)
    entry = struct.unpack_from("<H", bad_reloc, reloc + 8)[0]
    struct.pack_into("<H", bad_reloc, reloc + 8, (8 << 12) | (entry & 0xFFF))  # base relocation type 8
    bad_class = bytearray(data)
    bad_class[_symbol_name_offset(data, b"scale") + 16] = 0x55  # storage class 85 (inline name: record + 16)
    for name, content in (("reloc.dll", bad_reloc), ("class.dll", bad_class)):
        path = tmp_path / name
        path.write_bytes(content)
        for argv in (("info",), ("info", "--json"), ("functions", "--json")):
            code, out, err = run(capfd, *argv, str(path))
            assert (code, err) == (0, ""), (name, argv, err)
    assert len(Image.load(bytes(bad_reloc)).relocations) == len(image.relocations) - 1
