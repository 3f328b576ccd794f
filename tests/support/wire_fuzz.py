"""Mutation testing of the agent's request parser (native/agent/wire.c, requests.c).

The parser is the part of hotpatch-agent.exe that reads untrusted frames; it
has no Win32 calls, so it builds natively with gcc and runs here as
``wire_check`` under AddressSanitizer and UBSan (any memory error or
undefined behaviour aborts the run and names the case).

Valid requests of every opcode are encoded from random fields, then mutated:
bit flips, byte overwrites, u64 fields replaced with addresses at the edges
of the user address space and past it (0xFFFFFFFFFFFFFFF0 among them),
truncation, extension, header length/opcode/version changes, COMMIT count
inflation, duplicated writes. What must hold for every case:

- the reply frame echoes opcode and request id, its length field is its
  payload's, its status is one a parser may give (OK, BAD_FRAME,
  BAD_VERSION, UNKNOWN_OPCODE, BAD_PAYLOAD, LIMIT), and an error payload
  decodes with the client's own decoder (``ErrorInfo.decode``);
- an accepted request's arguments keep the handlers' preconditions: every
  address range non-empty, inside the user address space and not wrapping,
  sizes and counts within their limits, COMMIT writes not overlapping;
- an unmutated request is accepted with exactly the fields it was encoded with.

Deeper runs: ``python tests/fuzz_agent.py --cases 200000 [--seed N]`` (this module is its harness; the
parser's build is ``tests/support/native.build_wire_check``).
"""

from __future__ import annotations

import random
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hotpatch.apply.protocol import HEADER, MAX_PAYLOAD, ErrorInfo, Opcode, Status, encode_frame
from tests.support.native import SANITIZER_ENV

#: x64 Windows: lpMinimumApplicationAddress, lpMaximumApplicationAddress
LOWEST, HIGHEST = 0x10000, 0x7FFF_FFFE_FFFF
MAX_WRITE, MAX_WRITES, MAX_ATTEMPTS, MAX_RETRY_MS = 4096, 16384, 1000, 1000
MAX_REGION, MAX_DISTANCE, MAX_TIMEOUT_MS = 1 << 40, 0x8000_0000, 600_000
PARSER_STATUSES = {Status.OK, Status.BAD_FRAME, Status.BAD_VERSION, Status.UNKNOWN_OPCODE,
                   Status.BAD_PAYLOAD, Status.LIMIT}
EDGE_ADDRESSES = (0, 1, LOWEST - 1, LOWEST, HIGHEST - 4, HIGHEST, HIGHEST + 1, 0x8000_0000_0000,
                  0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF_FFFF_FFF0, 0xFFFF_FFFF_FFFF_FFFF)


# ---------------------------------------------------------------- valid requests


@dataclass
class Args:
    """args_t as wire_check prints it; the fields a request does not use stay 0."""

    pid: int = 0
    handle: int = 0
    flags: int = 0
    protect: int = 0
    address: int = 0
    size: int = 0
    distance: int = 0
    argument: int = 0
    timeout_ms: int = 0
    max_attempts: int = 0
    retry_ms: int = 0
    data: bytes = b""
    writes: list[tuple[int, int, int, bytes, bytes]] = field(default_factory=list)

    def line(self, opcode: int) -> str:
        head = [self.pid, self.handle, self.flags, self.protect, self.address, self.size, self.distance,
                self.argument, self.timeout_ms, self.max_attempts, self.retry_ms, len(self.writes)]
        parts = [format(v, "x") for v in head]
        if opcode == Opcode.WRITE:
            parts.append("data=" + self.data.hex())
        parts += [f"w={a:x}:{n:x}:{s:x}:{e.hex()}:{r.hex()}" for a, n, s, e, r in self.writes]
        return " ".join(parts)


def _range(rng: random.Random, largest: int) -> tuple[int, int]:
    size = rng.choice((1, 2, 5, 8, 14, 4096, rng.randrange(1, largest + 1)))
    size = min(size, largest)
    address = rng.choice((LOWEST, HIGHEST + 1 - size, rng.randrange(LOWEST, HIGHEST + 2 - size)))
    return address, size


def valid_request(rng: random.Random, opcode: int) -> tuple[bytes, Args]:
    """A payload the parser must accept, and the arguments it must produce."""
    a = Args()
    u32 = rng.getrandbits(32)
    if opcode in (Opcode.HELLO, Opcode.LIST_PROCESSES):
        return b"", a
    if opcode in (Opcode.LIST_MODULES, Opcode.PROCESS_INFO, Opcode.OPEN, Opcode.THREADS):
        a.pid = u32
        return struct.pack("<I", a.pid), a
    a.handle = u32
    if opcode == Opcode.CLOSE:
        return struct.pack("<I", a.handle), a
    if opcode in (Opcode.QUERY, Opcode.FREE):
        a.address = rng.getrandbits(64)
        return struct.pack("<IQ", a.handle, a.address), a
    if opcode == Opcode.READ:
        a.address, a.size = _range(rng, 1 << 20)
        return struct.pack("<IIQ", a.handle, a.size, a.address), a
    if opcode == Opcode.WRITE:
        a.address, a.size = _range(rng, 64)
        a.data = rng.randbytes(a.size)
        return struct.pack("<IQ", a.handle, a.address) + a.data, a
    if opcode == Opcode.ALLOC_NEAR:
        a.protect = rng.choice((0x20, 0x40, 0x04))
        a.address = rng.choice((0, rng.randrange(LOWEST, HIGHEST + 1)))
        a.size = rng.randrange(1, 1 << 20)
        wire_distance = rng.choice((0, 0x1000, MAX_DISTANCE))
        a.distance = wire_distance or 0x7FFF_0000
        return struct.pack("<IIQQQ", a.handle, a.protect, a.address, a.size, wire_distance), a
    if opcode == Opcode.PROTECT:
        a.protect = rng.getrandbits(32)
        a.address, a.size = _range(rng, 1 << 30)
        return struct.pack("<IIQQ", a.handle, a.protect, a.address, a.size), a
    if opcode == Opcode.FLUSH:
        a.address, a.size = _range(rng, 1 << 20)
        return struct.pack("<IQQ", a.handle, a.address, a.size), a
    if opcode == Opcode.THREAD_CONTEXTS:
        a.flags = rng.getrandbits(1)
        a.address, a.size = _range(rng, 1 << 20) if rng.random() < 0.7 else (0, 0)
        return struct.pack("<IIQQ", a.handle, a.flags, a.address, a.size), a
    if opcode == Opcode.REMOTE_CALL:
        a.flags = rng.getrandbits(1)
        wire_timeout = rng.choice((0, 1, 5000, MAX_TIMEOUT_MS))
        a.timeout_ms = wire_timeout or 10_000
        a.address, a.argument = rng.randrange(1, 1 << 64), rng.getrandbits(64)
        return struct.pack("<IIIQQ", a.handle, a.flags, wire_timeout, a.address, a.argument), a
    if opcode == Opcode.FLOOR:
        a.flags = rng.getrandbits(1)
        return struct.pack("<II", a.handle, a.flags), a
    if opcode == Opcode.COMMIT:
        a.flags = rng.getrandbits(1)
        a.max_attempts, a.retry_ms = rng.randrange(1, MAX_ATTEMPTS + 1), rng.randrange(0, MAX_RETRY_MS + 1)
        at = rng.randrange(LOWEST, HIGHEST - 0x100000)
        body = b""
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            length = rng.choice((1, 2, 5, 14, rng.randrange(1, 64)))
            no_suspend = rng.getrandbits(1)
            expected, new = rng.randbytes(length), rng.randbytes(length)
            a.writes.append((at, length, no_suspend, expected, new))
            body += struct.pack("<QHBB", at, length, no_suspend, 0) + expected + new
            at += length + rng.randrange(0, 64)
        head = struct.pack("<IIIII", a.handle, a.flags, a.max_attempts, a.retry_ms, len(a.writes))
        return head + body, a
    raise ValueError(f"no generator for opcode {opcode:#x}")


# ---------------------------------------------------------------- mutations


def _flip(rng: random.Random, frame: bytearray) -> None:
    if len(frame) > 0:
        i = rng.randrange(len(frame))
        frame[i] ^= 1 << rng.randrange(8)


def _overwrite(rng: random.Random, frame: bytearray) -> None:
    if len(frame) > 0:
        frame[rng.randrange(len(frame))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))


def _edge_u64(rng: random.Random, frame: bytearray) -> None:
    if len(frame) >= HEADER.size + 8:
        at = rng.randrange(HEADER.size, len(frame) - 7)
        frame[at:at + 8] = struct.pack("<Q", rng.choice(EDGE_ADDRESSES))


def _edge_u32(rng: random.Random, frame: bytearray) -> None:
    if len(frame) >= HEADER.size + 4:
        at = rng.randrange(HEADER.size, len(frame) - 3)
        frame[at:at + 4] = struct.pack("<I", rng.choice((0, 1, 0xFFFF, 0x10000, MAX_WRITES + 1, 0xFFFFFFFF)))


def _truncate(rng: random.Random, frame: bytearray) -> None:
    del frame[rng.randrange(HEADER.size, len(frame) + 1):]


def _extend(rng: random.Random, frame: bytearray) -> None:
    frame += rng.randbytes(rng.choice((1, 2, 8, 14)))


def _header(rng: random.Random, frame: bytearray) -> None:
    which = rng.randrange(3)
    if which == 0:
        frame[4:6] = struct.pack("<H", rng.choice((0, 0x13, 0xFFFF, rng.randrange(1, 0x13))))
    elif which == 1:
        frame[6:8] = struct.pack("<H", rng.choice((0, 2, 0xFFFF)))
    else:
        frame[0:4] = struct.pack("<I", rng.choice((MAX_PAYLOAD + 1, 0xFFFFFFFF)))


def _commit_count(rng: random.Random, frame: bytearray) -> None:
    opcode = struct.unpack_from("<H", frame, 4)[0]
    if opcode == Opcode.COMMIT and len(frame) >= HEADER.size + 20:
        struct.pack_into("<I", frame, HEADER.size + 16, rng.choice((0, 2, 100, MAX_WRITES, MAX_WRITES + 1)))


def _write_length(rng: random.Random, frame: bytearray) -> None:
    opcode = struct.unpack_from("<H", frame, 4)[0]
    if opcode == Opcode.COMMIT and len(frame) >= HEADER.size + 30:
        struct.pack_into("<H", frame, HEADER.size + 28, rng.choice((0, 1, 0x7FFF, MAX_WRITE, MAX_WRITE + 1, 0xFFFF)))


MUTATIONS: tuple[Callable[[random.Random, bytearray], None], ...] = (
    _flip, _overwrite, _edge_u64, _edge_u64, _edge_u32, _truncate, _extend, _header, _commit_count, _write_length,
)


@dataclass(frozen=True)
class Case:
    frame: bytes
    expected: str | None  # the argument dump of an unmutated request


def make_cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    opcodes = [int(op) for op in Opcode]
    cases = []
    for index in range(count):
        opcode = opcodes[index % len(opcodes)] if index < 4 * len(opcodes) else rng.choice(opcodes)
        payload, args = valid_request(rng, opcode)
        frame = encode_frame(opcode, payload, index + 1)
        if index < 4 * len(opcodes):
            cases.append(Case(frame, args.line(opcode)))
            continue
        mutated = bytearray(frame)
        for _ in range(rng.choice((1, 1, 2, 3))):
            rng.choice(MUTATIONS)(rng, mutated)
        if rng.random() < 0.8 and struct.unpack_from("<I", mutated, 0)[0] <= MAX_PAYLOAD:
            struct.pack_into("<I", mutated, 0, len(mutated) - HEADER.size)  # keep the frame readable
        cases.append(Case(bytes(mutated), None))
    return cases


# ---------------------------------------------------------------- checking


def _in_space(address: int, size: int) -> bool:
    return size > 0 and LOWEST <= address and address + size - 1 <= HIGHEST


def check_accepted(opcode: int, fields: list[str]) -> str | None:
    """Why an accepted request breaks a handler's precondition, or None."""
    values = [int(v, 16) for v in fields[:12]]
    _, _, flags, _, address, size, distance, _, timeout_ms, attempts, retry_ms, count = values
    extra = fields[12:]
    if opcode in (Opcode.READ, Opcode.WRITE, Opcode.PROTECT) and not _in_space(address, size):
        return f"range {address:#x}+{size:#x} outside the user space"
    if opcode in (Opcode.FLUSH, Opcode.THREAD_CONTEXTS) and size and not _in_space(address, size):
        return f"range {address:#x}+{size:#x} outside the user space"
    if opcode == Opcode.READ and size > MAX_PAYLOAD or opcode in (Opcode.PROTECT, Opcode.FLUSH) and size > MAX_REGION:
        return f"size {size:#x} too large"
    if opcode == Opcode.WRITE and (len(extra) != 1 or len(extra[0]) - 5 != 2 * size):
        return "WRITE data does not match its size"
    if opcode == Opcode.ALLOC_NEAR and (not 0 < size <= MAX_REGION or not 0 < distance <= MAX_DISTANCE
                                        or address and not _in_space(address, 1)):
        return "ALLOC_NEAR fields out of range"
    if opcode == Opcode.REMOTE_CALL and (address == 0 or not 0 < timeout_ms <= MAX_TIMEOUT_MS or flags > 1):
        return "REMOTE_CALL fields out of range"
    if opcode in (Opcode.COMMIT, Opcode.FLOOR, Opcode.THREAD_CONTEXTS) and flags > 1:
        return f"unknown flags {flags:#x}"
    if opcode == Opcode.COMMIT:
        if not (0 < count <= MAX_WRITES and 0 < attempts <= MAX_ATTEMPTS and retry_ms <= MAX_RETRY_MS):
            return "COMMIT header out of range"
        if len(extra) != count:
            return "COMMIT write count differs from the writes"
        spans = []
        for item in extra:
            at, length, no_suspend, expected, new = item[2:].split(":")
            at_v, length_v = int(at, 16), int(length, 16)
            if not (0 < length_v <= MAX_WRITE and _in_space(at_v, length_v) and no_suspend in ("0", "1")):
                return f"COMMIT write {at} out of range"
            if len(expected) != 2 * length_v or len(new) != 2 * length_v:
                return "COMMIT write bytes do not match the length"
            spans.append((at_v, length_v))
        spans.sort()
        if any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
            return "COMMIT writes overlap"
    return None


def check_case(case: Case, line: str) -> str | None:
    """What is wrong with wire_check's answer to one case, or None."""
    if line in ("short", "oom"):
        return None if line == "short" and len(case.frame) < HEADER.size else f"harness said {line}"
    status_text, reply_hex, *fields = line.split(" ")
    status, reply = int(status_text), bytes.fromhex(reply_hex)
    length, opcode, reply_status, request_id = HEADER.unpack_from(reply)
    sent_length, sent_opcode, _, sent_id = HEADER.unpack_from(case.frame)
    if status not in PARSER_STATUSES:
        return f"status {status} is not a parser's"
    if (opcode, reply_status, request_id, length) != (sent_opcode, status, sent_id, len(reply) - HEADER.size):
        return f"reply header {(opcode, reply_status, request_id, length)} does not echo the request"
    if status != Status.OK:
        try:
            info = ErrorInfo.decode(reply[HEADER.size:])
        except Exception as exc:  # the client must always decode an error
            return f"error payload does not decode: {exc}"
        return None if info.message else "error without a message"
    if length:
        return "an accepted request's reply (before the handler) must be empty"
    if case.expected is not None and " ".join(fields) != case.expected:
        return f"valid request parsed as {' '.join(fields)!r}, sent {case.expected!r}"
    return check_accepted(sent_opcode, fields)


@dataclass
class Result:
    cases: int
    statuses: Counter[int]
    seconds: float
    failures: list[str]


def run(cases: list[Case], binary: Path, batch: int = 5000) -> Result:
    """Every case through ``wire_check`` in batches; a sanitizer abort names the batch."""
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    env = {**SANITIZER_ENV}
    started = time.monotonic()
    for first in range(0, len(cases), batch):
        chunk = cases[first:first + batch]
        stream = b"".join(struct.pack("<I", len(c.frame)) + c.frame for c in chunk)
        proc = subprocess.run([str(binary), "--space", hex(LOWEST), hex(HIGHEST)], input=stream,
                              capture_output=True, env=env, timeout=600)
        if proc.returncode != 0 or proc.stderr:
            failures.append(f"wire_check exit {proc.returncode} on cases {first}..{first + len(chunk) - 1}: "
                            f"{proc.stderr.decode(errors='replace')[-2000:]}")
            continue
        lines = proc.stdout.decode().splitlines()
        if len(lines) != len(chunk):
            failures.append(f"{len(lines)} answers to {len(chunk)} cases")
            continue
        for index, (case, line) in enumerate(zip(chunk, lines)):
            problem = check_case(case, line)
            if line not in ("short", "oom"):
                statuses[int(line.split(" ", 1)[0])] += 1
            if problem:
                failures.append(f"case {first + index} ({case.frame.hex()}): {problem}")
    return Result(len(cases), statuses, time.monotonic() - started, failures)
