"""Mutation testing of the two .hpk readers: the Python one and the C one (native/hpk/).

Valid packages are built from synthetic models with the Python writer, then
mutated (bit flips, byte overwrites, truncations, length and count
inflation, section table edits, swapped and duplicated records, splices).
Most mutations re-compute the content hash afterwards, and some re-sign, so
the parsers behind the hash check are what gets exercised. Every case goes to
both readers; the C reader runs as ``hpk_check --batch`` built with
AddressSanitizer and UBSan, so any memory error aborts the run.

How the verdicts are compared (docs/FORMAT.md, "Two readers"):
- Python raises only ``PackageError`` subclasses, never its internal-error fallback;
- outside signatures, both give the same verdict: accept, or the same error
  family (the C code of each Python error class is in ``FAMILY``);
- when both accept, the C reader's dump of the package equals the Python model's;
- the C reader does not verify Ed25519: when Python rejects a structurally
  valid package for its signature, the C reader must accept it and report the
  signature block, and verifying the key, signature and signed message that
  it exposes (here, with ``cryptography``) must fail. A package Python accepts
  with a signature must verify the same way. So "C reader + caller's check"
  and the Python reader agree on every case.

Deeper runs: ``python tests/fuzz_package.py --cases 200000 [--seed N]`` (this module is its harness).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hotpatch import errors
from hotpatch.package import (
    BaselineRVA,
    BlobTarget,
    Package,
)
from hotpatch.package.format import content_sha256_of, dumps, loads
from hotpatch.package.signing import sign_digest, verify
from tests.support.native import SANITIZER_ENV
from tests.support.packages import minimal_model, rich_model

#: C error code of each Python error class ("signature": checked by the caller of the C reader)
FAMILY: dict[type[errors.PackageError], int | str] = {
    errors.PackageTruncatedError: 1,
    errors.PackageMagicError: 2,
    errors.PackageVersionError: 3,
    errors.PackageHashError: 4,
    errors.PackageLimitError: 5,
    errors.PackageLayoutError: 6,
    errors.PackageFieldError: 7,
    errors.PackageEncodingError: 8,
    errors.PackageSignatureError: "signature",
}


# ---------------------------------------------------------------- the packages mutations start from


def sample_packages(key: Ed25519PrivateKey, seed: int = 1) -> list[tuple[str, bytes, Package]]:
    """(name, bytes, model) of the valid packages the mutations start from."""
    rng = random.Random(seed)
    rich = rich_model(rng)
    plain = rich_model(rng, unicode=False)
    minimal = minimal_model()
    return [
        ("rich-unsigned", dumps(rich), rich),
        ("rich-signed", dumps(rich, key), rich),
        ("plain-unsigned", dumps(plain), plain),
        ("minimal-signed", dumps(minimal, key), minimal),
    ]


# ---------------------------------------------------------------- mutations

HEADER_FIELDS = [(8, 2), (10, 2), (12, 4), (16, 4), (20, 4), (24, 8)]
SECTION_FIELDS = [(0, 4), (4, 4), (8, 4), (12, 4)]
RECORDS = {  # section index -> (record size, fields as (offset, width))
    3: (16, [(0, 1), (1, 1), (2, 2), (4, 4), (8, 4), (12, 4)]),
    5: (32, [(0, 4), (4, 4), (8, 1), (9, 1), (10, 2), (12, 4), (16, 4), (20, 4), (24, 8)]),
    6: (96, [(0, 4), (4, 4), (8, 4), (12, 4), (16, 1), (17, 1), (18, 1), (19, 1), (20, 1), (21, 1), (22, 2),
             (24, 4), (28, 4), (32, 1), (45, 1), (63, 1), (64, 1), (70, 1), (95, 1)]),
    7: (24, [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4)]),
    0: (48, [(0, 4), (4, 4), (8, 4), (12, 4), (16, 1)]),
    1: (8, [(0, 4), (4, 4)]),
}
INTERESTING = [
    0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 14, 15, 16, 31, 32, 33, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x1001,
    0xFFFF, 0x10000, 0x10001, 1 << 18, (1 << 18) + 1, 1 << 20, (1 << 20) + 1, 1 << 21, (1 << 21) + 1,
    64 << 20, (64 << 20) + 1, 256 << 20, (256 << 20) + 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF,
    1 << 63, (1 << 64) - 1,
]


@dataclass
class Layout:
    """Where the sections of a valid package are, to aim mutations at fields."""

    content_size: int
    sections: list[tuple[int, int]]

    @classmethod
    def of(cls, data: bytes) -> Layout:
        content_size = struct.unpack_from("<Q", data, 24)[0]
        sections = [struct.unpack_from("<II", data, 32 + 16 * i + 8) for i in range(9)]
        return cls(content_size, sections)


def split(data: bytes) -> tuple[list[bytes], bytes]:
    """The section payloads of a package with a sane section table, and what follows the hash."""
    content_size = struct.unpack_from("<Q", data, 24)[0]
    payloads = []
    for index in range(9):
        offset, size = struct.unpack_from("<II", data, 32 + 16 * index + 8)
        payloads.append(bytes(data[offset : offset + size]))
    return payloads, bytes(data[content_size + 32 :])


def assemble(header: bytes, payloads: list[bytes], trailer: bytes) -> bytearray:
    """A package in the canonical layout around the given payloads (hash still to compute)."""
    table, body, offset = bytearray(), bytearray(), 176
    for kind, payload in enumerate(payloads, 1):
        table += struct.pack("<IIII", kind, 0, offset, len(payload))
        body += payload + bytes(-len(payload) % 8)
        offset += len(payload) + (-len(payload) % 8)
    out = bytearray(header[:24]) + struct.pack("<Q", offset) + table + body
    return out + bytes(32) + trailer


def rehash(data: bytearray) -> None:
    """Recompute the content hash after a mutation, when the header still says where it goes."""
    if len(data) < 32:
        return
    content_size = struct.unpack_from("<Q", data, 24)[0]
    if content_size + 32 <= len(data):
        data[content_size : content_size + 32] = hashlib.sha256(data[:content_size]).digest()


def resign(data: bytearray, key: Ed25519PrivateKey) -> None:
    if len(data) < 32:
        return
    content_size = struct.unpack_from("<Q", data, 24)[0]
    if len(data) == content_size + 32 + 96:
        public_key, signature = sign_digest(key, bytes(data[content_size : content_size + 32]))
        data[content_size + 32 :] = public_key + signature


class Mutator:
    """Deterministic mutations of valid packages (one seed, one sequence of cases)."""

    def __init__(self, bases: list[tuple[str, bytes, Package]], key: Ed25519PrivateKey, seed: int) -> None:
        self.bases = [(name, data, Layout.of(data)) for name, data, _ in bases]
        self.key = key
        self.rng = random.Random(seed)
        self.operators: list[tuple[str, Callable[[bytearray, Layout], None], int]] = [
            ("bitflip", self.bitflip, 3),
            ("bytes", self.overwrite_bytes, 3),
            ("field", self.record_field, 6),
            ("header", self.header_field, 1),
            ("table", self.section_table, 2),
            ("strings", self.string_table, 2),
            ("metadata", self.metadata, 1),
            ("records", self.shuffle_records, 2),
            ("truncate", self.truncate, 1),
            ("extend", self.extend, 1),
            ("splice", self.splice, 1),
            ("data", self.blob_data, 2),
            ("resize", self.resize_section, 2),
            ("relayout-records", self.add_or_drop_record, 2),
            ("relayout-strings", self.replace_string, 2),
            ("relayout-metadata", self.replace_metadata, 1),
        ]
        self.weights = [weight for _, _, weight in self.operators]

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while True:
            yield self.case()

    def case(self) -> tuple[str, bytes]:
        rng = self.rng
        name, base, layout = rng.choice(self.bases)
        data = bytearray(base)
        operator_name, operator, _ = rng.choices(self.operators, self.weights)[0]
        repeat = 1 if operator_name == "truncate" or rng.random() < 0.8 else rng.randint(2, 4)
        for _ in range(repeat):  # only truncation shortens a package: the others can find their fields
            operator(data, layout)
        fix = rng.random()
        if operator_name not in ("truncate", "extend") and fix < 0.9:
            rehash(data)
            if rng.random() < 0.5:
                resign(data, self.key)
        return f"{name}/{operator_name}", bytes(data)

    # -- helpers

    def _value(self, old: int, width: int) -> int:
        rng = self.rng
        choice = rng.random()
        if choice < 0.5:
            value = rng.choice(INTERESTING)
        elif choice < 0.8:
            value = old + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 16])
        elif choice < 0.9:
            value = old * 2 or 1
        else:
            value = rng.getrandbits(8 * width)
        return value % (1 << (8 * width))

    def _poke(self, data: bytearray, offset: int, width: int) -> None:
        if offset + width > len(data):
            return
        old = int.from_bytes(data[offset : offset + width], "little")
        data[offset : offset + width] = self._value(old, width).to_bytes(width, "little")

    # -- operators

    def bitflip(self, data: bytearray, layout: Layout) -> None:
        for _ in range(self.rng.randint(1, 4)):
            position = self.rng.randrange(len(data))
            data[position] ^= 1 << self.rng.randrange(8)

    def overwrite_bytes(self, data: bytearray, layout: Layout) -> None:
        position = self.rng.randrange(len(data))
        for index in range(position, min(len(data), position + self.rng.randint(1, 8))):
            data[index] = self.rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, self.rng.randrange(256)])

    def record_field(self, data: bytearray, layout: Layout) -> None:
        section = self.rng.choice(list(RECORDS))
        offset, size = layout.sections[section]
        record, fields = RECORDS[section]
        if size < record:
            return
        index = self.rng.randrange(size // record)
        field_offset, width = self.rng.choice(fields)
        self._poke(data, offset + index * record + field_offset, width)

    def header_field(self, data: bytearray, layout: Layout) -> None:
        self._poke(data, *self.rng.choice(HEADER_FIELDS))

    def section_table(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng
        i, j = rng.randrange(9), rng.randrange(9)
        choice = rng.random()
        entry_i, entry_j = slice(32 + 16 * i, 48 + 16 * i), slice(32 + 16 * j, 48 + 16 * j)
        if choice < 0.25:  # swapped sections
            data[entry_i], data[entry_j] = data[entry_j], data[entry_i]
        elif choice < 0.4:  # a duplicated section
            data[entry_j] = data[entry_i]
        elif choice < 0.6:  # a section grows or shrinks into its neighbours
            self._poke(data, 32 + 16 * i + 12, 4)
        else:
            field_offset, width = rng.choice(SECTION_FIELDS)
            self._poke(data, 32 + 16 * i + field_offset, width)

    def string_table(self, data: bytearray, layout: Layout) -> None:
        offset, size = layout.sections[8]
        count = struct.unpack_from("<I", data, offset)[0]
        rng = self.rng
        choice = rng.random()
        if choice < 0.2:
            self._poke(data, offset, 4)  # the count
        elif choice < 0.6 and count:
            self._poke(data, offset + 8 + 8 * rng.randrange(count) + rng.choice([0, 4]), 4)  # offset or length
        else:  # string bytes: invalid UTF-8, surrogates, NUL, overlongs, a missing terminator
            begin = offset + 8 + 8 * count
            if size > 8 + 8 * count:
                position = rng.randrange(begin, offset + size)
                patch = rng.choice([b"\x00", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                                    b"\x80", b"\xc3", b"A", b"\xf0\x9f\x94\x92"])
                data[position : position + len(patch)] = patch[: len(data) - position]

    def metadata(self, data: bytearray, layout: Layout) -> None:
        offset, size = layout.sections[2]
        rng = self.rng
        choice = rng.random()
        if choice < 0.4:
            field_offset, width = rng.choice([(0, 8), (8, 4), (12, 4)])
            self._poke(data, offset + field_offset, width)
        else:  # one of the length prefixes, found by walking the strings
            position, prefixes = offset + 16, []
            while position + 2 <= offset + size:
                prefixes.append(position)
                position += 2 + struct.unpack_from("<H", data, position)[0] + 1
            if prefixes:
                self._poke(data, rng.choice(prefixes), 2)

    def shuffle_records(self, data: bytearray, layout: Layout) -> None:
        section = self.rng.choice([3, 5, 6, 7])
        offset, size = layout.sections[section]
        record = RECORDS[section][0]
        count = size // record
        if count < 2:
            return
        i, j = self.rng.sample(range(count), 2)
        a = slice(offset + i * record, offset + (i + 1) * record)
        b = slice(offset + j * record, offset + (j + 1) * record)
        if self.rng.random() < 0.5:
            data[a], data[b] = data[b], data[a]
        else:
            data[b] = data[a]

    def truncate(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng
        points = [0, 1, 7, 8, 31, 32, 175, 176, layout.content_size, layout.content_size + 32, len(data) - 1]
        points += [offset for offset, _ in layout.sections]
        cut = rng.choice(points) if rng.random() < 0.5 else rng.randrange(len(data))
        del data[max(0, min(cut, len(data))) :]

    def extend(self, data: bytearray, layout: Layout) -> None:
        data += bytes(self.rng.randrange(256) for _ in range(self.rng.choice([1, 8, 95, 96, 97, 200])))

    def splice(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng
        _, other, _ = rng.choice(self.bases)
        length = rng.randint(1, 64)
        source = rng.randrange(max(1, len(other) - length))
        target = rng.randrange(max(1, len(data) - length))
        if rng.random() < 0.5:
            data[target : target + length] = other[source : source + length]
        else:
            data[target:target] = other[source : source + length]

    # -- payload mutations: the file is laid out again, so the section table stays consistent
    #    and the checks inside the sections are what the mutation meets

    HOSTILE_STRINGS = [b"", b"x" * 4096, b"x" * 4097, b"a\x00b", b"\xff", b"\xed\xa0\x80", b"\xed\x9f\xbf",
                       b"\xc0\x80", b"\xc2\x80", b"\xe0\x80\x80", b"\xe0\xa0\x80", b"\xf0\x80\x80\x80",
                       b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
                       "ok ✓".encode(), b"\xe2\x82"]

    def _relayout(self, data: bytearray, change: Callable[[list[bytes]], None]) -> None:
        try:
            payloads, trailer = split(bytes(data))
        except struct.error:
            return
        change(payloads)
        data[:] = assemble(bytes(data[:32]), payloads, trailer)

    def resize_section(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng
        index = rng.randrange(9)
        delta = rng.choice([-32, -8, -4, -2, -1, 1, 2, 4, 8, 16, 24, 96])

        def change(payloads: list[bytes]) -> None:
            payload = payloads[index]
            if delta < 0:
                payloads[index] = payload[: max(0, len(payload) + delta)]
            else:
                filler = bytes(delta) if rng.random() < 0.5 else rng.randbytes(delta)
                payloads[index] = payload + filler
        self._relayout(data, change)

    def add_or_drop_record(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng
        index = rng.choice([3, 5, 6, 7])
        record = RECORDS[index][0]

        def change(payloads: list[bytes]) -> None:
            records = [payloads[index][i : i + record] for i in range(0, len(payloads[index]), record)]
            if records and rng.random() < 0.5:
                del records[rng.randrange(len(records))]
            elif records:
                position = rng.randrange(len(records))
                records.insert(rng.randrange(len(records) + 1), records[position])
            payloads[index] = b"".join(records)
        self._relayout(data, change)

    def replace_string(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng

        def change(payloads: list[bytes]) -> None:
            table = payloads[8]
            count = struct.unpack_from("<I", table)[0] if len(table) >= 8 else 0
            if not count or len(table) < 8 + 8 * count:
                return
            base = 8 + 8 * count
            strings = []
            for i in range(count):
                offset, length = struct.unpack_from("<II", table, 8 + 8 * i)
                strings.append(table[base + offset : base + offset + length])
            strings[rng.randrange(count)] = rng.choice(self.HOSTILE_STRINGS)
            entries, blob = bytearray(), bytearray()
            for text in strings:
                entries += struct.pack("<II", len(blob), len(text))
                blob += text + b"\x00"
            payloads[8] = struct.pack("<II", count, 0) + entries + blob
        self._relayout(data, change)

    def replace_metadata(self, data: bytearray, layout: Layout) -> None:
        rng = self.rng

        def change(payloads: list[bytes]) -> None:
            raw = payloads[2]
            if len(raw) < 16:
                return
            created, flags, count = struct.unpack_from("<QII", raw)
            position, texts = 16, []
            while position + 2 <= len(raw):
                length = struct.unpack_from("<H", raw, position)[0]
                texts.append(raw[position + 2 : position + 2 + length])
                position += 3 + length
            choice = rng.random()
            if choice < 0.4 and texts:
                texts[rng.randrange(len(texts))] = rng.choice(self.HOSTILE_STRINGS)
            elif choice < 0.7:
                texts.append(rng.choice(self.HOSTILE_STRINGS))
                count += rng.choice([0, 1])
            else:
                count = rng.choice([0, 1, 1024, 1025])
                texts = texts[:2] + [b"CVE-2024-1"] * min(count, 1025)
            payloads[2] = struct.pack("<QII", created, flags, count) + b"".join(
                struct.pack("<H", len(t) & 0xFFFF) + t + b"\x00" for t in texts
            )
        self._relayout(data, change)

    def blob_data(self, data: bytearray, layout: Layout) -> None:
        offset, size = layout.sections[4]
        if size:
            position = offset + self.rng.randrange(size)
            data[position] = self.rng.randrange(256)


# ---------------------------------------------------------------- the two verdicts


def render(package: Package) -> str:
    """The model in the format of ``hpk_check --dump``."""
    def text(value: str) -> str:
        return value.encode("utf-8").hex() or "-"

    def raw(value: bytes) -> str:
        return value.hex() or "-"

    t, m = package.target, package.metadata
    lines = [
        f"package {content_sha256_of(package).hex()}",
        f"target {text(t.module_name)} {t.timedatestamp} {t.size_of_image} {t.checksum} {t.code_sha256.hex()}",
        f"baseline {text(package.baseline_id)} {package.sequence}",
        f"metadata {'-' if m.created is None else m.created} {text(m.description)} {text(m.creator)}",
    ]
    lines += [f"cve {text(cve)}" for cve in m.cve_ids]
    lines += [f"blob {b.index} {b.kind.value} {b.alignment} {b.size} {raw(b.data)}" for b in package.blobs]
    for f in package.fixups:
        target = f.target
        if isinstance(target, BaselineRVA):
            kind, a, b = 1, str(target.rva), "0"
        elif isinstance(target, BlobTarget):
            kind, a, b = 2, str(target.blob), str(target.offset)
        else:
            kind, a, b = 3, text(target.dll), text(target.name)
        lines.append(f"fixup {f.blob} {f.offset} {f.kind.value} {kind} {a} {b} {f.addend}")
    for s in package.sites:
        fallbacks = ",".join(str(f.code) for f in s.fallbacks) or "-"
        padding = "-" if s.padding_rva is None else str(s.padding_rva)
        lines.append(f"site {s.rva} {text(s.function)} {s.target_blob} {s.target_offset} {s.strategy.code} "
                     f"{fallbacks} {raw(s.expected)} {padding} {raw(s.padding_expected)}")
    lines += [f"unwind {u.code_blob} {u.begin} {u.end} {u.unwind_blob} {u.unwind_offset}" for u in package.unwind]
    if package.signature is None or package.signer_public_key is None:
        lines.append("signature -")
    else:
        message = b"hotpatch.hpk.v1\x00" + content_sha256_of(package)
        lines.append(f"signature {package.signer_public_key.hex()} {package.signature.hex()} {message.hex()}")
    return "\n".join(lines)


@dataclass
class PythonVerdict:
    family: int | str  # 0 accepted, a C code, or "signature"
    error: str = ""
    dump: str = ""


def python_verdict(data: bytes) -> PythonVerdict:
    try:
        package = loads(data)
    except errors.PackageError as exc:
        if "internal reader error" in str(exc):
            raise AssertionError(f"the Python reader hit an internal error: {exc}") from exc
        for cls in type(exc).__mro__:
            if cls in FAMILY:
                return PythonVerdict(FAMILY[cls], f"{type(exc).__name__}: {exc}")
        raise AssertionError(f"no family for {type(exc).__name__}") from exc
    except Exception as exc:  # anything else is a bug of the Python reader
        raise AssertionError(f"the Python reader raised {type(exc).__name__}: {exc}") from exc
    return PythonVerdict(0, dump=render(package))


@dataclass
class CVerdict:
    code: int
    signed: bool
    dump: str = ""


def c_verdicts(binary: Path, cases: list[bytes], dump: bool = True) -> list[CVerdict]:
    """Run every case through ``hpk_check --batch``; a crash (sanitizer report) names its case."""
    frames = b"".join(struct.pack("<I", len(case)) + case for case in cases)
    command = [str(binary), "--batch"] + (["--dump"] if dump else [])
    result = subprocess.run(command, input=frames, capture_output=True, env={**os.environ, **SANITIZER_ENV})
    verdicts: list[CVerdict] = []
    lines = result.stdout.decode().splitlines()
    position = 0
    while position < len(lines):
        _, _, code, signed = lines[position].split()
        position += 1
        verdict = CVerdict(int(code), signed == "1")
        if verdict.code == 0 and dump:
            end = lines.index("end", position)
            verdict.dump = "\n".join(lines[position:end])
            position = end + 1
        verdicts.append(verdict)
    if result.returncode or len(verdicts) != len(cases):
        case = len(verdicts)
        raise AssertionError(
            f"the C reader crashed or failed (exit {result.returncode}) on case {case}"
            f" ({cases[case].hex() if case < len(cases) else ''}):\n{result.stderr.decode()[-4000:]}"
        )
    return verdicts


def _signed_fields(dump: str) -> tuple[bytes, bytes, bytes] | None:
    line = dump.rsplit("\n", 1)[-1]
    parts = line.split()
    if parts[1] == "-":
        return None
    return bytes.fromhex(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])


def caller_verifies(dump: str) -> bool:
    """What a caller of the C reader does with the signature block it exposes."""
    fields = _signed_fields(dump)
    if fields is None:
        return True
    public_key, signature, message = fields
    return verify(public_key, signature, message[16:]) and message[:16] == b"hotpatch.hpk.v1\x00"


def compare(label: str, data: bytes, py: PythonVerdict, c: CVerdict) -> str | None:
    """None when the two readers agree on this case, else why not."""
    if py.family == "signature":
        if c.code != 0 or not c.signed:
            return f"Python: {py.error}; C: code {c.code}, signed {c.signed} (expected: valid structure, signed)"
        if caller_verifies(c.dump):
            return f"Python: {py.error}; but the signature the C reader exposes verifies"
        return None
    if py.family != c.code:
        return f"Python: {py.error or 'accepted'}; C: code {c.code}"
    if c.code == 0:
        if py.dump != c.dump:
            return "both accept, but the parsed packages differ"
        if not caller_verifies(c.dump):
            return "Python accepted a signature that the C reader's exposed fields do not verify"
    return None


@dataclass
class Report:
    cases: int
    seconds: float
    python_seconds: float
    c_seconds: float
    outcomes: Counter
    operators: Counter
    accepted: int


def run(cases: int, seed: int, binary: Path, chunk: int = 5000, max_failures: int = 5) -> Report:
    """Generate ``cases`` mutations and hold the two readers to the same verdicts; raise on disagreement."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # deterministic runs need a fixed key
    mutator = iter(Mutator(sample_packages(key, seed), key, seed))
    started = time.perf_counter()
    python_seconds = c_seconds = 0.0
    outcomes: Counter = Counter()
    operators: Counter = Counter()
    failures: list[str] = []
    done = 0
    while done < cases:
        batch = [next(mutator) for _ in range(min(chunk, cases - done))]
        tick = time.perf_counter()
        py = [python_verdict(data) for _, data in batch]
        python_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        c = c_verdicts(binary, [data for _, data in batch])
        c_seconds += time.perf_counter() - tick
        for index, ((label, data), p, cv) in enumerate(zip(batch, py, c)):
            problem = compare(label, data, p, cv)
            operators[label.split("/")[1]] += 1
            outcomes["signature" if p.family == "signature" else p.family] += 1
            if problem:
                failures.append(f"case {done + index} [{label}] {problem}\n  input: {data.hex()}")
                if len(failures) >= max_failures:
                    raise AssertionError("the readers disagree:\n" + "\n".join(failures))
        done += len(batch)
    if failures:
        raise AssertionError("the readers disagree:\n" + "\n".join(failures))
    return Report(cases, time.perf_counter() - started, python_seconds, c_seconds, outcomes, operators,
                  outcomes[0])
