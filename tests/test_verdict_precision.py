"""Verdict precision: register clobbers by liveness, exports and data by what they designate, self-diff zero."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.diff.compare import diff
from hotpatch.verdict.rules import decide
from tests.fixtures.cases import Case, case_named
from tests.support.realbins import ensure_wheel

ROOT = Path(__file__).resolve().parent.parent


def _rebased(dll: Path, out: Path, delta: int) -> Path:
    """A copy of ``dll`` whose preferred image base is ``delta`` higher, every DIR64 slot moved with it."""
    image = Image.load(dll)
    data = bytearray(dll.read_bytes())
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    base_offset = pe_offset + 24 + 24
    (base,) = struct.unpack_from("<Q", data, base_offset)
    struct.pack_into("<Q", data, base_offset, base + delta)
    for slot in image.relocations:
        section = image.section_from_rva(slot)
        assert section is not None and slot + 8 <= section.rva + section.raw_size
        offset = section.raw_offset + slot - section.rva
        (value,) = struct.unpack_from("<Q", data, offset)
        struct.pack_into("<Q", data, offset, value + delta)
    out.write_bytes(bytes(data))
    return out


def test_clobber_reason_names_caller_site_and_register(cases: list[Case]) -> None:
    case = case_named(cases, "clobber_live_r8")
    result = diff(case.baseline, case.patched)
    (reason,) = decide(result).reasons
    keep_r8 = next(s.rva for s in Image.load(case.baseline).symbols if s.name == "keep_r8")
    assert reason.kind == "register_clobber" and reason.subject == "scale"
    assert reason.message.startswith("keep_r8 keeps r8 live across its call to scale at ")
    site = int(reason.message.split(" at ")[1].split(",")[0], 16)
    assert 0 < site - keep_r8 < 16  # the call instruction inside keep_r8, not api's


def test_recompiled_callers_do_not_count_but_callers_left_in_place_do(cases: list[Case]) -> None:
    # clobber_dead_caller: scale_then_xor kept b in rdx and is recompiled and redirected; ipa_ra_clobber has
    # the same recompiled caller plus a hand-written one left in place, and only that one is named.
    assert decide(diff(*_pair(cases, "clobber_dead_caller"))).reasons == ()
    reasons = decide(diff(*_pair(cases, "ipa_ra_clobber"))).reasons
    assert [r.message.split(" ")[:3] for r in reasons] == [["xor_kept", "keeps", "rdx"]]


def test_only_arguments_the_next_callee_reads_are_live(cases: list[Case]) -> None:
    from hotpatch.verdict.clobbers import live_clobbers

    table = discover(Image.load(case_named(cases, "clobber_dead_caller").baseline))
    names = {s.rva: s.name for s in table.image.symbols}
    scale = next(f for f in table if names.get(f.rva) == "scale")
    # every caller counted as staying: scale_then_xor keeps b in rdx; twice_scaled calls twice(), which
    # reads rcx only, so the rdx, r8 and r9 left over from scale() are passed to nobody
    found = live_clobbers(table, scale, frozenset({"rdx", "r8", "r9"}), lambda f: True)
    assert sorted((names[c.caller.rva], c.register) for c in found) == [("scale_then_xor", "rdx")]


def _pair(cases: list[Case], name: str) -> tuple[Path, Path]:
    case = case_named(cases, name)
    return case.baseline, case.patched


def test_differing_preferred_bases_do_not_make_items_differ(cases: list[Case], tmp_path: Path) -> None:
    case = case_named(cases, "export_data_hooks")
    moved = _rebased(case.baseline, tmp_path / "rebased.dll", 0x10000000)
    assert Image.load(moved).image_base != Image.load(case.baseline).image_base
    result = diff(case.baseline, moved)
    assert result.summary()["changed"] == result.summary()["added"] == result.summary()["removed"] == 0
    assert result.data == () and decide(result).status == "HOTPATCH"
    patched = diff(moved, case.patched)  # the fix itself, across two preferred bases
    assert decide(patched).status == "HOTPATCH", decide(patched).reasons
    assert [d.kind for d in patched.data] == []


def test_a_pointer_to_another_function_is_a_data_change(cases: list[Case], tmp_path: Path) -> None:
    case = case_named(cases, "export_data_hooks")
    image = Image.load(case.baseline)
    hooks = {e.name: e.rva for e in image.exports}
    data = bytearray(case.baseline.read_bytes())
    section = image.section_from_rva(hooks["hooks_free"])
    assert section is not None
    # hooks_free now designates malloc's stub: same bytes but for one relocated pointer, a real change
    malloc_value = struct.unpack_from("<Q", image.memory, hooks["hooks_malloc"])[0]
    struct.pack_into("<Q", data, section.raw_offset + hooks["hooks_free"] - section.rva, malloc_value)
    changed = tmp_path / "changed.dll"
    changed.write_bytes(bytes(data))
    result = diff(case.baseline, changed)
    assert [(d.kind, d.baseline_rva) for d in result.data] == [("changed_writable_data", hooks["hooks_free"])]
    assert [r.kind for r in decide(result).reasons] == ["changed_writable_data"]


@pytest.mark.parametrize("stripped", [False, True], ids=["symbols", "stripped"])
def test_constructor_list_in_text_is_data_modulo_relocation(cases: list[Case], tmp_path: Path,
                                                            stripped: bool) -> None:
    """mingw-w64's __CTOR_LIST__ sits in .text outside every function: a moved constructor changes its
    pointer bytes, not what it designates (HOTPATCH); a list designating another function is a reason."""
    from hotpatch.diff.uncovered import pointer_lists, uncovered_gaps

    case = case_named(cases, "ctor_list")
    baseline, patched = case.dll("baseline", stripped), case.dll("patched", stripped)
    assert decide(diff(baseline, patched)).status == "HOTPATCH"
    table = discover(Image.load(patched))
    (gap,) = [g for g in uncovered_gaps(table).values() if any(g.lists)]
    (ctor_list,) = [found for found in pointer_lists(table, frozenset(table.image.relocations), gap.rva,
                                                     gap.rva + gap.size) if found[2]]
    twice = next(e.rva for e in table.image.exports if e.name == "twice")
    assert twice not in ctor_list[2]
    # the list's last constructor pointer now designates twice(): same shape, a different function
    data = bytearray(patched.read_bytes())
    section = table.image.section_from_rva(ctor_list[1] - 16)
    assert section is not None
    struct.pack_into("<Q", data, section.raw_offset + ctor_list[1] - 16 - section.rva,
                     table.image.image_base + twice)
    changed = tmp_path / "changed.dll"
    changed.write_bytes(bytes(data))
    verdict = decide(diff(baseline, changed))
    assert [r.kind for r in verdict.reasons] == ["uncovered_code"]
    assert "constructor or destructor list" in verdict.reasons[0].message


@pytest.mark.parametrize("stripped", [False, True], ids=["symbols", "stripped"])
def test_ownership_change_names_function_field_and_call(cases: list[Case], stripped: bool) -> None:
    """A field that stops sharing another's buffer and gets freed on its own: NEW_BASELINE, naming the
    function, the field's offset and the call; the same fields allocated and freed differently: HOTPATCH."""
    split = case_named(cases, "ownership_split")
    verdict = decide(diff(split.dll("baseline", stripped), split.dll("patched", stripped)))
    assert verdict.status == "NEW_BASELINE"
    assert {r.kind for r in verdict.reasons} == {"ownership_change"}
    messages = [r.message for r in verdict.reasons]
    assert any("now frees the pointer in field +0x8 (call at patched 0x" in m for m in messages), messages
    assert any("stores one allocation" in m and "into field(s) +0x8;" in m for m in messages), messages
    if not stripped:
        assert {r.subject for r in verdict.reasons} == {"entry_set", "entry_free"}
    kept = case_named(cases, "ownership_kept")
    assert decide(diff(kept.dll("baseline", stripped), kept.dll("patched", stripped))).status == "HOTPATCH"


def test_ownership_wrappers_pass_on_the_right_argument(cases: list[Case]) -> None:
    """free() takes the pointer in rcx; release(owner, pointer) is a wrapper known by the argument it hands
    on (rdx), so the owner passed next to it (png_free(png_ptr, p)) is not taken for the freed pointer."""
    from capstone import x86_const as x86

    from hotpatch.verdict.ownership import _heap_functions

    case = case_named(cases, "ownership_split")
    table = discover(Image.load(case.baseline))
    allocators, deallocators = _heap_functions(table)
    imported = {i.name: -i.iat_rva for i in table.image.imports}
    assert imported["malloc"] in allocators and imported["calloc"] in allocators
    assert deallocators[imported["free"]] == x86.X86_REG_RCX
    release = next(s.rva for s in table.image.symbols if s.name == "release")
    assert deallocators[release] == x86.X86_REG_RDX


_GROWN = """#include <stdint.h>
int64_t counters[COUNT];
int64_t other;
__declspec(dllexport) int64_t bump(int64_t x) { counters[COUNT - 1] += x; other++; return counters[COUNT - 1]; }
"""


def test_resize_needs_matched_code_reaching_past_the_old_extent(tmp_path: Path) -> None:
    from tests.fixtures.build_fixtures import CC, CFLAGS, DLL_LDFLAGS

    (tmp_path / "grown.c").write_text(_GROWN)
    dlls = {}
    for count in (2, 4):
        for strip in ((), ("-s",)):
            dll = tmp_path / f"{count}{''.join(strip)}.dll"
            subprocess.run([CC, *CFLAGS, f"-DCOUNT={count}", "grown.c", "-o", dll.name, *DLL_LDFLAGS, *strip],
                           cwd=tmp_path, check=True)
            dlls[count, bool(strip)] = dll
    grown = diff(dlls[2, False], dlls[4, False])
    (change,) = grown.data
    assert [(r.kind, r.subject) for r in decide(grown).reasons] == [("resized_data", f"{change.baseline_rva:#x}")]
    assert "counters+0x18, past the 16 bytes" in decide(grown).reasons[0].message
    # without symbols there is no object to measure from: no evidence, no resize
    assert [d.kind for d in diff(dlls[2, True], dlls[4, True]).data] == []


def test_new_export_is_a_note_unless_strict(cases: list[Case]) -> None:
    old, new = reversed(_pair(cases, "removed_function"))  # the other way round, legacy_sum is new
    lenient = diff(old, new)
    assert decide(lenient).status == "HOTPATCH"
    assert [(n.kind, n.subject) for n in decide(lenient).notes] == [("added_export", "legacy_sum")]
    strict = decide(diff(old, new), strict_exports=True)
    assert strict.status == "NEW_BASELINE" and strict.notes == ()
    assert [(r.kind, r.subject) for r in strict.reasons] == [("changed_exports", "legacy_sum")]
    removed = diff(*_pair(cases, "removed_function"))
    assert ("changed_exports", "legacy_sum") in [(r.kind, r.subject) for r in decide(removed).reasons]


def test_cli_strict_exports_flag(cases: list[Case], tmp_path: Path) -> None:
    new, old = _pair(cases, "removed_function")
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "diff", str(old), str(new), "--json",
                          "--strict-exports"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    verdict = json.loads(run.stdout)["verdict"]
    assert verdict["status"] == "NEW_BASELINE" and verdict["notes"] == []
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "build", str(old), str(new), "-o",
                          str(tmp_path / "x.hpk"), "--strict-exports"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 3 and not (tmp_path / "x.hpk").exists()


@pytest.mark.realbins
def test_psycopg_dlls_self_diff_to_zero() -> None:
    """libssl-1_1-x64.dll once reported RVA 0x46510 changed: it takes an incremental-link thunk's address."""
    dlls = sorted((ensure_wheel("psycopg-binary", "3.2.1") / "psycopg_binary.libs").glob("*.dll"))
    assert any(d.name.startswith("libssl-1_1-x64") for d in dlls)
    for dll in dlls:
        table = discover(Image.load(dll))
        result = diff(table, table)
        assert result.summary()["unchanged"] == len(table.functions), dll.name
        assert result.data == () and decide(result).status == "HOTPATCH", dll.name


@pytest.mark.realbins
@pytest.mark.slow
def test_msvc_switch_table_after_its_function_is_that_functions_data() -> None:
    """numpy 2.1.2 -> 2.1.3 `_multiarray_umath`: a leaf gains a switch whose table MSVC puts in .text right
    after it. The analysis knows the table (the builder copies it), so it is not code no function covers.
    Another changed function is MSVC-chained fragments back to back, joined by short branches: copied as
    one range, so the branches keep their displacements (it was refused: no relay island in rel8 reach)."""
    from hotpatch.package.builder import build_package
    from hotpatch.package.model import BlobKind

    name = "numpy/_core/_multiarray_umath.cp311-win_amd64.pyd"
    result = diff(*(ensure_wheel("numpy", v) / name for v in ("2.1.2", "2.1.3")))
    verdict = decide(result)
    assert verdict.status == "HOTPATCH", verdict.reasons
    leaf = result.patched.at(0xA19C0)
    assert leaf is not None
    (table,) = result.patched.analysis_of(leaf).jump_tables
    assert table.table_rva == leaf.end_rva + 2 and len(table.targets) == 16
    assert not [c for c in result.data if c.kind == "uncovered_code"]
    package = build_package(result, verdict=verdict)
    assert any(b.kind == BlobKind.RODATA and b.size == 4 * len(table.targets) for b in package.blobs)
    chained = result.patched.at(0x7B4E0)
    assert chained is not None and len(chained.ranges) == 4
    assert all(end == begin for (_, end), (begin, _) in zip(chained.ranges, chained.ranges[1:]))
    (site,) = [s for s in package.sites if s.function == chained.label]
    code = package.blobs[site.target_blob]
    assert code.size == chained.ranges[-1][1] - chained.rva  # no fill between the fragments, no island


def test_every_note_kind_is_documented() -> None:
    from hotpatch.verdict.rules import NOTE_KINDS

    text = (ROOT / "docs" / "CLI.md").read_text()
    for kind in NOTE_KINDS:
        assert f"`{kind}`" in text, kind
