"""Building patch packages from fixture diffs: what goes in, what is refused, determinism, signing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotpatch import Image
from hotpatch.diff.compare import diff
from hotpatch.errors import NotHotpatchableError, PackageUntrustedError
from hotpatch.package import BaselineRVA, BlobKind, BlobTarget, FixupKind, ImportTarget, Strategy
from hotpatch.package.builder import build_package
from hotpatch.package.format import dumps, loads, save, signature_state_of
from hotpatch.package.signing import generate_keypair, load_private_key
from tests.fixtures.cases import Case, case_named


def _hotpatch(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.verdict == "HOTPATCH"]


def test_every_hotpatch_case_builds_a_loadable_package(cases: list[Case]) -> None:
    for case in _hotpatch(cases):
        result = diff(case.baseline, case.patched)
        package = build_package(result)
        again = loads(dumps(package))
        assert again == package
        changed = {e.baseline.rva for e in result.by_status("changed")}
        assert {s.rva for s in package.sites} == changed, case.name
        image = Image.load(case.baseline)
        for site in package.sites:
            assert site.expected == image.read(site.rva, len(site.expected))
            assert package.blobs[site.target_blob].kind is BlobKind.CODE
        assert package.target.timedatestamp == image.identity.timedatestamp
        assert package.target.code_sha256.hex() == image.identity.code_sha256


@pytest.mark.parametrize("name", ["changed_init_global", "short_function", "struct_field_insert", "removed_function"])
def test_new_baseline_cases_are_refused(cases: list[Case], name: str) -> None:
    case = case_named(cases, name)
    with pytest.raises(NotHotpatchableError) as caught:
        build_package(diff(case.baseline, case.patched))
    assert {r.kind for r in caught.value.reasons} == set(case.reasons)


def test_cli_new_baseline_exits_3_and_writes_nothing(cases: list[Case], tmp_path: Path) -> None:
    case = case_named(cases, "struct_field_insert")
    out = tmp_path / "fix.hpk"
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "build", str(case.baseline), str(case.patched),
                          "-o", str(out), "--json"], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert not out.exists()
    document = json.loads(run.stdout)
    assert document["written"] is None and document["reasons"][0]["kind"] == "data_layout_change"


def test_build_is_deterministic(cases: list[Case], tmp_path: Path) -> None:
    case = case_named(cases, "switch_table")
    outputs = []
    for name in ("a.hpk", "b.hpk"):
        out = tmp_path / name
        run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "build", str(case.baseline), str(case.patched),
                              "-o", str(out)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_jump_table_travels_with_its_function(cases: list[Case]) -> None:
    case = case_named(cases, "switch_table")
    package = build_package(diff(case.baseline, case.patched))
    tables = [b for b in package.blobs if b.kind is BlobKind.RODATA and b.size >= 32]
    assert tables, "the dispatch table must be copied"
    entries = [f for f in package.fixups if f.blob == tables[0].index]
    assert len(entries) == tables[0].size // 4
    assert all(f.kind is FixupKind.REL32 and isinstance(f.target, BlobTarget) for f in entries)
    assert [f.addend for f in entries] == [4 * i for i in range(len(entries))]


def test_new_import_resolves_by_name(cases: list[Case]) -> None:
    case = case_named(cases, "new_import_dll")
    package = build_package(diff(case.baseline, case.patched))
    imports = {(f.target.dll.lower(), f.target.name) for f in package.fixups if isinstance(f.target, ImportTarget)}
    assert ("ntdll.dll", "RtlComputeCrc32") in imports


def test_existing_state_stays_in_the_baseline(cases: list[Case]) -> None:
    case = case_named(cases, "new_global")
    result = diff(case.baseline, case.patched)
    package = build_package(result)
    baseline = Image.load(case.baseline)
    targets = [f.target for f in package.fixups]
    # the old global (scale_factor, last_input) is reached at its baseline address ...
    assert any(isinstance(t, BaselineRVA) and baseline.section_from_rva(t.rva).writable for t in targets)
    # ... the new ones come with the package, zero-initialised (.bss) and initialised (.data)
    kinds = {b.kind for b in package.blobs}
    assert BlobKind.BSS in kinds and BlobKind.DATA in kinds


def test_padding_case_prefers_the_short_jump(cases: list[Case]) -> None:
    case = case_named(cases, "padding_entry")
    package = build_package(diff(case.baseline, case.patched))
    assert all(s.strategy is Strategy.SHORT_JMP_PADDING for s in package.sites)
    assert all(s.padding_rva == s.rva - 5 for s in package.sites)


def test_signed_package_is_verified_and_trust_is_enforced(cases: list[Case], tmp_path: Path) -> None:
    case = case_named(cases, "body_change")
    package = build_package(diff(case.baseline, case.patched), description="scale fix", cve_ids=["CVE-2026-1"])
    private_pem, public_hex = generate_keypair()
    key_path = tmp_path / "release.key"
    key_path.write_bytes(private_pem)
    data = dumps(package, load_private_key(key_path))
    loaded = loads(data, trusted_keys=[bytes.fromhex(public_hex)])
    assert signature_state_of(loaded) == "valid" and loaded.metadata.cve_ids == ("CVE-2026-1",)
    _, other = generate_keypair()
    with pytest.raises(PackageUntrustedError):
        loads(data, trusted_keys=[bytes.fromhex(other)])


def test_inspect_json(cases: list[Case], tmp_path: Path) -> None:
    case = case_named(cases, "new_callee")
    out = tmp_path / "p.hpk"
    save(build_package(diff(case.baseline, case.patched), sequence=4), out)
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "inspect", str(out), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["sequence"] == 4 and document["signature"]["state"] == "unsigned"
    assert [s["function"] for s in document["sites"]] == ["checksum"]
    assert document["fixups_by_kind"]
    human = subprocess.run([sys.executable, "-m", "hotpatch.cli", "inspect", str(out)], capture_output=True, text=True)
    assert human.returncode == 0 and "checksum" in human.stdout and "jmp" in human.stdout


def test_inspect_lists_every_fixup_at_its_own_place(cases: list[Case], tmp_path: Path) -> None:
    # switch_table's dispatch entries point into another blob: the target must not hide where the fixup sits
    case = case_named(cases, "switch_table")
    package = build_package(diff(case.baseline, case.patched))
    out = tmp_path / "p.hpk"
    save(package, out)
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "inspect", str(out), "--json", "--fixups"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    listed = [(f["blob"], f["offset"], f["addend"]) for f in json.loads(run.stdout)["fixups"]]
    assert listed == [(f.blob, f.offset, f.addend) for f in package.fixups]
    blob_targets = [f["target"] for f in json.loads(run.stdout)["fixups"] if "offset" in f["target"]]
    assert blob_targets and all(set(t) == {"blob", "offset"} for t in blob_targets)
