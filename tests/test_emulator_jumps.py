"""The emulator's models of msvcrt's setjmp/longjmp and _time64, and ws2_32's byte-order functions.

The fixture cases ``setjmp_longjmp`` and ``byte_order`` run real mingw-built
code through these models (tests/test_emulator.py checks their values, which
host.exe measures under Wine in tests/test_fixture_cases.py); the tests here pin
what those cannot see from C: each register longjmp restores, the jump buffer's
layout, and the frames a longjmp unwinds through.
"""

from __future__ import annotations

import struct

import pytest

from hotpatch.apply.backend import call_function, find_export
from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.emulation.jumps import JUMP_BUFFER_SIZE
from hotpatch.errors import GuestExceptionError
from hotpatch.pe.image import Image
from hotpatch.verify.calls import Address, call
from tests.fixtures.cases import Case, case_named
from tests.support.emulation import model_module, place_code

# The values the code below puts in the non-volatile registers before setjmp, and then clobbers.
SAVED = {"rbx": 0x1111, "rbp": 0x2222, "rsi": 0x3333, "rdi": 0x4444, "r12": 0x5555, "r13": 0x6666,
         "r14": 0x7777, "r15": 0x8888}


@pytest.fixture
def backend(cases: list[Case]) -> EmulatorBackend:
    backend = EmulatorBackend.load(case_named(cases, "byte_order").baseline)
    backend.provide_imports([("msvcrt.dll", "_setjmp"), ("msvcrt.dll", "longjmp")])
    return backend


def _crt(backend: EmulatorBackend, name: str) -> int:
    return find_export(backend, model_module(backend, "msvcrt.dll"), name)


def test_longjmp_restores_every_non_volatile_register_and_returns_its_value(backend: EmulatorBackend) -> None:
    """setjmp(buf, 0); change rbx, rbp, rsi, rdi, r12-r15, xmm6 and rsp; longjmp(buf, 0): setjmp returns 1 with
    the registers of the first return. The code writes them to out[] and returns setjmp's second result."""
    setjmp, longjmp = _crt(backend, "_setjmp"), _crt(backend, "longjmp")
    sets = "; ".join(f"mov {reg}, {value:#x}" for reg, value in SAVED.items())
    clobber = "; ".join(f"mov {reg}, -1" for reg in SAVED)
    stores = "; ".join(f"mov qword ptr [rax + {8 * i}], {reg}" for i, reg in enumerate(SAVED))
    code = place_code(backend, f"""
        push rbx; push rbp; push rsi; push rdi; push r12; push r13; push r14; push r15
        sub rsp, 0x48
        mov qword ptr [rsp + 0x28], rcx
        mov qword ptr [rsp + 0x30], rdx
        {sets}
        mov rax, 0x0123456789abcdef; movq xmm6, rax
        mov rcx, qword ptr [rsp + 0x28]
        xor edx, edx
        mov rax, {setjmp:#x}
        call rax
        test eax, eax
        jne returned_again
        {clobber}
        pcmpeqd xmm6, xmm6
        sub rsp, 0x100
        mov rcx, qword ptr [rsp + 0x128]
        xor edx, edx
        mov rax, {longjmp:#x}
        call rax
        int3
    returned_again:
        mov rcx, rax
        mov rax, qword ptr [rsp + 0x30]
        {stores}
        movq qword ptr [rax + 0x40], xmm6
        mov rax, rcx
        add rsp, 0x48
        pop r15; pop r14; pop r13; pop r12; pop rdi; pop rsi; pop rbp; pop rbx
        ret
    """)
    buffer = backend.heap_allocate(JUMP_BUFFER_SIZE)
    out = backend.heap_allocate(0x48)
    assert call(backend, Address(code), [buffer, out], returns="int32").value == 1
    registers = struct.unpack("<9Q", backend.read(out, 0x48))
    assert registers == (*SAVED.values(), 0x0123456789ABCDEF)
    frame, rbx, rsp, rbp = struct.unpack_from("<4Q", backend.read(buffer, 32))
    assert (frame, rbx, rbp) == (0, SAVED["rbx"], SAVED["rbp"])
    rip = struct.unpack_from("<Q", backend.read(buffer, 0x58), 0x50)[0]
    assert rip > code and backend.read(rip, 2) == b"\x85\xc0"  # right after the call: test eax, eax


def test_longjmp_with_a_value_returns_it_and_without_a_frame_skips_unwinding(backend: EmulatorBackend) -> None:
    setjmp, longjmp = _crt(backend, "_setjmp"), _crt(backend, "longjmp")
    code = place_code(backend, f"""
        push rbx
        sub rsp, 0x20
        mov rbx, rcx
        xor edx, edx
        mov rax, {setjmp:#x}
        call rax
        test eax, eax
        jne done
        mov rcx, rbx
        mov edx, 42
        mov rax, {longjmp:#x}
        call rax
    done:
        add rsp, 0x20
        pop rbx
        ret
    """)
    buffer = backend.heap_allocate(JUMP_BUFFER_SIZE)
    assert call(backend, Address(code), [buffer], returns="int32").value == 42


def test_longjmp_across_frames_runs_the_termination_handlers_between(cases: list[Case]) -> None:
    """parse() -> middle() -> check() -> longjmp: middle's __finally runs (unwinds() says 1), parse returns."""
    case = case_named(cases, "setjmp_longjmp")
    backend = EmulatorBackend.load(case.baseline)
    assert call(backend, "parse", [10]).value == 31
    assert call(backend, "unwinds").value == 0, "no longjmp yet: nothing unwound"
    assert call(backend, "parse", [500]).value == -7000
    assert call(backend, "unwinds").value == 1
    assert call(backend, "parse", [-1]).value == -1000, "longjmp(env, 0) makes setjmp return 1"


def test_a_longjmp_to_a_frame_no_longer_on_the_stack_is_refused(cases: list[Case]) -> None:
    """The buffer's frame lies below longjmp's caller (its function returned): Windows refuses such an unwind."""
    backend = EmulatorBackend.load(case_named(cases, "byte_order").baseline)
    backend.provide_imports([("msvcrt.dll", "longjmp")])
    longjmp = _crt(backend, "longjmp")
    buffer = backend.heap_allocate(JUMP_BUFFER_SIZE)
    stale_frame = backend.machine.stack_limit + 0x100  # far below any frame of the call below
    backend.write(buffer, struct.pack("<Q", stale_frame) + bytes(JUMP_BUFFER_SIZE - 8))
    code = place_code(backend, f"sub rsp, 0x28; mov edx, 3; mov rax, {longjmp:#x}; call rax; int3")
    with pytest.raises(GuestExceptionError, match="passed its target frame"):
        call(backend, Address(code), [buffer])


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("htonl", 0x12345678, 0x78563412),
    ("ntohl", 0xFFFFFFFF_000000FF, 0xFF000000),  # only the low 32 bits count, the result is zero-extended
    ("htons", 0x1234, 0x3412),
    ("ntohs", 0xABCD_0050, 0x5000),
])
def test_byte_order_functions(backend: EmulatorBackend, name: str, value: int, expected: int) -> None:
    ws2_32 = next(m for m in backend.modules() if m.name.lower() == "ws2_32.dll")
    assert call_function(backend, find_export(backend, ws2_32, name), value) == expected


def test_the_byte_order_case_imports_ws2_32(cases: list[Case]) -> None:
    case = case_named(cases, "byte_order")
    names = {(e.dll.lower(), e.name) for e in Image.load(case.baseline).imports}
    assert {("ws2_32.dll", n) for n in ("htonl", "htons", "ntohl", "ntohs")} <= names


def test_time_reads_the_deterministic_clock(backend: EmulatorBackend) -> None:
    """_time64 (Lua seeds its hash from it): seconds since 1970 on the machine's clock, the same in every process."""
    backend.provide_imports([("msvcrt.dll", "_time64")])
    time64 = _crt(backend, "_time64")
    cell = backend.heap_allocate(8)
    first = call_function(backend, time64, cell)
    assert first == struct.unpack("<q", backend.read(cell, 8))[0]
    assert 1704067200 <= first < 1704067200 + 3600  # 2024-01-01, the guest's FILETIME
    other = EmulatorBackend.load(backend.main_module().path)
    other.provide_imports([("msvcrt.dll", "_time64")])
    assert call_function(other, _crt(other, "_time64"), 0) == first
