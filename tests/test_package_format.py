"""The .hpk format: round trips, determinism, signatures, and the two readers held to one verdict."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import random
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hotpatch import errors
from hotpatch.package import (
    LIMITS,
    MAGIC,
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    Metadata,
    Package,
    PatchSite,
    Strategy,
    UnwindEntry,
    generate_keypair,
    load_private_key,
    load_public_key,
    write_keypair,
)
from hotpatch.package.format import (
    content_sha256_of,
    dumps,
    encode_content,
    load,
    loads,
    package_id_of,
    signature_state_of,
)
from tests.support import hpk_fuzz
from tests.support.hpk_fuzz import c_verdicts, python_verdict, rehash, render, resign
from tests.support.native import CFLAGS, HPK_SOURCES, build_check, build_library
from tests.support.packages import minimal_model, rich_model

MUTATION_CASES = 30_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


# ---------------------------------------------------------------- builds


@pytest.fixture(scope="session")
def hpk_check() -> Path:
    return build_check()


@pytest.fixture(scope="session")
def hpk_check_asan() -> Path:
    return build_check(sanitize=True)


@pytest.fixture(scope="session")
def libhpk() -> ctypes.CDLL:
    library = ctypes.CDLL(str(build_library()))
    library.hpk_sha256.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p]
    library.hpk_sha256.restype = None
    library.hpk_parse.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    library.hpk_parse.restype = ctypes.c_int
    library.hpk_strerror.argtypes = [ctypes.c_int]
    library.hpk_strerror.restype = ctypes.c_char_p
    return library


@pytest.fixture(scope="module")
def rich() -> Package:
    return rich_model(random.Random(5))


def c_check(binary: Path, data: bytes, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "case.hpk"
    path.write_bytes(data)
    return subprocess.run([str(binary), str(path), *args], capture_output=True, text=True)


def c_parse(library: ctypes.CDLL, data: bytes) -> tuple[int, str]:
    out = ctypes.create_string_buffer(4096)  # larger than hpk_package
    err = ctypes.create_string_buffer(256)
    code = library.hpk_parse(data, len(data), out, err, len(err))
    return code, err.value.decode()


# ---------------------------------------------------------------- model and bytes


def test_round_trip_gives_an_equal_model(rich: Package) -> None:
    assert loads(dumps(rich)) == rich
    minimal = minimal_model()
    assert loads(dumps(minimal)) == minimal


def test_same_model_gives_identical_bytes(rich: Package) -> None:
    shuffled = dataclasses.replace(
        rich, fixups=tuple(reversed(rich.fixups)), sites=tuple(reversed(rich.sites)), unwind=rich.unwind[::-1]
    )
    assert shuffled == rich  # records are kept in file order whatever order they come in
    assert dumps(shuffled) == dumps(rich)
    assert dumps(rich, KEY) == dumps(rich, KEY)  # Ed25519 is deterministic too
    assert dumps(loads(dumps(rich, KEY))) == dumps(rich, KEY)


def test_header_and_layout_are_as_documented(rich: Package) -> None:
    data = dumps(rich)
    magic, version, header_size, flags, count, reserved, content_size = struct.unpack_from("<8sHHIIIQ", data)
    assert (magic, version, header_size, flags, count, reserved) == (MAGIC, 1, 32, 0, 9, 0)
    assert len(data) == content_size + 32
    assert data[content_size:] == hashlib.sha256(data[:content_size]).digest() == content_sha256_of(rich)
    sections = [struct.unpack_from("<IIII", data, 32 + 16 * i) for i in range(9)]
    assert [kind for kind, *_ in sections] == list(range(1, 10))
    assert all(offset % 8 == 0 for _, _, offset, _ in sections)
    assert package_id_of(rich) == content_sha256_of(rich)[:8].hex()
    assert len(dumps(rich, KEY)) == content_size + 32 + 96


def test_package_id_does_not_change_when_signed(rich: Package) -> None:
    signed = loads(dumps(rich, KEY))
    assert package_id_of(signed) == package_id_of(rich)
    assert signature_state_of(signed) == "valid"
    assert signature_state_of(rich) == "unsigned"


def test_limits_are_the_same_in_python_and_c() -> None:
    header = (HPK_SOURCES / "hpk_reader.h").read_text()
    defines = {}
    for name, value, shift in re.findall(r"#define HPK_MAX_(\w+) \(?(\d+)u(?: << (\d+))?\)?", header):
        defines[name] = int(value) << int(shift or 0)
    assert defines == {
        "FILE_SIZE": LIMITS.file_size, "BLOBS": LIMITS.blobs, "BLOB_SIZE": LIMITS.blob_size,
        "TOTAL_BLOB_SIZE": LIMITS.total_blob_size, "FIXUPS": LIMITS.fixups, "SITES": LIMITS.sites,
        "UNWIND": LIMITS.unwind_entries, "STRINGS": LIMITS.strings, "STRING_BYTES": LIMITS.string_bytes,
        "CVE_IDS": LIMITS.cve_ids, "EXPECTED": LIMITS.expected_bytes, "ALIGN_LOG2": 12,
    }


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda p: dataclasses.replace(p, fixups=(*p.fixups, Fixup(0, 2, FixupKind.REL32, BaselineRVA(0)))),
         errors.PackageLayoutError),  # overlaps the fixup at offset 1
        (lambda p: dataclasses.replace(p, fixups=(Fixup(9, 0, FixupKind.ABS64, BaselineRVA(0)),)),
         errors.PackageLayoutError),  # no blob 9
        (lambda p: dataclasses.replace(p, fixups=(Fixup(6, 0, FixupKind.ABS64, BaselineRVA(0)),)),
         errors.PackageLayoutError),  # a BSS blob
        (lambda p: dataclasses.replace(p, fixups=(Fixup(5, 0, FixupKind.REL32, BaselineRVA(0)),)),
         errors.PackageLayoutError),  # 4 bytes in a 3-byte blob
        (lambda p: dataclasses.replace(p, fixups=(Fixup(5, 0, FixupKind.ABS64, BlobTarget(0, 65)),)),
         errors.PackageLayoutError),  # target past the end of its blob
        (lambda p: dataclasses.replace(p, sites=(*p.sites, PatchSite(0x1102, "x", bytes(5), 0, 0, Strategy.REL32_JMP))),
         errors.PackageLayoutError),  # overlaps a site
        (lambda p: dataclasses.replace(p, sites=(PatchSite(0x1000, "x", bytes(5), 2, 0, Strategy.REL32_JMP),)),
         errors.PackageLayoutError),  # aimed at a data blob
        (lambda p: dataclasses.replace(p, unwind=(UnwindEntry(0, 0, 65, 2, 0),)), errors.PackageLayoutError),
        (lambda p: dataclasses.replace(p, unwind=(UnwindEntry(0, 0, 8, 3, 0),)), errors.PackageFieldError),
        (lambda p: dataclasses.replace(p, sequence=1 << 32), errors.PackageFieldError),
        (lambda p: dataclasses.replace(p, baseline_id=""), errors.PackageFieldError),
        (lambda p: dataclasses.replace(p, baseline_id="x" * 4097), errors.PackageLimitError),
        (lambda p: dataclasses.replace(p, baseline_id="a\x00b"), errors.PackageEncodingError),
        (lambda p: dataclasses.replace(p, format_version=2), errors.PackageVersionError),
    ],
)
def test_model_refuses_what_the_format_cannot_hold(rich: Package, change, error) -> None:
    with pytest.raises(error):
        change(rich)


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: Blob(0, BlobKind.CODE, 3, b"x", 1), errors.PackageFieldError),
        (lambda: Blob(0, BlobKind.CODE, 8192, b"x", 1), errors.PackageFieldError),
        (lambda: Blob(0, BlobKind.BSS, 8, b"x", 1), errors.PackageLayoutError),
        (lambda: Blob(0, BlobKind.DATA, 8, b"xy", 1), errors.PackageLayoutError),
        (lambda: PatchSite(0x1000, "f", bytes(4), 0, 0, Strategy.REL32_JMP), errors.PackageFieldError),
        (lambda: PatchSite(0x1000, "f", bytes(14), 0, 0, Strategy.ABS_JMP, (Strategy.ABS_JMP,)),
         errors.PackageFieldError),
        (lambda: PatchSite(0x1000, "f", bytes(2), 0, 0, Strategy.SHORT_JMP_PADDING), errors.PackageFieldError),
        (lambda: PatchSite(0x1000, "f", bytes(2), 0, 0, Strategy.SHORT_JMP_PADDING, (), 0x1100, bytes(5)),
         errors.PackageFieldError),  # out of reach of a rel8 jump
        (lambda: PatchSite(0x1000, "f", bytes(5), 0, 0, Strategy.REL32_JMP, (), 0xFF0, bytes(5)),
         errors.PackageFieldError),  # padding nobody uses
        (lambda: Metadata(cve_ids=("",)), errors.PackageFieldError),
        (lambda: Metadata(cve_ids=("CVE",) * 1025), errors.PackageLimitError),
        (lambda: Fixup(0, 0, FixupKind.ABS64, BaselineRVA(0), 1 << 63), errors.PackageFieldError),
    ],
)
def test_records_refuse_invalid_values(build, error) -> None:
    with pytest.raises(error):
        build()


# ---------------------------------------------------------------- signatures and keys


def test_signed_package_verifies_and_names_its_signer(rich: Package) -> None:
    public_key = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    package = loads(dumps(rich, KEY), trusted_keys=[public_key], require_signature=True)
    assert package.signer_public_key == public_key
    assert signature_state_of(package) == "valid"
    assert loads(dumps(rich, KEY), trusted_keys=[public_key.hex()]).signer_key_hex == public_key.hex()


def test_altered_signature_is_refused(rich: Package) -> None:
    data = bytearray(dumps(rich, KEY))
    data[-1] ^= 1
    with pytest.raises(errors.PackageSignatureError):
        loads(bytes(data))


def test_content_changed_and_rehashed_breaks_the_signature(rich: Package) -> None:
    data = bytearray(dumps(rich, KEY))
    offset = struct.unpack_from("<I", data, 32 + 16 * 4 + 8)[0]  # the blob data section
    data[offset] ^= 0xFF
    rehash(data)
    with pytest.raises(errors.PackageSignatureError, match="does not verify"):
        loads(bytes(data))


def test_untrusted_signer_is_refused(rich: Package) -> None:
    other = OTHER_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    with pytest.raises(errors.PackageUntrustedError):
        loads(dumps(rich, KEY), trusted_keys=[other])


def test_missing_signature_is_refused_when_required(rich: Package) -> None:
    with pytest.raises(errors.PackageUnsignedError):
        loads(dumps(rich), require_signature=True)
    with pytest.raises(errors.PackageUnsignedError):  # trusting keys means wanting a signature by one
        loads(dumps(rich), trusted_keys=[bytes(32)])
    assert signature_state_of(loads(dumps(rich))) == "unsigned"


def test_stripping_the_signature_changes_nothing_but_the_state(rich: Package) -> None:
    signed = dumps(rich, KEY)
    assert loads(signed[:-96]) == rich
    with pytest.raises(errors.PackageUnsignedError):
        loads(signed[:-96], require_signature=True)


def test_a_model_carrying_a_stale_signature_is_not_written(rich: Package) -> None:
    signed = loads(dumps(rich, KEY))
    changed = dataclasses.replace(signed, sequence=signed.sequence + 1)
    assert signature_state_of(changed) == "invalid"
    with pytest.raises(errors.PackageSignatureError):
        dumps(changed)
    assert loads(dumps(changed, KEY)).sequence == signed.sequence + 1


def test_keygen_helpers_round_trip(tmp_path: Path, rich: Package) -> None:
    pem, public_hex = generate_keypair()
    (tmp_path / "k.pem").write_bytes(pem)
    key = load_private_key(tmp_path / "k.pem")
    assert load_public_key(public_hex) == bytes.fromhex(public_hex)
    (tmp_path / "k.pub").write_text(public_hex + "\n")
    assert load_public_key(tmp_path / "k.pub") == bytes.fromhex(public_hex)
    assert load_public_key(str(tmp_path / "k.pub")) == bytes.fromhex(public_hex)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pub.pem").write_bytes(pub_pem)
    assert load_public_key(tmp_path / "k.pub.pem") == bytes.fromhex(public_hex)
    package = loads(dumps(rich, key), trusted_keys=[load_public_key(public_hex)])
    assert package.signer_key_hex == public_hex

    written = write_keypair(tmp_path / "w.key", tmp_path / "w.pub")
    assert (tmp_path / "w.key").stat().st_mode & 0o777 == 0o600
    assert load_public_key(tmp_path / "w.pub") == bytes.fromhex(written)
    with pytest.raises(errors.PackageKeyError):
        write_keypair(tmp_path / "w.key", tmp_path / "w2.pub")  # never overwrites a private key


BROKEN_PEM = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("content", [b"", b"not a key", BROKEN_PEM])
def test_unreadable_keys_raise_key_errors(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(errors.PackageKeyError):
        load_private_key(tmp_path / "bad")
    with pytest.raises(errors.PackageKeyError):
        load_public_key(tmp_path / "bad")
    with pytest.raises(errors.PackageKeyError):
        load_private_key(tmp_path / "missing")


def test_ec_key_is_not_an_ed25519_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.pem").write_bytes(pem)
    with pytest.raises(errors.PackageKeyError, match="not an Ed25519"):
        load_private_key(tmp_path / "ec.pem")


# ---------------------------------------------------------------- both readers on chosen inputs


def _section(data: bytes, index: int) -> tuple[int, int]:
    return struct.unpack_from("<II", data, 32 + 16 * index + 8)


def _edit(data: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(data)
    out[offset : offset + len(value)] = value
    rehash(out)
    return bytes(out)


def _targeted_cases(rich: Package) -> list[tuple[str, bytes, type[errors.PackageError]]]:
    good = dumps(rich)
    strings, _ = _section(good, 8)
    string_data = strings + 8 + 8 * struct.unpack_from("<I", good, strings)[0]
    fixups, _ = _section(good, 5)
    blobs, _ = _section(good, 3)
    sites, _ = _section(good, 6)
    content_size = struct.unpack_from("<Q", good, 24)[0]
    corrupt = bytearray(good)
    corrupt[200] ^= 1
    return [
        ("empty", b"", errors.PackageTruncatedError),
        ("text file", b"hello world\n", errors.PackageMagicError),
        ("header cut", good[:20], errors.PackageTruncatedError),
        ("hash cut", good[:-5], errors.PackageTruncatedError),
        ("trailing bytes", good + bytes(200), errors.PackageLayoutError),
        ("signature cut", dumps(rich, KEY)[:-1], errors.PackageTruncatedError),
        ("version 2", _edit(good, 8, b"\x02\x00"), errors.PackageVersionError),
        ("bad hash", bytes(corrupt), errors.PackageHashError),
        ("flags", _edit(good, 12, b"\x01"), errors.PackageFieldError),
        ("content size", _edit(good, 24, struct.pack("<Q", content_size + 8)), errors.PackageTruncatedError),
        ("sections swapped", _edit(good, 32, good[48:64] + good[32:48]), errors.PackageLayoutError),
        ("section past content", _edit(good, 32 + 16 * 8 + 12, struct.pack("<I", 1 << 30)), errors.PackageLayoutError),
        ("string count", _edit(good, strings, struct.pack("<I", 1 << 21)), errors.PackageLayoutError),
        ("string count above limit", _edit(good, strings, struct.pack("<I", (1 << 21) + 1)), errors.PackageLimitError),
        ("string length", _edit(good, strings + 12, struct.pack("<I", 5000)), errors.PackageLimitError),
        ("surrogate in a string", _edit(good, string_data + 1, b"\xed\xa0\x80"), errors.PackageEncodingError),
        ("fixup blob missing", _edit(good, fixups, struct.pack("<I", 99)), errors.PackageLayoutError),
        ("fixup kind", _edit(good, fixups + 8, b"\x09"), errors.PackageFieldError),
        ("fixups overlap", _edit(good, fixups + 32 + 4, struct.pack("<I", 3)), errors.PackageLayoutError),
        ("fixup out of its blob", _edit(good, fixups + 32 * 10 + 4, struct.pack("<I", 20)), errors.PackageLayoutError),
        ("blob size absurd", _edit(good, blobs + 4, struct.pack("<I", 0xFFFF_FFFF)), errors.PackageLimitError),
        ("blob kind", _edit(good, blobs, b"\x05"), errors.PackageFieldError),
        ("site strategy", _edit(good, sites + 16, b"\x04"), errors.PackageFieldError),
        ("site string missing", _edit(good, sites + 4, struct.pack("<I", 1000)), errors.PackageLayoutError),
        ("sites overlap", _edit(good, sites + 96 * 3, struct.pack("<I", 0x1305)), errors.PackageLayoutError),
        ("padding too short", _edit(good, sites + 21, b"\x04"), errors.PackageFieldError),
        ("blobs above the memory limit", _bss_total_above_limit(), errors.PackageLimitError),
        ("too many sites", _with_payload(good, 6, bytes(96 * (LIMITS.sites + 1))), errors.PackageLimitError),
        ("too many unwind entries", _with_payload(good, 7, bytes(24 * (LIMITS.unwind_entries + 1))),
         errors.PackageLimitError),
        ("string table without header", _with_payload(good, 8, b"\x01"), errors.PackageLayoutError),
        ("target section short", _with_payload(good, 0, good[176:176 + 40]), errors.PackageLayoutError),
    ]


def _with_payload(data: bytes, index: int, payload: bytes) -> bytes:
    payloads, trailer = hpk_fuzz.split(data)
    payloads[index] = payload
    out = hpk_fuzz.assemble(data[:32], payloads, trailer)
    rehash(out)
    return bytes(out)


def _bss_total_above_limit() -> bytes:
    blobs = tuple(Blob(i, BlobKind.BSS, 8, b"", 1) for i in range(5))
    package = dataclasses.replace(minimal_model(), blobs=(minimal_model().blobs[0], *blobs[1:]))
    data = dumps(package)
    table, _ = _section(data, 3)
    for index in range(1, 5):
        data = _edit(data, table + 16 * index + 4, struct.pack("<I", LIMITS.blob_size))
    return data


def test_chosen_corruptions_get_the_same_error_from_both_readers(rich: Package, hpk_check_asan: Path) -> None:
    cases = _targeted_cases(rich)
    verdicts = c_verdicts(hpk_check_asan, [data for _, data, _ in cases])
    for (name, data, error), c in zip(cases, verdicts):
        with pytest.raises(error):
            loads(data)
        assert c.code == hpk_fuzz.FAMILY[error], name
        assert python_verdict(data).family == c.code, name


def test_wrong_hash_is_refused_by_both_readers(rich: Package, hpk_check: Path, tmp_path: Path) -> None:
    data = bytearray(dumps(rich, KEY))
    data[-97] ^= 0x40  # the last byte of the content hash
    with pytest.raises(errors.PackageHashError):
        loads(bytes(data))
    result = c_check(hpk_check, bytes(data), tmp_path)
    assert result.returncode == 4
    assert "E_HASH (4)" in result.stdout


def test_bad_signature_is_refused_by_python_and_by_a_caller_of_the_c_reader(
    rich: Package, hpk_check_asan: Path
) -> None:
    data = bytearray(dumps(rich, KEY))
    data[-10] ^= 1
    [c] = c_verdicts(hpk_check_asan, [bytes(data)])
    assert c.code == 0 and c.signed  # the C reader exposes the signature block; it does not verify it
    assert not hpk_fuzz.caller_verifies(c.dump)
    [good] = c_verdicts(hpk_check_asan, [dumps(rich, KEY)])
    assert hpk_fuzz.caller_verifies(good.dump)
    with pytest.raises(errors.PackageSignatureError):
        loads(bytes(data))


def test_c_reader_reads_what_python_wrote(rich: Package, hpk_check_asan: Path) -> None:
    packages = [rich, minimal_model(), dataclasses.replace(rich, metadata=Metadata())]
    blobs = [dumps(p) for p in packages] + [dumps(p, KEY) for p in packages]
    verdicts = c_verdicts(hpk_check_asan, blobs)
    for data, c in zip(blobs, verdicts):
        assert c.code == 0
        assert c.dump == render(loads(data))


def test_hpk_check_cli_reports_signer(rich: Package, hpk_check: Path, tmp_path: Path) -> None:
    public_hex = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    assert c_check(hpk_check, dumps(rich, KEY), tmp_path, "--pubkey", public_hex).returncode == 0
    assert c_check(hpk_check, dumps(rich), tmp_path, "--pubkey", public_hex).returncode == 10
    assert c_check(hpk_check, dumps(rich, OTHER_KEY), tmp_path, "--pubkey", public_hex).returncode == 11
    result = c_check(hpk_check, b"\x89HPK", tmp_path)
    assert result.returncode == 1 and "E_TRUNCATED (1)" in result.stdout


def test_c_sha256_matches_hashlib(libhpk: ctypes.CDLL) -> None:
    rng = random.Random(11)
    lengths = list(range(0, 130)) + [1000, 4095, 4096, 65537]
    for length in lengths:
        data = rng.randbytes(length)
        out = ctypes.create_string_buffer(32)
        libhpk.hpk_sha256(data, len(data), out)
        assert out.raw == hashlib.sha256(data).digest(), length


def test_c_reader_refuses_a_file_above_the_size_limit_from_its_header(libhpk: ctypes.CDLL, rich: Package) -> None:
    header = dumps(rich)[:64]
    out = ctypes.create_string_buffer(4096)
    # The reader stops at the size check, before reading past the header: a short buffer is enough here.
    assert libhpk.hpk_parse(header, LIMITS.file_size + 1, out, None, 0) == 5


def test_strings_get_one_utf8_verdict_from_both_readers(hpk_check_asan: Path) -> None:
    """Strict UTF-8 in C against Python's decoder, on strings biased to the edges of the encoding."""
    rng = random.Random(8)
    leads = [0x00, 0x41, 0x7F, 0x80, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0,
             0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFF]
    tails = [0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0]
    good = dumps(minimal_model())
    cases = []
    for _ in range(3000):
        text = bytearray(b"m")
        for _ in range(rng.randint(1, 4)):
            text.append(rng.choice(leads))
            text += bytes(rng.choice(tails) for _ in range(rng.randint(0, 3)))
        payloads, trailer = hpk_fuzz.split(good)
        count = struct.unpack_from("<I", payloads[8])[0]
        strings = [b"x"] * count
        strings[0] = bytes(text)
        entries, blob = bytearray(), bytearray()
        for item in strings:
            entries += struct.pack("<II", len(blob), len(item))
            blob += item + b"\x00"
        payloads[8] = struct.pack("<II", count, 0) + entries + blob
        out = hpk_fuzz.assemble(good[:32], payloads, trailer)
        rehash(out)
        cases.append(bytes(out))
    verdicts = c_verdicts(hpk_check_asan, cases)
    outcomes = set()
    for data, c in zip(cases, verdicts):
        py = python_verdict(data)
        assert hpk_fuzz.compare("utf8", data, py, c) is None, data.hex()
        outcomes.add(py.family)
    assert outcomes == {0, 8}  # both valid and invalid strings were met


def test_c_library_parses_and_names_errors(libhpk: ctypes.CDLL, rich: Package) -> None:
    assert c_parse(libhpk, dumps(rich)) == (0, "")
    code, message = c_parse(libhpk, dumps(rich)[:-1])
    assert code == 1 and "bytes" in message
    assert libhpk.hpk_strerror(4) == b"content hash mismatch"
    assert libhpk.hpk_strerror(99) == b"unknown error"


def test_reader_compiles_for_windows_with_mingw(tmp_path: Path) -> None:
    result = subprocess.run(
        ["x86_64-w64-mingw32-gcc", *CFLAGS, "-pedantic", "-O2", "-c", str(HPK_SOURCES / "hpk_reader.c"),
         "-o", str(tmp_path / "hpk_reader.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- hostile inputs


def test_inflated_counts_are_refused_without_work_or_memory(rich: Package) -> None:
    good = dumps(rich)
    strings, _ = _section(good, 8)
    blobs, _ = _section(good, 3)
    hostile = [
        _edit(good, strings, struct.pack("<I", 0xFFFF_FFFF)),
        _edit(good, 32 + 16 * 5 + 12, struct.pack("<I", 0xFFFF_FFF0)),
        _edit(good, blobs + 4, struct.pack("<I", 64 << 20)),
    ]
    for data in hostile:
        started = time.perf_counter()
        with pytest.raises(errors.PackageError):
            loads(data)
        assert time.perf_counter() - started < 0.5  # generous: a shared machine is noisy


def test_file_larger_than_the_limit_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.hpk"
    with path.open("wb") as handle:
        handle.write(MAGIC + b"\x01\x00")
        handle.truncate(LIMITS.file_size + 4096)  # sparse
    with pytest.raises(errors.PackageLimitError):
        load(path)


def test_loads_refuses_non_bytes() -> None:
    with pytest.raises(errors.PackageFieldError):
        loads(5)  # type: ignore[arg-type]

def test_unreadable_file_is_a_package_error(tmp_path: Path) -> None:
    with pytest.raises(errors.PackageError, match="cannot read"):
        load(tmp_path / "missing.hpk")


def test_encode_content_is_what_the_hash_covers(rich: Package) -> None:
    content = encode_content(rich)
    assert dumps(rich).startswith(content)


# ---------------------------------------------------------------- mutations


def test_mutated_packages_get_one_verdict_from_both_readers(hpk_check_asan: Path) -> None:
    """At least 10,000 mutations through each reader; the C one built with ASan and UBSan."""
    report = hpk_fuzz.run(MUTATION_CASES, seed=20240601, binary=hpk_check_asan)
    assert report.cases >= 10_000
    # The mutations reach past the hash check into every family of checks, and some stay valid.
    for family in (0, 1, 2, 3, 4, 5, 6, 7, 8, "signature"):
        assert report.outcomes[family] > 0, (family, report.outcomes)
    assert report.accepted > report.cases // 20
    print(f"\nmutations: {report.cases} cases, {report.seconds:.1f} s; verdicts {dict(report.outcomes)}")


def test_resign_after_mutation_makes_a_valid_signature(rich: Package) -> None:
    data = bytearray(dumps(rich, KEY))
    offset, _ = _section(bytes(data), 4)
    data[offset] ^= 1
    rehash(data)
    resign(data, KEY)
    assert signature_state_of(loads(bytes(data))) == "valid"


def test_fuzz_script_runs_standalone(tmp_path: Path) -> None:
    script = Path(__file__).parent / "fuzz_package.py"
    result = subprocess.run(
        [sys.executable, str(script), "--cases", "300",
         "--build-dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "300 cases" in result.stdout
