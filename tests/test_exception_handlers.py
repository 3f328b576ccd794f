"""Language-specific data of exception handlers the builder carries (hotpatch/package/handlers.py)."""

from __future__ import annotations

import struct

import pytest

from hotpatch.diff.compare import diff
from hotpatch.package.builder import build_package
from hotpatch.package.handlers import gs_handler_data_size, is_gs_handler_check
from hotpatch.package.model import BaselineRVA, FixupKind
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
