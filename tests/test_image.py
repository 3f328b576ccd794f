"""The PE model: what it exposes, and how it refuses bad input."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hotpatch import (
    CorruptImageError,
    Image,
    NotPE32PlusError,
    NotPEError,
    TruncatedImageError,
    UnsupportedArchitectureError,
)
from hotpatch.pe.image import SCN_MEM_EXECUTE


@pytest.fixture(scope="module")
def sample(built_fixtures: Path) -> Path:
    return built_fixtures / "switch_table" / "baseline.dll"


def _pe_offset(data: bytes) -> int:
    return struct.unpack_from("<I", data, 0x3C)[0]


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_identity_matches_the_headers(sample: Path) -> None:
    data = sample.read_bytes()
    pe = _pe_offset(data)
    image = Image.load(sample)
    assert image.identity.machine == 0x8664
    assert image.identity.timedatestamp == struct.unpack_from("<I", data, pe + 8)[0]
    assert image.identity.size_of_image == struct.unpack_from("<I", data, pe + 24 + 56)[0]
    assert image.identity.checksum == struct.unpack_from("<I", data, pe + 24 + 64)[0]
    assert len(image.identity.code_sha256) == 64
    assert image.image_base == struct.unpack_from("<Q", data, pe + 24 + 24)[0]


def test_loading_from_bytes_equals_loading_from_path(sample: Path) -> None:
    from_path = Image.load(sample)
    from_bytes = Image.load(sample.read_bytes())
    assert from_bytes.identity == from_path.identity
    assert from_bytes.exports == from_path.exports
    assert from_bytes.memory == from_path.memory


def test_sections_have_permissions(sample: Path) -> None:
    image = Image.load(sample)
    text = next(s for s in image.sections if s.name == ".text")
    assert text.executable and text.readable and not text.writable
    assert text.characteristics & SCN_MEM_EXECUTE
    data = next(s for s in image.sections if s.name == ".data")
    assert data.writable and not data.executable
    assert image.read(text.rva, 16) == sample.read_bytes()[text.raw_offset:text.raw_offset + 16]


def test_exports_imports_and_relocations(built_fixtures: Path) -> None:
    image = Image.load(built_fixtures / "new_import" / "patched.dll")
    assert {e.name for e in image.exports} >= {"label_length", "negate"}
    kernel32 = [i for i in image.imports if i.dll.lower() == "kernel32.dll"]
    assert kernel32, "mingw DLLs import from kernel32"
    for imp in kernel32:
        assert image.import_at(imp.iat_rva) is imp
        assert image.section_from_rva(imp.iat_rva) is not None
    assert image.relocations == tuple(sorted(image.relocations))
    assert all(0 < rva < image.identity.size_of_image for rva in image.relocations)


def test_symbols_present_unless_stripped(built_fixtures: Path) -> None:
    full = Image.load(built_fixtures / "body_change" / "baseline.dll")
    stripped = Image.load(built_fixtures / "body_change" / "baseline-stripped.dll")
    assert any(s.is_function for s in full.symbols)
    assert stripped.symbols == ()
    exported = {e.name: e.rva for e in full.exports}
    by_name = {s.name: s.rva for s in full.symbols}
    for name, rva in exported.items():
        assert by_name[name] == rva


def test_pdata_chains_fold_into_their_root(rust_pyd: Path) -> None:
    image = Image.load(rust_pyd)
    assert len(image.runtime_functions) > 15000
    with_fragments = [f for f in image.runtime_functions if f.fragments]
    assert with_fragments, "MSVC images chain unwind info for split functions"
    roots = {f.begin_rva for f in image.runtime_functions}
    for function in with_fragments:
        for begin, _ in function.fragments:
            assert begin not in roots
    assert image.load_config.get("security_cookie")


# ── refusals: each kind of bad input has its own error ─────────────────────


def test_not_a_pe_is_refused() -> None:
    with pytest.raises(NotPEError):
        Image.load(b"\x7fELF" + bytes(200))
    with pytest.raises(NotPEError):
        Image.load(b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"NE\0\0" + bytes(300))


def test_truncated_file_is_refused(sample: Path) -> None:
    data = sample.read_bytes()
    for cut in (0x30, _pe_offset(data) + 10, len(data) // 2):
        with pytest.raises(TruncatedImageError):
            Image.load(data[:cut])


def test_pe32_is_refused(sample: Path) -> None:
    # A PE32 optional header starts with magic 0x10B (crafted: no i686 toolchain is installed).
    data = sample.read_bytes()
    pe32 = _patched(_patched(data, _pe_offset(data) + 24, "<H", 0x10B), _pe_offset(data) + 4, "<H", 0x14C)
    with pytest.raises(NotPE32PlusError, match="PE32"):
        Image.load(pe32)


@pytest.mark.parametrize("machine", [0xAA64, 0xA641])
def test_other_machines_are_refused(sample: Path, machine: int) -> None:
    data = sample.read_bytes()
    with pytest.raises(UnsupportedArchitectureError, match="ARM64"):
        Image.load(_patched(data, _pe_offset(data) + 4, "<H", machine))


def test_corrupt_directory_is_refused(sample: Path) -> None:
    data = sample.read_bytes()
    export_directory = _pe_offset(data) + 24 + 112
    with pytest.raises(CorruptImageError, match="data directory 0"):
        Image.load(_patched(data, export_directory, "<I", 0x7FFF0000))


def test_overlapping_sections_are_refused(sample: Path) -> None:
    data = sample.read_bytes()
    pe = _pe_offset(data)
    optional_size = struct.unpack_from("<H", data, pe + 20)[0]
    second_section_rva = pe + 24 + optional_size + 40 + 12
    with pytest.raises(CorruptImageError, match="overlap"):
        Image.load(_patched(data, second_section_rva, "<I", 0x1000))


@pytest.mark.parametrize("damage", ["not_pe", "truncated", "pe32", "arm64", "corrupt"])
def test_cli_refusal_is_one_line_and_exit_2(sample: Path, tmp_path: Path, damage: str) -> None:
    data = sample.read_bytes()
    pe = _pe_offset(data)
    bad = {
        "not_pe": b"hello world",
        "truncated": data[: len(data) // 3],
        "pe32": _patched(data, pe + 24, "<H", 0x10B),
        "arm64": _patched(data, pe + 4, "<H", 0xAA64),
        "corrupt": _patched(data, pe + 24 + 112, "<I", 0x7FFF0000),
    }[damage]
    target = tmp_path / "bad.dll"
    target.write_bytes(bad)
    for command in ("info", "functions"):
        result = subprocess.run([sys.executable, "-m", "hotpatch.cli", command, str(target)],
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hotpatch: error:"), result.stderr
        assert "Traceback" not in result.stderr
    # the diff reads both sides with the directory reader: the same refusal, whichever side is bad
    good = str(sample)
    for argv in ((str(target), good), (good, str(target))):
        result = subprocess.run([sys.executable, "-m", "hotpatch.cli", "diff", "--json", *argv],
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hotpatch: error:"), result.stderr
        assert "Traceback" not in result.stderr
