"""The agent's request parser built natively (gcc, ASan+UBSan) and fuzzed: see tests/support/wire_fuzz.py."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hotpatch.apply.protocol import Opcode, Status, encode_frame
from tests.support import wire_fuzz
from tests.support.native import SANITIZER_ENV, build_wire_check
from tests.support.wire_fuzz import HIGHEST, LOWEST, Case

FUZZ_CASES = 30000


@pytest.fixture(scope="module")
def wire_check() -> Path:
    return build_wire_check()


def answers(binary: Path, frames: list[bytes]) -> list[tuple[int, str]]:
    result = wire_fuzz.run([Case(frame, None) for frame in frames], binary)
    assert not result.failures, result.failures[:5]
    stream = b"".join(struct.pack("<I", len(f)) + f for f in frames)
    out = subprocess.run([str(binary)], input=stream, capture_output=True, check=True).stdout.decode()
    return [(int(line.split(" ")[0]), line) for line in out.splitlines()]


def test_ranges_that_wrap_or_leave_user_space_are_refused(wire_check: Path) -> None:
    top = 0xFFFF_FFFF_FFFF_FFF0
    commit_head = struct.pack("<IIIII", 1, 0, 1, 0, 1)
    frames = [
        encode_frame(Opcode.WRITE, struct.pack("<IQ", 1, top) + b"\xcc" * 5, 1),  # the hang
        encode_frame(Opcode.WRITE, struct.pack("<IQ", 1, HIGHEST - 1) + b"\xcc" * 5, 2),  # ends past the top
        encode_frame(Opcode.READ, struct.pack("<IIQ", 1, 16, top), 3),
        encode_frame(Opcode.READ, struct.pack("<IIQ", 1, 16, 0), 4),  # below the lowest user address
        encode_frame(Opcode.PROTECT, struct.pack("<IIQQ", 1, 0x40, top, 0x20), 5),
        encode_frame(Opcode.FLUSH, struct.pack("<IQQ", 1, HIGHEST, 2), 6),
        encode_frame(Opcode.COMMIT, commit_head + struct.pack("<QHBB", top, 5, 0, 0) + bytes(10), 7),
        encode_frame(Opcode.THREAD_CONTEXTS, struct.pack("<IIQQ", 1, 0, top, 0x100), 8),
        encode_frame(Opcode.ALLOC_NEAR, struct.pack("<IIQQQ", 1, 0x20, top, 0x1000, 0), 9),
        # the last byte of user space is fine
        encode_frame(Opcode.WRITE, struct.pack("<IQ", 1, HIGHEST - 4) + b"\xcc" * 5, 10),
        encode_frame(Opcode.READ, struct.pack("<IIQ", 1, 1, LOWEST), 11),
    ]
    statuses = [status for status, _ in answers(wire_check, frames)]
    assert statuses == [Status.BAD_PAYLOAD] * 9 + [Status.OK] * 2


def test_count_slot_survives_the_reply_buffer_moving(wire_check: Path) -> None:
    # LIST_MODULES/LIST_PROCESSES fill in their count after the entries have
    # made the reply grow; a kept pointer read freed memory (ASan would abort).
    out = subprocess.run([str(wire_check), "--selftest"], capture_output=True, text=True,
                         env=SANITIZER_ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "buffer moved" in out.stdout and "selftest: ok" in out.stdout


def test_mutated_frames_keep_every_handler_precondition(wire_check: Path) -> None:
    result = wire_fuzz.run(wire_fuzz.make_cases(FUZZ_CASES, seed=20261202), wire_check)
    assert not result.failures, result.failures[:5]
    assert result.cases == FUZZ_CASES
    # the run reaches the handlers' side as well as every kind of refusal
    for status in (Status.OK, Status.BAD_PAYLOAD, Status.BAD_FRAME, Status.BAD_VERSION, Status.UNKNOWN_OPCODE):
        assert result.statuses[status] > 100, result.statuses


def test_agent_fuzz_script_runs_standalone() -> None:
    script = Path(__file__).parent / "fuzz_agent.py"
    out = subprocess.run([sys.executable, str(script), "--cases", "2000", "--seed", "7"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "seed 7: 2000 cases" in out.stdout
