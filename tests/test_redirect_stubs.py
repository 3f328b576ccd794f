"""The engine's own machine code and the pure parts of the apply engine (no process needed).

The stubs are assembly text assembled with keystone; these tests pin their
bytes, and check the plans built from them: which strategy a site gets, the
commit writes that apply, stack and roll back redirects, the layout of the
allocation, fixups, the journal's round trip and the in-memory code hash.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from hotpatch.apply.backend import CommitReport, CommitWrite, Module, ProcessBackend, ThreadSnapshot
from hotpatch.apply.engine import build_parts, plan_layout
from hotpatch.apply.imports import ResolvedImport
from hotpatch.apply.journal import (
    AllocationRecord,
    CommitRecord,
    Journal,
    LibraryRecord,
    TableRecord,
)
from hotpatch.apply.provenance import region_marker
from hotpatch.apply.redirects import (
    JMP_ABS_ASM,
    JMP_REL_ASM,
    Patch,
    assemble,
    jmp_abs,
    jmp_rel8,
    jmp_rel32,
    plan_site,
    relay_thunk,
    transition_writes,
)
from hotpatch.apply.status import code_sha256, read_image
from hotpatch.errors import FixupError
from hotpatch.package.model import (
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    ImportTarget,
    Package,
    PatchSite,
    Strategy,
    TargetIdentity,
    UnwindEntry,
)
from hotpatch.pe.image import Image
from hotpatch.process.win32mem import PAGE_EXECUTE_READ, PAGE_READONLY, PAGE_READWRITE, Region

BASE = 0x180000000

# --------------------------------------------------------------------------
# Stubs
# --------------------------------------------------------------------------


def test_stub_texts_are_pinned() -> None:
    assert JMP_REL_ASM == "jmp {target:#x}"
    assert JMP_ABS_ASM == "jmp qword ptr [rip]\n.quad {target:#x}"


def test_jmp_rel8_bytes() -> None:
    assert jmp_rel8(0x1376, 0x1370).hex() == "ebf8"
    assert jmp_rel8(0x1000, 0x1081).hex() == "eb7f"


def test_jmp_rel32_bytes() -> None:
    assert jmp_rel32(BASE + 0x1370, BASE + 0x40000000).hex() == "e98becff3f"
    assert jmp_rel32(BASE + 0x40000000, BASE + 0x1370).hex() == "e96b1300c0"


def test_jmp_abs_and_relay_thunk_bytes() -> None:
    assert jmp_abs(0x1122334455667788).hex() == "ff25000000008877665544332211"
    assert relay_thunk(0x7B600000) == jmp_abs(0x7B600000)


def test_out_of_reach_jumps_are_refused_not_wrapped() -> None:
    # keystone silently wraps these: the encoders check the distance first and the decoded target after.
    assert assemble("jmp 0x100001000", 0x1000).hex() == "e9fbffffff"
    with pytest.raises(FixupError, match="cannot reach"):
        jmp_rel32(0x1000, 0x100001000)
    with pytest.raises(FixupError, match="cannot reach"):
        jmp_rel8(0x1000, 0x1100)
    with pytest.raises(FixupError, match="short"):
        jmp_rel32(0x1000, 0x1010)


# --------------------------------------------------------------------------
# Plans for sites
# --------------------------------------------------------------------------

ENTRY = bytes.fromhex("488d44490 1c3 66 2e 0f1f840000000000".replace(" ", ""))


def rel32_site(**kw: object) -> PatchSite:
    fields: dict = dict(rva=0x1370, function="scale", expected=ENTRY, target_blob=0, target_offset=0,
                        strategy=Strategy.REL32_JMP, fallbacks=(Strategy.ABS_JMP,))
    fields.update(kw)
    return PatchSite(**fields)


def padding_site() -> PatchSite:
    return PatchSite(0x1376, "scale", b"\x90\x90", 0, 0, Strategy.SHORT_JMP_PADDING,
                     padding_rva=0x1370, padding_expected=b"\x90" * 6)


def test_rel32_site_plan() -> None:
    plan = plan_site(rel32_site(), BASE, BASE + 0x40000000)
    assert plan.strategy is Strategy.REL32_JMP
    (patch,) = plan.patches
    assert (patch.va, patch.original, patch.redirect.hex()) == (BASE + 0x1370, ENTRY[:5], "e98becff3f")


def test_out_of_reach_falls_back_to_the_absolute_jump() -> None:
    far = BASE + (5 << 30)
    plan = plan_site(rel32_site(), BASE, far)
    assert plan.strategy is Strategy.ABS_JMP
    assert plan.patches[0].redirect == jmp_abs(far) and plan.patches[0].original == ENTRY[:14]
    with pytest.raises(FixupError, match="no redirect strategy fits"):
        plan_site(rel32_site(fallbacks=()), BASE, far)


def test_padding_site_plan_writes_the_long_jump_first_without_suspending() -> None:
    plan = plan_site(padding_site(), BASE, BASE + 0x40000000)
    long_jump, short_jump = plan.patches
    assert (long_jump.va, long_jump.role, long_jump.atomic) == (BASE + 0x1370, "padding", True)
    assert long_jump.redirect == jmp_rel32(BASE + 0x1370, BASE + 0x40000000)
    assert (short_jump.va, short_jump.redirect.hex(), short_jump.atomic) == (BASE + 0x1376, "ebf8", True)
    writes = transition_writes([], plan.patches)
    assert [(w.va, w.no_suspend) for w in writes] == [(BASE + 0x1370, True), (BASE + 0x1376, True)]


def test_unaligned_short_jump_needs_suspension() -> None:
    site = PatchSite(0x1377, "f", b"\x90\x90", 0, 0, Strategy.SHORT_JMP_PADDING,
                     padding_rva=0x1370, padding_expected=b"\x90" * 7)
    plan = plan_site(site, BASE, BASE + 0x40000000)
    assert [p.atomic for p in plan.patches] == [True, False]
    assert not any(w.no_suspend for w in transition_writes([], plan.patches))


def test_rollback_of_a_padding_site_guards_the_padding_jump_with_the_byte_before() -> None:
    plan = plan_site(padding_site(), BASE, BASE + 0x40000000)
    padding, entry = transition_writes(plan.patches, [], read_byte=lambda va: 0xCC)
    # A thread that took the short jump may sit on the padding jump's first byte: the write starts
    # one byte early (rewriting it with itself), so the agent waits for that thread.
    assert (padding.va, padding.expected, padding.new) == (
        BASE + 0x136F, b"\xcc" + plan.patches[0].redirect, b"\xcc" + b"\x90" * 5)
    assert (entry.va, entry.expected, entry.new) == (BASE + 0x1376, plan.patches[1].redirect, b"\x90\x90")
    assert not padding.no_suspend and not entry.no_suspend


def test_stacking_rewrites_shared_sites_and_restores_dropped_ones() -> None:
    old_scale = plan_site(rel32_site(), BASE, BASE + 0x40000000)
    old_add = plan_site(rel32_site(rva=0x1380, function="add"), BASE, BASE + 0x40000010)
    new_scale = plan_site(rel32_site(), BASE, BASE + 0x40010000)
    new_stx = plan_site(rel32_site(rva=0x1390, function="stx"), BASE, BASE + 0x40010010)
    writes = transition_writes([*old_scale.patches, *old_add.patches], [*new_scale.patches, *new_stx.patches])
    by_va = {w.va: w for w in writes}
    assert set(by_va) == {BASE + 0x1370, BASE + 0x1380, BASE + 0x1390}
    assert (by_va[BASE + 0x1370].expected, by_va[BASE + 0x1370].new) == (
        old_scale.patches[0].redirect, new_scale.patches[0].redirect)
    assert by_va[BASE + 0x1380].new == ENTRY[:5]
    assert by_va[BASE + 0x1390].expected == ENTRY[:5]
    assert not any(w.no_suspend for w in writes)


def test_strategies_of_different_widths_merge_into_one_write() -> None:
    old = plan_site(rel32_site(strategy=Strategy.ABS_JMP, fallbacks=()), BASE, BASE + 0x40000000)
    new = plan_site(rel32_site(), BASE, BASE + 0x40010000)
    (write,) = transition_writes(old.patches, new.patches)
    assert write.va == BASE + 0x1370 and write.expected == old.patches[0].redirect
    assert write.new == new.patches[0].redirect + ENTRY[5:14]


def test_patches_that_disagree_about_the_original_are_refused() -> None:
    a = Patch(0x1000, b"\x90" * 5, b"\xe9" + bytes(4))
    b = Patch(0x1000, b"\xcc" * 5, b"\xe9" + bytes(4))
    with pytest.raises(FixupError, match="disagree"):
        transition_writes([a], [b])


# --------------------------------------------------------------------------
# Layout and fixups
# --------------------------------------------------------------------------

IDENTITY = TargetIdentity("baseline.dll", 0, 0x20000, 0, bytes(32))


def layout_package() -> Package:
    code = bytes(0x40)
    unwind = bytes([1, 0, 0, 0])
    return Package(
        target=IDENTITY,
        baseline_id="b",
        sequence=1,
        blobs=(
            Blob(0, BlobKind.CODE, 16, code, len(code)),
            Blob(1, BlobKind.RODATA, 8, unwind + bytes(20), 24),
            Blob(2, BlobKind.DATA, 8, bytes(16), 16),
            Blob(3, BlobKind.BSS, 8, b"", 0x2000),
        ),
        fixups=(
            Fixup(0, 0, FixupKind.REL32, BaselineRVA(0x1380), -4),
            Fixup(0, 8, FixupKind.REL32, ImportTarget("far.dll", "f"), -4),
            Fixup(0, 16, FixupKind.REL32, ImportTarget("near.dll", "g"), -4),
            Fixup(1, 8, FixupKind.ABS64, BlobTarget(2, 8)),
            Fixup(1, 16, FixupKind.IMAGE_REL32, BlobTarget(0, 0x10)),
            Fixup(1, 20, FixupKind.ALLOC_REL32, BlobTarget(0, 0x30)),
            Fixup(2, 0, FixupKind.ABS64, ImportTarget("far.dll", "f"), 1),
        ),
        sites=(rel32_site(),),
        unwind=(UnwindEntry(0, 0x10, 0x20, 1, 0), UnwindEntry(0, 0, 0x10, 1, 0)),
    )


def test_layout_puts_code_rodata_and_data_on_their_own_pages() -> None:
    pkg = layout_package()
    layout = plan_layout(pkg, ["far.dll!f", "near.dll!g"])
    assert layout.blob_offsets == (0, 0x1040, 0x2000, 0x2010)  # the region's marker first in rodata
    assert layout.thunk_offsets == {"far.dll!f": 0x40, "near.dll!g": 0x50}
    assert (layout.marker_offset, layout.table_offset, layout.table_count) == (0x1000, 0x1058, 2)
    assert [(p.name, p.offset, p.size, p.protect) for p in layout.parts] == [
        ("code", 0, 0x1000, PAGE_EXECUTE_READ),
        ("rodata", 0x1000, 0x1000, PAGE_READONLY),
        ("data", 0x2000, 0x3000, PAGE_READWRITE),
    ]
    assert layout.size == 0x5000


def test_fixups_are_resolved_for_the_actual_bases() -> None:
    pkg = layout_package()
    layout = plan_layout(pkg, ["far.dll!f", "near.dll!g"])
    alloc = BASE + 0x40000000
    far, near = 0x7FF000000000, BASE + 0x50000000
    imports = {
        ("far.dll", "f"): ResolvedImport("far.dll", "f", far, far & ~0xFFFF),
        ("near.dll", "g"): ResolvedImport("near.dll", "g", near, near & ~0xFFFF),
    }
    marker = region_marker(b"\x11" * 32, alloc, 1234)
    parts = build_parts(pkg, layout, alloc, BASE, imports, marker)
    code, rodata, data = parts["code"], parts["rodata"], parts["data"]
    assert rodata[:64] == marker and len(marker) == 64
    assert struct.unpack_from("<i", code, 0)[0] == BASE + 0x1380 - 4 - alloc
    # far: through the relay thunk; near: directly
    assert struct.unpack_from("<i", code, 8)[0] == alloc + 0x40 - 4 - (alloc + 8)
    assert code[0x40:0x4E] == relay_thunk(far)
    assert struct.unpack_from("<i", code, 16)[0] == near - 4 - (alloc + 16)
    assert struct.unpack_from("<Q", rodata, 0x48)[0] == alloc + 0x2008
    assert struct.unpack_from("<I", rodata, 0x50)[0] == alloc + 0x10 - BASE
    assert struct.unpack_from("<I", rodata, 0x54)[0] == 0x30  # relative to the allocation (unwind info RVAs)
    assert struct.unpack_from("<Q", data, 0)[0] == far + 1
    assert len(data) == 16  # bss is never written: fresh pages are zero
    table = rodata[0x58:0x70]
    assert struct.unpack("<6I", table) == (0, 0x10, 0x1040, 0x10, 0x20, 0x1040)  # sorted by begin


def test_fixups_out_of_reach_are_errors() -> None:
    pkg = layout_package()
    layout = plan_layout(pkg, ["far.dll!f", "near.dll!g"])
    imports = {k: ResolvedImport(k[0], k[1], BASE, BASE) for k in (("far.dll", "f"), ("near.dll", "g"))}
    with pytest.raises(FixupError, match="out of rel32 reach"):
        build_parts(pkg, layout, BASE + (3 << 30), BASE, imports)
    with pytest.raises(FixupError, match="4 GiB above the module base"):
        build_parts(pkg, layout, BASE - 0x10000000, BASE, imports)
    below = replace(pkg, fixups=(Fixup(1, 20, FixupKind.ALLOC_REL32, BlobTarget(0, 0), -0x10),))
    with pytest.raises(FixupError, match="4 GiB above the allocation base"):
        build_parts(below, plan_layout(below, []), BASE + 0x40000000, BASE, {})


def test_a_handler_in_the_image_is_reached_through_a_relay_thunk() -> None:
    # The handler RVA in unwind info is relative to the allocation, which lies above the image.
    pkg = replace(layout_package(), fixups=(Fixup(1, 20, FixupKind.ALLOC_REL32, BaselineRVA(0x1380)),))
    keys = ["rva:0x1380"]
    layout = plan_layout(pkg, keys)
    alloc = BASE + 0x40000000
    parts = build_parts(pkg, layout, alloc, BASE, {})
    thunk = layout.thunk_offsets["rva:0x1380"]
    assert struct.unpack_from("<I", parts["rodata"], 0x54)[0] == thunk
    assert parts["code"][thunk : thunk + 14] == relay_thunk(BASE + 0x1380)


# --------------------------------------------------------------------------
# The journal
# --------------------------------------------------------------------------


def test_journal_round_trip_and_compaction(tmp_path: Path) -> None:
    journal = Journal(tmp_path).process(42, 1234)
    plan = plan_site(rel32_site(), BASE, BASE + 0x40000000)
    record = journal.new_record(package_id="p", baseline_id="b", sequence=3, module_name="m.dll", module_base=BASE)
    record.sites = [plan]
    record.allocation = AllocationRecord(BASE + 0x40000000, 0x1000, "allocated", [{"name": "code", "va": 1}])
    record.function_table = TableRecord(BASE + 0x40001000, 2, BASE + 0x40000000, "registered")
    record.libraries = [LibraryRecord("x.dll", 0x7000, "loaded")]
    record.commit = CommitRecord("apply", [CommitWrite(BASE + 0x1370, ENTRY[:5], plan.patches[0].redirect)])
    journal.event(record, "commit", "intent")
    again = Journal(tmp_path).process(42, 1234)
    (loaded,) = again.records
    assert loaded.to_json() == record.to_json()
    assert loaded.sites[0] == plan and loaded.patches == list(plan.patches)
    assert [r.package_id for r in again.live("M.DLL")] == ["p"]
    assert Journal(tmp_path).known() == [(42, 1234)]

    for index in range(40):
        done = again.new_record(package_id=f"q{index}", baseline_id="b", sequence=1, module_name="m.dll",
                                module_base=BASE, phase="rolled_back")
        for step in range(10):
            done.events.append({"step": step})
    again.save()
    kept = Journal(tmp_path).process(42, 1234).records
    assert kept[0].package_id == "p" and len(kept) == 1 + 16
    assert all(len(r.events) <= 4 for r in kept[1:])


# --------------------------------------------------------------------------
# The code hash, over a module "loaded" from a fixture file
# --------------------------------------------------------------------------


class ImageMemory(ProcessBackend):
    """A read-only process holding one image mapped at ``base_va`` (relocated like a loader would)."""

    pid = 1

    def __init__(self, image: Image, base_va: int, rewrite_header: bool = False) -> None:
        self.base_va = base_va
        memory = bytearray(image.memory)
        delta = base_va - image.image_base
        for rva in image.relocations:
            (value,) = struct.unpack_from("<Q", memory, rva)
            struct.pack_into("<Q", memory, rva, (value + delta) & (2**64 - 1))
        if rewrite_header:  # as Windows may do
            (pe,) = struct.unpack_from("<I", memory, 0x3C)
            struct.pack_into("<Q", memory, pe + 24 + 24, base_va)
        self.memory = memory

    def read(self, va: int, size: int) -> bytes:
        return bytes(self.memory[va - self.base_va : va - self.base_va + size])

    def modules(self) -> list[Module]:
        return [Module("baseline.dll", "", self.base_va, len(self.memory))]

    def write(self, va: int, data: bytes) -> None:
        raise NotImplementedError

    def query(self, va: int) -> Region:
        raise NotImplementedError

    def allocate_near(self, va: int, size: int, protect: int, reach: int = 0) -> int:
        raise NotImplementedError

    def free(self, va: int) -> None:
        raise NotImplementedError

    def protect(self, va: int, size: int, protect: int) -> int:
        raise NotImplementedError

    def flush(self, va: int, size: int) -> None:
        raise NotImplementedError

    def remote_call(self, function_va: int, arg: int, timeout: float = 10.0, wait: bool = True) -> int:
        raise NotImplementedError

    def commit(self, writes: Sequence[CommitWrite], max_attempts: int = 50, retry_sleep_ms: int = 2) -> CommitReport:
        raise NotImplementedError

    def suspend_resume_floor(self) -> CommitReport:
        raise NotImplementedError

    def thread_contexts(self, watch_va: int = 0, watch_size: int = 0) -> ThreadSnapshot:
        raise NotImplementedError

    def process_start_time(self) -> int:
        return 1

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def body(built_fixtures: Path) -> Image:
    return Image.load(built_fixtures / "body_change" / "baseline.dll")


@pytest.mark.parametrize("base, rewrite", [(BASE, False), (0x10A0000, False), (0x7FF6A0000000, True)])
def test_code_hash_reverts_relocations(body: Image, base: int, rewrite: bool) -> None:
    assert any(s.executable and s.contains_rva(r) for s in body.sections for r in body.relocations)
    process = ImageMemory(body, base, rewrite_header=rewrite)
    image = read_image(process, process.modules()[0])
    assert (image.size_of_image, image.checksum) == (body.identity.size_of_image, body.identity.checksum)
    wanted = bytes.fromhex(body.identity.code_sha256)
    result = code_sha256(process, image, wanted)
    assert result.state == "verified", result
    assert code_sha256(process, image, bytes(32)).state == "mismatch"


def test_code_hash_puts_our_redirects_back(body: Image) -> None:
    process = ImageMemory(body, BASE)
    (scale,) = [e.rva for e in body.exports if e.name == "scale"]
    original = bytes(process.memory[scale : scale + 5])
    process.memory[scale : scale + 5] = b"\xe9\x00\x00\x00\x40"
    image = read_image(process, process.modules()[0])
    wanted = bytes.fromhex(body.identity.code_sha256)
    assert code_sha256(process, image, wanted).state == "mismatch"
    ours = [Patch(BASE + scale, original, b"\xe9\x00\x00\x00\x40")]
    assert code_sha256(process, image, wanted, ours).state == "verified"
