"""The emulator backend: PE mapping, calls, the ProcessBackend semantics the apply engine relies on.

The fixture cases' expected values were measured under Wine, so running
every case's calls here cross-checks the emulator's loader, models and
exception machinery against a real Windows loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hotpatch.apply.backend import REL32_REACH, CommitWrite, call_function, find_export
from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.errors import (
    BackendError,
    BytesMismatchError,
    EmulationFaultError,
    GuestExceptionError,
    InputsError,
    InstructionLimitError,
    UnmodelledImportError,
    Win32Error,
)
from hotpatch.pe.image import Image
from hotpatch.process.win32mem import (
    MEM_COMMIT,
    MEM_FREE,
    MEM_IMAGE,
    MEM_PRIVATE,
    PAGE_EXECUTE_READ,
    PAGE_EXECUTE_READWRITE,
    PAGE_READONLY,
    PAGE_READWRITE,
    PAGE_WRITECOPY,
)
from hotpatch.verify.calls import (
    Address,
    Buffer,
    CallResult,
    CallSpec,
    MemoryWrite,
    call,
    compare,
    default_calls,
    load_inputs,
    parse_inputs,
    run_calls,
)
from hotpatch.x86 import assemble
from tests.fixtures.build_fixtures import ASLR_IMAGE_BASE, CASE_IMAGE_BASE
from tests.fixtures.cases import Case, case_named, load_cases
from tests.support.emulation import model_module, place_code

CASE_NAMES = [case.name for case in load_cases(Path("unbuilt"))]
#: Cases whose calls the emulator cannot run, with the reason. Empty: every case runs, SEH and C++ included.
NOT_EMULATED: dict[str, str] = {}
@pytest.fixture
def body_change(cases: list[Case]) -> EmulatorBackend:
    return EmulatorBackend.load(case_named(cases, "body_change").baseline)


# ── the fixture cases, against the values measured under Wine ─────────────


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("variant", ["baseline", "patched"])
def test_fixture_calls_match_the_values_measured_under_wine(cases: list[Case], name: str, variant: str) -> None:
    if name in NOT_EMULATED:
        pytest.fail(f"{name} is listed as not emulated: {NOT_EMULATED[name]}")
    case = case_named(cases, name)
    backend = EmulatorBackend.load(case.dll(variant))
    module = backend.main_module()
    assert module.base_va != CASE_IMAGE_BASE, "the emulator must load away from the preferred base"
    # in order, in one process: struct_field_insert keeps a heap object across calls
    results = run_calls(backend, [CallSpec(c.function, c.args) for c in case.calls])
    got = [(c.function, c.args, r.value) for c, r in zip(case.calls, results)]
    want = [(c.function, c.args, getattr(c, variant)) for c in case.calls]
    assert got == want


@pytest.mark.parametrize("name", ["cpp_exception", "seh", "struct_field_insert", "new_import_dll"])
def test_fixture_calls_also_match_after_dllmain(cases: list[Case], name: str) -> None:
    case = case_named(cases, name)
    backend = EmulatorBackend.load(case.patched, run_dllmain=True)
    results = run_calls(backend, [CallSpec(c.function, c.args) for c in case.calls])
    assert [r.value for r in results] == [c.patched for c in case.calls]


def test_stripped_dlls_are_called_by_export(cases: list[Case]) -> None:
    case = case_named(cases, "switch_table")
    backend = EmulatorBackend.load(case.dll("patched", stripped=True))
    assert [call(backend, c.function, list(c.args)).value for c in case.calls] == [c.patched for c in case.calls]


# ── mapping like the loader ───────────────────────────────────────────────


def test_image_is_mapped_with_section_protections_relocations_and_bound_imports(cases: list[Case]) -> None:
    case = case_named(cases, "aslr_reloc")
    image = Image.load(case.baseline)
    backend = EmulatorBackend.load(image)
    module = backend.main_module()
    base = module.base_va
    assert base == CASE_IMAGE_BASE + 0x10000000 and module.size >= image.identity.size_of_image
    header = backend.query(base)
    assert (header.type, header.protect, header.allocation_base_va) == (MEM_IMAGE, PAGE_READONLY, base)
    for section in image.sections:
        region = backend.query(base + section.rva)
        expected = {".text": PAGE_EXECUTE_READ, ".rdata": PAGE_READONLY, ".data": PAGE_WRITECOPY}.get(section.name)
        if expected is not None:
            assert region.protect == expected, section.name
    # every DIR64 slot now holds the preferred-base value moved by the load delta
    delta = base - image.image_base
    for rva in image.relocations:
        (original,) = struct.unpack_from("<Q", image.memory, rva)
        (mapped,) = struct.unpack("<Q", backend.read(base + rva, 8))
        assert mapped == (original + delta) & (2**64 - 1)
    # imports point at stubs of model DLLs, which export them by name
    for entry in image.imports:
        (bound,) = struct.unpack("<Q", backend.read(base + entry.iat_rva, 8))
        assert find_export(backend, model_module(backend, entry.dll.lower()), entry.name) == bound
    # the optional header says where the image is, as the loader leaves it
    (pe_offset,) = struct.unpack("<I", backend.read(base + 0x3C, 4))
    assert struct.unpack("<Q", backend.read(base + pe_offset + 48, 8)) == (base,)


def test_explicit_base_and_preferred_base(cases: list[Case]) -> None:
    case = case_named(cases, "body_change")
    at = EmulatorBackend.load(case.baseline, base=0x2_4000_0000)
    assert at.main_module().base_va == 0x2_4000_0000
    preferred = EmulatorBackend.load(case.baseline, base=CASE_IMAGE_BASE)
    assert call(preferred, "scale", [10]).value == call(at, "scale", [10]).value == 31
    with pytest.raises(BackendError, match="64 KiB"):
        EmulatorBackend.load(case.baseline, base=0x2_4000_1000)


def test_two_dlls_with_the_same_preferred_base_are_both_relocated(built_fixtures: Path) -> None:
    backend = EmulatorBackend.load(built_fixtures / "aslr" / "a.dll")
    second = backend.load_module(built_fixtures / "aslr" / "b.dll")
    first = backend.main_module()
    names = [m.name for m in backend.modules()]
    assert names[:2] == ["a.dll", "b.dll"] and {"kernel32.dll", "ntdll.dll", "msvcrt.dll"} <= set(names)
    assert ASLR_IMAGE_BASE not in (first.base_va, second.base_va) and first.base_va != second.base_va
    assert call(backend, "module_tag").value == 1
    assert call(backend, "module_tag", module="b.dll").value == 2
    assert call(backend, "through_table", [5], module="b.dll").value == 2005
    with pytest.raises(BackendError, match="already loaded"):
        backend.load_module(built_fixtures / "aslr" / "b.dll")


def test_model_dlls_have_export_directories_like_real_ones(body_change: EmulatorBackend) -> None:
    kernel32 = model_module(body_change, "kernel32.dll")
    region = body_change.query(kernel32.base_va + 0x1000)
    assert (region.type, region.protect) == (MEM_IMAGE, PAGE_EXECUTE_READ)
    for name in ("RtlAddFunctionTable", "RtlDeleteFunctionTable", "LoadLibraryA", "GetProcAddress"):
        assert kernel32.contains(find_export(body_change, kernel32, name))
    with pytest.raises(BackendError, match="exports no function named CreateFileA"):
        find_export(body_change, kernel32, "CreateFileA")


# ── the call harness ──────────────────────────────────────────────────────


def test_buffers_go_through_memcpy_and_strlen(body_change: EmulatorBackend) -> None:
    msvcrt = model_module(body_change, "msvcrt.dll")
    strlen, memcpy = find_export(body_change, msvcrt, "strlen"), find_export(body_change, msvcrt, "memcpy")
    # copy_and_measure(dst, src): memcpy(dst, src, strlen(src) + 1); dst[0] = 'X'; return strlen(dst)
    code = place_code(body_change, f"""
        push rbx
        push rsi
        push rdi
        sub rsp, 0x20
        mov rdi, rcx
        mov rsi, rdx
        mov rcx, rsi
        mov rax, {strlen:#x}
        call rax
        lea r8, [rax + 1]
        mov rcx, rdi
        mov rdx, rsi
        mov rax, {memcpy:#x}
        call rax
        mov byte ptr [rdi], 0x58
        mov rcx, rdi
        mov rax, {strlen:#x}
        call rax
        add rsp, 0x20
        pop rdi
        pop rsi
        pop rbx
        ret
    """)
    result = call(body_change, Address(code), [Buffer(bytes(12), "buffer"), b"hello\0"])
    assert result.value == 5
    assert result.buffers == (b"Xello\0" + bytes(6), b"hello\0")
    assert result.writes == ()  # only the heap buffers changed, and they are reported as buffers
    [spec] = parse_inputs({"calls": [{"function": "x", "args": [{"buffer": 8}, {"string": "abc"}],
                                      "returns": "int32"}]})
    again = call(body_change, CallSpec(Address(code), spec.args, spec.returns))
    assert (again.value, again.buffers) == (3, (b"Xbc\0" + bytes(4), b"abc\0"))


def test_targets_are_exports_symbols_or_rvas(cases: list[Case]) -> None:
    case = case_named(cases, "new_callee")
    image = Image.load(case.patched)
    backend = EmulatorBackend.load(image)
    rotate_mix = next(s for s in image.symbols if s.name == "rotate_mix")  # static: a symbol, not an export
    assert not any(e.name == "rotate_mix" for e in image.exports)
    by_symbol = call(backend, "rotate_mix", [3, 5])
    assert by_symbol.function_va == backend.main_module().base_va + rotate_mix.rva
    assert call(backend, rotate_mix.rva, [3, 5]).rax == by_symbol.rax
    identity = next(e for e in image.exports if e.name == "identity")
    [spec] = parse_inputs({"calls": [{"function": hex(identity.rva), "args": ["0x7"]}]})
    assert call(backend, spec).value == 7
    with pytest.raises(InputsError, match="no export or symbol named 'nope'"):
        call(backend, "nope")


def test_calls_record_what_they_change_in_module_data(cases: list[Case]) -> None:
    case = case_named(cases, "changed_init_global")
    image = Image.load(case.baseline)
    backend = EmulatorBackend.load(image)
    limit = next(s for s in image.symbols if s.name == "limit")
    result = call(backend, "set_limit", [42])
    assert result.value == 10
    [write] = [w for w in result.writes if w.changed]
    assert (write.module, write.rva, write.image_index) == ("baseline.dll", limit.rva, 0)
    assert (write.before, write.after) == (struct.pack("<q", 10), struct.pack("<q", 42))
    assert call(backend, "clamp", [100]).value == 42
    assert call(backend, "clamp", [100]).writes == ()


def test_return_types_read_rax() -> None:
    spec = CallSpec("f", (), "int32")
    result = CallResult(spec, 0, 0xDEADBEEF_FFFFFFFE, (), ())
    assert result.value == -2
    assert CallResult(CallSpec("f", (), "uint8"), 0, 0x1FF, (), ()).value == 0xFF
    assert CallResult(CallSpec("f", (), "bool"), 0, 0x100, (), ()).value == 0
    assert CallResult(CallSpec("f", (), "void"), 0, 5, (), ()).value is None
    assert CallResult(CallSpec("f"), 0, 2**64 - 3, (), ()).value == -3


def test_compare_reports_the_first_difference_in_a_sentence(cases: list[Case]) -> None:
    case = case_named(cases, "body_change")
    specs = [CallSpec(c.function, c.args) for c in case.calls]
    baseline = run_calls(EmulatorBackend.load(case.baseline), specs)
    patched = run_calls(EmulatorBackend.load(case.patched), specs)
    again = run_calls(EmulatorBackend.load(case.baseline), specs)
    assert compare(baseline, again) is None
    difference = compare(baseline, patched, labels=("baseline + package", "patched"))
    assert difference is not None and (difference.index, difference.kind) == (0, "return")
    assert str(difference) == ("call 1, scale(10): the return value differs: baseline + package 31 (0x1f), "
                               "patched 48 (0x30)")
    assert compare(baseline, patched[:2]).kind == "count"


def test_compare_reports_buffers_and_memory() -> None:
    spec = CallSpec("fill", (Buffer(bytes(4)),), "void")
    a = CallResult(spec, 0, 0, (b"\x01\x02\x03\x04",), (MemoryWrite(0x1000, b"\0\0", b"\x05\x00", "a.dll", 0x3000, 0),))
    b = CallResult(spec, 0, 0, (b"\x01\x02\x09\x04",), ())
    difference = compare([a], [b], labels=("one", "two"))
    assert difference is not None and difference.kind == "buffer"
    assert str(difference) == ("call 1, fill(<bytes of 4 bytes>): buffer argument 1 differs at offset 2: "
                               "one 03 04, two 09 04")
    b = CallResult(spec, 0, 0, (b"\x01\x02\x03\x04",), (MemoryWrite(0x2000, b"\0\0", b"\x05\x00", "b.dll", 0x3000, 0),))
    assert compare([a], [b]) is None  # matched by image and RVA, not by address
    b = CallResult(spec, 0, 0, (b"\x01\x02\x03\x04",), (MemoryWrite(0x2000, b"\0\0", b"\x06\x07", "b.dll", 0x3000, 0),))
    difference = compare([a], [b])
    assert difference is not None and difference.kind == "memory"
    assert str(difference) == ("call 1, fill(<bytes of 4 bytes>): the memory it changed differs at a.dll+0x3000 "
                               "(2 bytes): first set 05 --, second set 06 07")
    # a package keeps new data elsewhere: translate maps the second process's addresses to the first's
    moved = CallResult(spec, 0, 0, (b"\x01\x02\x03\x04",), (MemoryWrite(0x9000, b"\0", b"\x05", None, None, None),))
    assert compare([a], [moved], translate=lambda va: 0x1000 if va == 0x9000 else None) is None


def test_inputs_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps({"calls": [
        {"function": "scale", "args": [10, "-5", "0x10"]},
        {"function": "0x1370", "args": [{"bytes": "00ff"}, {"buffer": 3}, {"string": "hi"}, {"wstring": "é"}],
         "returns": "uint32", "module": "baseline.dll"},
        {"function": 4976},
    ]}))
    first, second, third = load_inputs(path)
    assert first == CallSpec("scale", (10, -5, 16))
    assert second.function == 0x1370 and second.returns == "uint32" and second.module == "baseline.dll"
    assert [a.data for a in second.args] == [b"\x00\xff", bytes(3), b"hi\0", "é".encode("utf-16-le") + b"\0\0"]
    assert third == CallSpec(0x1370)


@pytest.mark.parametrize("document, message", [
    ({"calls": {}}, "one key"),
    ({"calls": [], "extra": 1}, "one key"),
    ({"calls": [{"args": []}]}, "\"function\""),
    ({"calls": [{"function": "f", "args": [True]}]}, "JSON boolean"),
    ({"calls": [{"function": "f", "args": ["ten"]}]}, "not an integer"),
    ({"calls": [{"function": "f", "args": [2**64]}]}, "64 bits"),
    ({"calls": [{"function": "f", "args": [{"bytes": "zz"}]}]}, "hex digits"),
    ({"calls": [{"function": "f", "args": [{"buffer": -1}]}]}, "unknown argument"),
    ({"calls": [{"function": "f", "args": [{"buffer": 1 << 30}]}]}, "exceeds"),
    ({"calls": [{"function": "f", "returns": "float"}]}, "\"returns\""),
    ({"calls": [{"function": "f", "bogus": 1}]}, "optionally"),
])
def test_malformed_inputs_are_refused(document: object, message: str) -> None:
    with pytest.raises(InputsError, match=message):
        parse_inputs(document)


def test_default_calls_try_each_function_with_several_argument_sets() -> None:
    calls = default_calls(["scale", "add"])
    assert len(calls) == 12 and calls[0] == CallSpec("scale", (0, 0, 0, 0))


# ── errors the emulated code causes ───────────────────────────────────────


def test_a_call_into_an_unmodelled_import_names_it(cases: list[Case]) -> None:
    image = Image.load(case_named(cases, "cpp_exception").baseline)
    backend = EmulatorBackend.load(image)
    entry = next(i for i in image.imports if i.name == "IsDBCSLeadByteEx")
    iat = backend.main_module().base_va + entry.iat_rva
    code = place_code(backend, f"sub rsp, 0x28; mov rax, {iat:#x}; call qword ptr [rax]; add rsp, 0x28; ret")
    with pytest.raises(UnmodelledImportError, match=r"^call to kernel32.dll!IsDBCSLeadByteEx has no model "
                                                    r"\(called from 0x[0-9a-f]+ \(allocate_near\)\)") as info:
        call(backend, Address(code))
    assert (info.value.dll, info.value.name) == ("kernel32.dll", "IsDBCSLeadByteEx")
    assert call(backend, "plain", [1]).value == 6  # the process is still usable


def test_a_fault_names_the_address_and_the_instruction(body_change: EmulatorBackend) -> None:
    code = place_code(body_change, "mov rax, qword ptr [rcx]; ret")
    with pytest.raises(EmulationFaultError, match=r"read of 8 bytes at 0x10 \(unmapped\) by the instruction at "
                                                  r"0x[0-9a-f]+ \(allocate_near\): mov rax, qword ptr \[rcx\]"):
        call(body_change, Address(code), [0x10])
    text = body_change.main_module().base_va + 0x1000
    writer = place_code(body_change, "mov qword ptr [rcx], rdx; ret")
    with pytest.raises(EmulationFaultError, match=r"write of 8 bytes at 0x[0-9a-f]+ \(protected\)"):
        call(body_change, Address(writer), [text, 1])


def test_a_runaway_call_stops_at_the_instruction_limit(cases: list[Case]) -> None:
    backend = EmulatorBackend.load(case_named(cases, "body_change").baseline, instruction_limit=10_000)
    code = place_code(backend, "spin: jmp spin")
    with pytest.raises(InstructionLimitError, match="more than 10000 instructions"):
        call(backend, Address(code))
    assert call(backend, "scale", [10]).value == 31


def test_an_unhandled_guest_exception_is_reported(body_change: EmulatorBackend) -> None:
    kernel32 = model_module(body_change, "kernel32.dll")
    raise_exception = find_export(body_change, kernel32, "RaiseException")
    code = place_code(body_change, f"sub rsp, 0x28; mov ecx, 0xE0001234; xor edx, edx; xor r8d, r8d; "
                                   f"xor r9d, r9d; mov rax, {raise_exception:#x}; call rax; add rsp, 0x28; ret")
    with pytest.raises(GuestExceptionError, match="exception 0xe0001234 raised at .* was not handled"):
        call(body_change, Address(code))


def guarded_probe(backend: EmulatorBackend, handler: int) -> tuple[int, int, int]:
    """probe(p): __try { return *p; } __except (EXCEPTION_EXECUTE_HANDLER) { return GetExceptionCode(); }

    New code with its unwind info and scope table, as a hotpatch brings it; ``handler`` is its language
    handler. The code VA, the RUNTIME_FUNCTION table VA and the base to register it with.
    """
    code_va = backend.allocate_near(handler, 0x2000, PAGE_READWRITE)
    base = min(code_va, handler)
    body = assemble("sub rsp, 0x28; mov rax, qword ptr [rcx]; nop; add rsp, 0x28; ret; add rsp, 0x28; ret")
    begin, end, target = 4, 8, 13  # the guarded load, and the __except block
    rva = code_va - base
    unwind = bytes([0x09, 4, 1, 0]) + struct.pack("<HH", 4 | 2 << 8 | 4 << 12, 0)  # EHANDLER; sub rsp, 0x28
    unwind += struct.pack("<I", handler - base) + struct.pack("<IIIII", 1, rva + begin, rva + end, 1, rva + target)
    backend.write(code_va, body)
    backend.write(code_va + 0x100, unwind)
    backend.write(code_va + 0x1000, struct.pack("<III", rva, rva + len(body), rva + 0x100))
    backend.protect(code_va, 0x1000, PAGE_EXECUTE_READ)
    return code_va, code_va + 0x1000, base


def test_cpu_faults_reach_handlers_registered_with_rtl_add_function_table(body_change: EmulatorBackend) -> None:
    """New code with its unwind info registered catches its own access violation through __C_specific_handler."""
    msvcrt = model_module(body_change, "msvcrt.dll")
    code_va, table_va, base = guarded_probe(body_change, find_export(body_change, msvcrt, "__C_specific_handler"))
    with pytest.raises(EmulationFaultError, match="read of 8 bytes at 0x0"):  # no unwind info yet: nobody handles it
        call(body_change, Address(code_va), [0])
    kernel32 = model_module(body_change, "kernel32.dll")
    add = find_export(body_change, kernel32, "RtlAddFunctionTable")
    assert call_function(body_change, add, table_va, 1, base) == 1
    assert call(body_change, Address(code_va), [0], returns="uint32").value == 0xC0000005
    cell = body_change.heap_allocate(struct.pack("<q", 77))
    assert call(body_change, Address(code_va), [cell]).value == 77


def test_a_handler_at_a_bad_address_stops_with_a_fault(body_change: EmulatorBackend) -> None:
    """Unwind info whose handler RVA is wrong for its table's base: the fault is reported, not re-dispatched."""
    msvcrt = model_module(body_change, "msvcrt.dll")
    data = body_change.allocate_near(msvcrt.base_va, 0x1000, PAGE_READWRITE)  # not code
    code_va, table_va, base = guarded_probe(body_change, data)
    add = find_export(body_change, model_module(body_change, "kernel32.dll"), "RtlAddFunctionTable")
    assert call_function(body_change, add, table_va, 1, base) == 1
    with pytest.raises(EmulationFaultError, match=f"execution of protected memory at {data:#x}"):
        call(body_change, Address(code_va), [0])


# ── ProcessBackend semantics ──────────────────────────────────────────────


def test_allocate_near_is_within_reach_and_honours_protections(body_change: EmulatorBackend) -> None:
    module = body_change.main_module()
    va = body_change.allocate_near(module.base_va, 0x3000, PAGE_READWRITE)
    assert va % 0x10000 == 0
    assert abs(va - module.base_va) <= REL32_REACH and abs(va + 0x3000 - module.base_va) <= REL32_REACH
    region = body_change.query(va)
    assert (region.base_va, region.allocation_base_va, region.size) == (va, va, 0x3000)
    assert (region.state, region.type, region.protect, region.allocation_protect) == (
        MEM_COMMIT, MEM_PRIVATE, PAGE_READWRITE, PAGE_READWRITE)
    assert body_change.protect(va + 0x1000, 0x1000, PAGE_EXECUTE_READ) == PAGE_READWRITE
    assert [body_change.query(va + i * 0x1000).protect for i in range(3)] == [
        PAGE_READWRITE, PAGE_EXECUTE_READ, PAGE_READWRITE]
    assert body_change.query(va + 0x1000).size == 0x1000
    near = body_change.allocate_near(module.base_va, 0x1000, PAGE_READWRITE, reach=0x1000000)
    assert abs(near - module.base_va) <= 0x1000000
    anywhere = body_change.allocate_near(0, 0x1000, PAGE_EXECUTE_READWRITE)
    assert body_change.query(anywhere).protect == PAGE_EXECUTE_READWRITE
    with pytest.raises(BackendError, match="NO_SPACE"):
        body_change.allocate_near(module.base_va, 0x20000, PAGE_READWRITE, reach=0x10000)
    with pytest.raises(Win32Error, match="VirtualAllocEx failed with error 87"):
        body_change.allocate_near(module.base_va, 0x1000, 0x3)
    body_change.free(va)
    assert body_change.query(va).state == MEM_FREE
    with pytest.raises(Win32Error, match="VirtualFreeEx failed with error 487") as info:
        body_change.free(va)
    assert info.value.call == "VirtualFreeEx" and info.value.code == 487
    with pytest.raises(Win32Error, match="VirtualFreeEx"):
        body_change.free(module.base_va)  # an image is not an allocation


def test_read_write_protect_query_round_trip(body_change: EmulatorBackend) -> None:
    module = body_change.main_module()
    scale = find_export(body_change, module, "scale")
    original = body_change.read(scale, 8)
    assert body_change.query(scale).protect == PAGE_EXECUTE_READ
    body_change.write(scale, b"\xb8\x63\x00\x00\x00\xc3")  # mov eax, 99; ret: through the protection
    assert body_change.read(scale, 6) == b"\xb8\x63\x00\x00\x00\xc3"
    assert body_change.query(scale).protect == PAGE_EXECUTE_READ
    assert call(body_change, "scale", [10]).value == 99
    body_change.write(scale, original)
    assert call(body_change, "scale", [10]).value == 31
    old = body_change.protect(scale, 1, PAGE_EXECUTE_READWRITE)
    assert old == PAGE_EXECUTE_READ and body_change.protect(scale, 1, old) == PAGE_EXECUTE_READWRITE
    free = body_change.query(0x20000)
    assert free.state == MEM_FREE and free.base_va == 0x20000
    with pytest.raises(Win32Error, match="ReadProcessMemory failed with error 299"):
        body_change.read(0x20000, 4)
    with pytest.raises(Win32Error, match="VirtualProtectEx"):
        body_change.write(0x20000, b"x")
    with pytest.raises(Win32Error, match="VirtualProtectEx failed with error 487"):
        body_change.protect(0x20000, 0x1000, PAGE_READWRITE)
    with pytest.raises(Win32Error, match="error 87"):
        body_change.query(1 << 47)
    with pytest.raises(ValueError):
        body_change.read(scale, 0)


def test_commit_checks_expected_bytes_and_changes_nothing_on_mismatch(body_change: EmulatorBackend) -> None:
    module = body_change.main_module()
    scale, add = find_export(body_change, module, "scale"), find_export(body_change, module, "add")
    scale_bytes, add_bytes = body_change.read(scale, 6), body_change.read(add, 6)
    assert call(body_change, "scale", [10]).value == 31  # translated once, so the commit must invalidate it
    good = CommitWrite(scale, scale_bytes, b"\xb8\x63\x00\x00\x00\xc3")
    bad = CommitWrite(add, b"\x90" * 6, b"\xcc" * 6)
    with pytest.raises(BytesMismatchError, match=r"write 1: the 6 bytes at 0x[0-9a-f]+ are not the expected ones "
                                                 rf"\(found {add_bytes.hex()}\)") as info:
        body_change.commit([good, bad])
    assert (info.value.va, info.value.found) == (add, add_bytes)
    assert body_change.read(scale, 6) == scale_bytes and body_change.read(add, 6) == add_bytes
    report = body_change.commit([good])
    assert (report.suspended, report.pause_us, report.attempts, report.threads) == (False, 0.0, 1, 0)
    assert call(body_change, "scale", [10]).value == 99
    with pytest.raises(BackendError, match="overlap"):
        body_change.commit([CommitWrite(scale, b"\xb8\x63", b"\x90\x90"), CommitWrite(scale + 1, b"\x63", b"\x90")])
    with pytest.raises(ValueError):
        body_change.commit([])


def test_call_function_reaches_the_models_the_engine_uses(body_change: EmulatorBackend) -> None:
    kernel32 = model_module(body_change, "kernel32.dll")
    msvcrt = model_module(body_change, "msvcrt.dll")
    table = body_change.allocate_near(0, 0x1000, PAGE_READWRITE)
    add = find_export(body_change, kernel32, "RtlAddFunctionTable")
    delete = find_export(body_change, kernel32, "RtlDeleteFunctionTable")
    assert call_function(body_change, add, table, 3, 0x1234_0000) == 1
    assert body_change.function_tables == {table: (3, 0x1234_0000)}
    assert call_function(body_change, delete, table) == 1
    assert call_function(body_change, delete, table) == 0 and body_change.function_tables == {}
    load_library = find_export(body_change, kernel32, "LoadLibraryA")
    get_proc_address = find_export(body_change, kernel32, "GetProcAddress")
    body_change.write(table, b"MSVCRT.dll\0kernel32\0nosuch.dll\0strlen\0ntdll.dll\0")
    assert call_function(body_change, load_library, table) == msvcrt.base_va
    assert call_function(body_change, load_library, table + 11) == kernel32.base_va
    assert call_function(body_change, load_library, table + 20) == 0
    strlen = call_function(body_change, get_proc_address, msvcrt.base_va, table + 31)
    assert strlen == find_export(body_change, msvcrt, "strlen")
    assert call_function(body_change, strlen, table) == 10
    # ntdll is in every process; the models a new import may need are there
    ntdll = model_module(body_change, "ntdll.dll")
    assert call_function(body_change, load_library, table + 38) == ntdll.base_va
    assert ntdll.contains(find_export(body_change, ntdll, "RtlComputeCrc32"))


def test_remote_call_returns_the_32_bit_exit_code(body_change: EmulatorBackend) -> None:
    code = place_code(body_change, "mov rax, 0x1234567890; add rax, rcx; ret")
    assert body_change.remote_call(code, 1) == 0x34567891
    assert body_change.remote_call(code, 1, wait=False) == body_change.machine.thread_id


def test_threads_start_time_and_close(body_change: EmulatorBackend) -> None:
    assert body_change.thread_contexts().threads == ()
    assert body_change.suspend_resume_floor().suspended is False
    assert body_change.process_start_time() == body_change.process_start_time() > 0
    body_change.close()
    with pytest.raises(BackendError, match="closed"):
        body_change.modules()


def test_provided_imports_bind_and_stop_clearly_when_called(body_change: EmulatorBackend) -> None:
    body_change.provide_imports([("USER32.dll", "MessageBoxA"), ("kernel32.dll", "lstrlenA"), ("msvcrt.dll", "abs")])
    user32 = model_module(body_change, "user32.dll")
    message_box = find_export(body_change, user32, "MessageBoxA")
    kernel32 = model_module(body_change, "kernel32.dll")
    load_library = find_export(body_change, kernel32, "LoadLibraryA")
    names = body_change.allocate_near(0, 0x1000, PAGE_READWRITE)
    body_change.write(names, b"user32\0")
    assert call_function(body_change, load_library, names) == user32.base_va
    with pytest.raises(UnmodelledImportError, match=r"^call to user32.dll!MessageBoxA has no model"):
        call_function(body_change, message_box, 0, 0, 0, 0)
    assert call_function(body_change, find_export(body_change, kernel32, "lstrlenA"), names) == 6


def test_the_thread_environment_is_there(cases: list[Case]) -> None:
    image = Image.load(case_named(cases, "body_change").baseline)
    backend = EmulatorBackend.load(image)
    machine = backend.machine

    def gs(offset: int) -> int:
        return call(backend, Address(place_code(backend, f"mov rax, qword ptr gs:[{offset:#x}]; ret")),
                    returns="uint64").value

    assert gs(0x30) == machine.teb and gs(0x60) == machine.peb
    assert gs(0x08) == machine.stack_base and gs(0x10) == machine.stack_limit
    assert struct.unpack("<Q", backend.read(machine.peb + 0x10, 8)) == (backend.main_module().base_va,)
    # this thread's TLS block for the image holds its TLS template (mingw images have a TLS directory)
    assert image.tls is not None
    tls_block = struct.unpack("<Q", backend.read(gs(0x58), 8))[0]
    assert backend.read(tls_block, len(image.tls.template) + 1) == image.tls.template + b"\0"


def test_vectored_handlers_see_cpu_exceptions_first(body_change: EmulatorBackend) -> None:
    kernel32 = model_module(body_change, "kernel32.dll")
    add = find_export(body_change, kernel32, "AddVectoredExceptionHandler")
    # handler(EXCEPTION_POINTERS *p): step over the int3 and continue (EXCEPTION_CONTINUE_EXECUTION)
    handler = place_code(body_change, "mov rax, qword ptr [rcx + 8]; inc qword ptr [rax + 0xf8]; mov eax, -1; ret")
    code = place_code(body_change, "mov eax, 5; int3; add eax, 1; ret")
    with pytest.raises(EmulationFaultError, match=r"breakpoint \(int3\) at 0x[0-9a-f]+ \(allocate_near\): int3"):
        call(body_change, Address(code))
    assert call_function(body_change, add, 1, handler) != 0
    assert call(body_change, Address(code)).value == 6


def test_a_real_msvc_binary_loads_and_runs_its_dllmain(rust_pyd: Path) -> None:
    backend = EmulatorBackend.load(rust_pyd, run_dllmain=True)
    names = {m.name for m in backend.modules()}
    assert {"_rust.pyd", "vcruntime140.dll", "python3.dll", "api-ms-win-crt-runtime-l1-1-0.dll"} <= names
    assert backend.main_module().base_va != Image.load(rust_pyd).image_base


def test_printf_output_is_collected_and_sprintf_formats_into_a_buffer(body_change: EmulatorBackend) -> None:
    msvcrt = model_module(body_change, "msvcrt.dll")
    printf, sprintf = find_export(body_change, msvcrt, "printf"), find_export(body_change, msvcrt, "sprintf")
    template = b"x=%d y=%5s z=%#x%%\n\0"
    text = body_change.allocate_near(0, 0x1000, PAGE_READWRITE)
    body_change.write(text, template + b"abc\0")
    minus_seven = (-7) & (2**64 - 1)
    assert call_function(body_change, printf, text, minus_seven, text + len(template), 255) == 21
    assert body_change.output == b"x=-7 y=  abc z=0xff%\n"
    # more arguments than registers: the fifth and sixth come from the stack
    result = call(body_change, Address(sprintf), [Buffer(bytes(32)), b"%s-%03d-%lld-%c\0", b"ab\0", 7, -5, 0x41])
    assert result.value == 11 and result.buffers[0][:12] == b"ab-007--5-A\0"


def test_string_search_and_tls_models_answer_like_the_crt(body_change: EmulatorBackend) -> None:
    """strchr/strrchr (one model) find the first/last byte, the terminator included; TlsGetValue/TlsSetValue
    (one slot helper) keep a value per index and refuse an index past the slots."""
    msvcrt = model_module(body_change, "msvcrt.dll")
    kernel32 = model_module(body_change, "kernel32.dll")
    text = body_change.allocate_near(0, 0x1000, PAGE_READWRITE)
    body_change.write(text, b"a/b/c\0")
    strchr, strrchr = find_export(body_change, msvcrt, "strchr"), find_export(body_change, msvcrt, "strrchr")
    assert call_function(body_change, strchr, text, ord("/")) == text + 1
    assert call_function(body_change, strrchr, text, ord("/")) == text + 3
    assert call_function(body_change, strchr, text, 0) == call_function(body_change, strrchr, text, 0) == text + 5
    assert call_function(body_change, strrchr, text, ord("z")) == 0
    tls_alloc, tls_get, tls_set = (find_export(body_change, kernel32, name)
                                   for name in ("TlsAlloc", "TlsGetValue", "TlsSetValue"))
    index = call_function(body_change, tls_alloc) & 0xFFFFFFFF
    assert call_function(body_change, tls_set, index, 0x1234_5678_9ABC) == 1
    assert call_function(body_change, tls_get, index) == 0x1234_5678_9ABC
    assert call_function(body_change, tls_set, 4096, 1) == 0 and call_function(body_change, tls_get, 4096) == 0
