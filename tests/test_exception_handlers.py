"""Language-specific data of exception handlers the builder carries (hotpatch/package/handlers.py)."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from hotpatch.analysis.functions import import_thunk_target
from hotpatch.diff.compare import diff
from hotpatch.package.builder import build_package
from hotpatch.package.handlers import (
    CXX_FRAME_HANDLER4,
    Fh4Block,
    _Reader,
    fh4_blocks,
    gs_handler_data_size,
    is_gs_handler_check,
    is_gs_handler_check_eh4,
)
from hotpatch.package.model import BaselineRVA, BlobKind, BlobTarget, FixupKind
from hotpatch.pe.image import Image
from hotpatch.pe.unwindinfo import tail_offset
from tests.support.realbins import ensure_wheel

# MSVC's __GSHandlerCheck at 0x10 and the start of __GSHandlerCheckCommon right after it
HANDLER = bytes.fromhex("4883ec28" "4d8b4138" "488bca" "498bd1" "e80d000000" "b801000000" "4883c428" "c3" "cccccc")
COMMON = bytes.fromhex("4053" "458b18" "488bda" "4183e3f8" "4c8bc9" "41f60004" "4c8bd1")


def image_with(handler: bytes, common: bytes = COMMON) -> bytes:
    return bytes(16) + handler + common + bytes(16)


def test_gs_handler_check_is_known_by_its_body_and_its_callee() -> None:
    assert is_gs_handler_check(image_with(HANDLER), 16)
    assert not is_gs_handler_check(image_with(HANDLER), 17)
    returns_zero = HANDLER.replace(bytes.fromhex("b801000000"), bytes.fromhex("b800000000"))
    assert not is_gs_handler_check(image_with(returns_zero), 16)
    # a callee that does not read GS_HANDLER_DATA's alignment bit: its data has another layout
    assert not is_gs_handler_check(image_with(HANDLER, COMMON.replace(bytes.fromhex("41f60004"), bytes(4))), 16)
    # a call displacement out of the image
    far = HANDLER.replace(bytes.fromhex("e80d000000"), b"\xe8" + struct.pack("<i", 0x7FFF0000))
    assert not is_gs_handler_check(image_with(far), 16)


def test_gs_handler_data_is_four_bytes_or_twelve_with_an_alignment() -> None:
    assert gs_handler_data_size(struct.pack("<I", 0x2D0), 0) == 4
    assert gs_handler_data_size(struct.pack("<III", 0x2D4, 0x20, 0x40), 0) == 12


@pytest.mark.realbins
@pytest.mark.slow
def test_numpy_fix_under_a_gs_handler_check_frame_is_packaged_with_its_cookie_offset() -> None:
    """numpy 2.1.0 -> 2.1.1 `_multiarray_umath`: a changed function guarded by /GS is carried, not refused."""
    name = "numpy/_core/_multiarray_umath.cp311-win_amd64.pyd"
    baseline, patched = (ensure_wheel("numpy", v) / name for v in ("2.1.0", "2.1.1"))
    package = build_package(diff(baseline, patched))
    image = Image.load(patched)
    memory = image.memory
    carried = 0
    for entry in package.unwind:
        info = package.blobs[entry.unwind_blob].data
        at = entry.unwind_offset
        if info[at] >> 3 == 0:
            continue
        tail = at + tail_offset(info[at + 2])
        (handler,) = [f.target for f in package.fixups if f.blob == entry.unwind_blob and f.offset == tail]
        assert isinstance(handler, BaselineRVA) and is_gs_handler_check(memory, handler.rva)
        kinds = {f.kind for f in package.fixups if f.blob == entry.unwind_blob and f.offset == tail}
        assert kinds == {FixupKind.ALLOC_REL32}
        # the data after the handler is the patched file's GS_HANDLER_DATA, byte for byte
        (source,) = [f for f in image.runtime_functions if f.unwind.rva and
                     memory[f.unwind.rva:f.unwind.rva + tail - at] == info[at:tail]]
        data_rva = source.unwind.rva + tail - at + 4
        size = gs_handler_data_size(memory, data_rva)
        assert info[tail + 4:tail + 4 + size] == memory[data_rva:data_rva + size]
        carried += 1
    assert carried >= 1


def test_fh4_compressed_unsigned_reads_as_vcruntime_does() -> None:
    # the low bits of the first byte give the length: 0 -> 1 byte, 01 -> 2, 011 -> 3, 0111 -> 4, 1111 -> 5
    cases = ((b"\x0a", 5), (b"\x05\x02", 0x0205 >> 2), (b"\x03\x00\x01", 0x010003 >> 3),
             (b"\x07\x00\x00\x80", 0x80000007 >> 4), (b"\x0f\x78\x56\x34\x12", 0x12345678))
    for raw, value in cases:
        reader = _Reader(raw + bytes(8), Fh4Block(0))
        assert (reader.unsigned(), reader.at) == (value, len(raw))


def fh4_functions(image: Image) -> dict[int, int]:
    """pdata begin -> FuncInfo4 RVA, for every function whose handler is the __CxxFrameHandler4 import."""
    memory = image.memory
    iat = {imp.iat_rva for imp in image.imports if imp.label.endswith("!" + CXX_FRAME_HANDLER4)}
    out = {}
    for function in image.runtime_functions:
        info = function.unwind
        handler = info.handler_rva if info.rva and info.flags & 3 else None
        if handler is None or memory[handler:handler + 2] != b"\xff\x25":  # jmp [rip+iat]
            continue
        if handler + 6 + struct.unpack_from("<i", memory, handler + 2)[0] in iat:
            out[function.begin_rva] = struct.unpack_from("<I", memory, info.rva + tail_offset(info.code_count) + 4)[0]
    return out


@pytest.mark.realbins
def test_fh4_metadata_of_a_real_cpp_module_reads_whole() -> None:
    """Read wrongly, the RVAs inside FH4 maps would land anywhere; read right, each lands on what it names."""
    image = Image.load(ensure_wheel("numpy", "2.1.3") / "numpy/fft/_pocketfft_umath.cp311-win_amd64.pyd")
    memory = image.memory
    functions = fh4_functions(image)
    assert len(functions) >= 30
    seen = {"block": 0, "code": 0, "data": 0}
    for func_info in functions.values():
        for block in fh4_blocks(memory, func_info).values():
            section = image.section_from_rva(block.rva)
            assert section is not None and not section.writable and not section.executable
            for _, value, what in block.rvas:
                seen[what] += 1
                section = image.section_from_rva(value)
                assert section is not None
                if what == "code":
                    assert section.executable
                elif what == "data":  # a TypeDescriptor: two pointers, then the decorated name
                    assert section.writable and memory[value + 16:value + 17] == b"."
    assert all(seen.values()), seen


@pytest.mark.realbins
@pytest.mark.slow
def test_numpy_cpp_fix_is_packaged_with_its_fh4_metadata_rebased() -> None:
    """numpy 2.1.2 -> 2.1.3 `_pocketfft_umath`: changed C++ functions under __CxxFrameHandler4 (refused before)."""
    name = "numpy/fft/_pocketfft_umath.cp311-win_amd64.pyd"
    result = diff(*(ensure_wheel("numpy", v) / name for v in ("2.1.2", "2.1.3")))
    package = build_package(result)
    memory = result.patched.image.memory
    fixups = {(f.blob, f.offset): f for f in package.fixups}
    copied = 0
    for func_info in set(fh4_functions(result.patched.image).values()):
        for block in fh4_blocks(memory, func_info).values():
            owners = [b for b in package.blobs if b.kind == BlobKind.RODATA and b.size == block.end - block.rva]
            here = [b for b in owners if all(fixups.get((b.index, offset)) is not None for offset, _, _ in block.rvas)
                    and _same_but_rvas(b.data, memory[block.rva:block.end], block)]
            if not here:
                continue
            copied += 1
            for offset, _, what in block.rvas:
                fixup = fixups[(here[0].index, offset)]
                assert fixup.kind == FixupKind.ALLOC_REL32
                if what in ("block", "data"):
                    assert isinstance(fixup.target, BlobTarget)
                if what == "data":
                    assert package.blobs[fixup.target.blob].data[16:17] == b"."
    assert copied >= 3


def _same_but_rvas(copy: bytes, original: bytes, block: Fh4Block) -> bool:
    masked = bytearray(original)
    for offset, _, _ in block.rvas:
        masked[offset:offset + 4] = bytes(4)
    return bytes(masked) == copy


@pytest.mark.realbins
@pytest.mark.slow
def test_pyzmq_release_with_gs_checked_cpp_frames_is_packaged() -> None:
    """pyzmq 26.0.2 -> 26.0.3 `_zmq`: changed C++ functions whose handler is the nameless
    __GSHandlerCheck_EH4 (a FuncInfo4 RVA, then a stack-cookie offset); refused before."""
    name = "zmq/backend/cython/_zmq.cp311-win_amd64.pyd"
    result = diff(*(ensure_wheel("pyzmq", v) / name for v in ("26.0.2", "26.0.3")))
    package = build_package(result)
    memory = result.baseline.image.memory
    fh4_thunks = {t for t in (f.rva for f in result.baseline.functions)
                  if (import_thunk_target(result.baseline, result.baseline.at(t)) or "").endswith(CXX_FRAME_HANDLER4)}
    handlers = {f.target.rva for f in package.fixups if f.kind == FixupKind.ALLOC_REL32
                and isinstance(f.target, BaselineRVA) and package.blobs[f.blob].kind == BlobKind.RODATA}
    assert any(is_gs_handler_check_eh4(memory, rva, fh4_thunks.__contains__) for rva in handlers)
    assert not is_gs_handler_check_eh4(memory, min(handlers), lambda _: False)


@pytest.mark.realbins
@pytest.mark.slow
def test_each_nameless_handler_body_is_checked_once_per_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyzmq 26.0.2 -> 26.0.3 `_zmq`: many unwind entries name the same nameless handlers (__GSHandlerCheck,
    __GSHandlerCheck_EH4); the body checks run once per handler, not once per entry."""
    from hotpatch.package import unwindcopy

    calls: Counter[tuple[str, int]] = Counter()

    def counting(name: str):
        check = getattr(unwindcopy, name)

        def counted(memory: bytes, rva: int, *rest: object) -> bool:
            calls[name, rva] += 1
            return check(memory, rva, *rest)
        return counted

    for name in ("is_gs_handler_check", "is_gs_handler_check_eh4"):
        monkeypatch.setattr(unwindcopy, name, counting(name))
    name = "zmq/backend/cython/_zmq.cp311-win_amd64.pyd"
    result = diff(*(ensure_wheel("pyzmq", v) / name for v in ("26.0.2", "26.0.3")))
    package = build_package(result)
    assert package.unwind
    checked = {rva for _, rva in calls}
    entries = [f for f in result.patched.image.runtime_functions
               if f.unwind.rva and f.unwind.handler_rva in checked]
    assert len(entries) > len(checked) >= 2  # entries share handlers: a check per entry would repeat
    assert max(calls.values()) == 1, calls.most_common(3)
