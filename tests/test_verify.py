"""verify: baseline + package, in the emulator at a non-preferred base, computes what the patched image computes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.apply.status import code_sha256, read_image
from hotpatch.calls import CallSpec
from hotpatch.diff import diff
from hotpatch.errors import NotPEError, UnmodelledImportError
from hotpatch.image import Image
from hotpatch.package.builder import build_package
from hotpatch.verify import affected_exports, sibling_dlls, verify
from tests.fixtures.build_product import (
    CALLS,
    IMAGE_BASES,
    RELEASES,
    Release,
    build_product,
    expected,
    release_dir,
)
from tests.fixtures.cases import Case, load_cases

ROOT = Path(__file__).resolve().parent.parent


def _hotpatch_cases() -> list[str]:
    return [c.name for c in load_cases(ROOT / "build" / "fixtures") if c.verdict == "HOTPATCH"]


def _inputs(case: Case, path: Path) -> Path:
    calls = [{"function": call.function, "args": list(call.args)} for call in case.calls]
    path.write_text(json.dumps({"calls": calls}))
    return path


@pytest.mark.parametrize("name", _hotpatch_cases())
def test_every_hotpatch_case_verifies(cases: list[Case], name: str, tmp_path: Path) -> None:
    case = next(c for c in cases if c.name == name)
    package_path = tmp_path / "fix.hpk"
    build_package(diff(case.baseline, case.patched)).save(package_path)
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "verify", str(package_path),
                          "--baseline", str(case.baseline), "--patched", str(case.patched),
                          "--inputs", str(_inputs(case, tmp_path / "inputs.json")), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["agrees"] and report["first_difference"] is None
    preferred = 0x180000000
    assert report["baseline_base"] != preferred
    # the calls return what Wine measured for the patched DLL
    assert [c["patched"] for c in report["calls"]] == [call.patched for call in case.calls]
    assert [c["baseline_with_package"] for c in report["calls"]] == [call.patched for call in case.calls]


def test_a_dll_with_a_non_default_preferred_base_verifies(built_fixtures: Path) -> None:
    # util.dll prefers 0x181000000, no usual default: the emulator maps it elsewhere and rewrites the header's
    # ImageBase, so the code hash check has to take the preferred base from the baseline it mapped
    build_product(built_fixtures)
    baseline = release_dir(built_fixtures, RELEASES[0]) / "util.dll"
    patched = release_dir(built_fixtures, RELEASES[2]) / "util.dll"
    image = Image.load(baseline)
    assert image.image_base == IMAGE_BASES["util.dll"] == 0x181000000
    package = build_package(diff(baseline, patched))
    report = verify(package, baseline, patched)
    assert report.agrees, report.difference
    assert report.baseline_base != image.image_base and {c.function for c in report.calls} >= {"util_mix"}


def test_a_dll_importing_other_dlls_of_its_product_verifies_with_them(built_fixtures: Path, tmp_path: Path) -> None:
    """app.dll imports core.dll and util.dll: verify maps the ones beside the baseline, or those named with
    companions, in both processes (the baseline's copies, so only the package makes them differ)."""
    build_product(built_fixtures)
    may, june = (next(r for r in RELEASES if r.name == name) for name in ("2026.05", "2026.06"))
    baseline, patched = release_dir(built_fixtures, may) / "app.dll", release_dir(built_fixtures, june) / "app.dll"
    assert [p.name for p in sibling_dlls(Image.load(baseline))] == ["core.dll", "util.dll"]
    package = build_package(diff(baseline, patched))
    calls = [CallSpec(name, (int(args),)) for name, args in (c.split(":") for c in CALLS)]
    report = verify(package, baseline, patched, calls)
    assert report.agrees, report.difference
    assert report.modules == ("core.dll", "util.dll", "app.dll")
    # app.dll at June's level over May's core.dll and util.dll (util changes in June too, but not here)
    mixed = Release("mixed", "", {**may.levels, "app.dll": june.levels["app.dll"]}, "")
    assert [r.value for r in report.expected_results] == list(expected(mixed).values())
    assert [r.value for r in report.patched_results] == list(expected(mixed).values())
    assert expected(mixed)["app_price"] != expected(may)["app_price"], "the calls must reach the fix"
    # alone, app.dll's imports bind to stubs that stop the call; named companions take the siblings' place
    alone = tmp_path / "app.dll"
    alone.write_bytes(baseline.read_bytes())
    with pytest.raises(UnmodelledImportError, match="core.dll!core_rate"):
        verify(package, alone, patched, calls)
    companions = [release_dir(built_fixtures, may) / m for m in ("util.dll", "core.dll")]
    assert verify(package, alone, patched, calls, companions=companions).agrees
    with pytest.raises(NotPEError):  # a companion that is no PE is bad input (CLI: exit 2), as the images are
        verify(package, alone, patched, calls, companions=[ROOT / "README.md"])


def test_the_code_hash_uses_the_preferred_base_the_emulator_knows(built_fixtures: Path) -> None:
    build_product(built_fixtures)
    baseline = release_dir(built_fixtures, RELEASES[0]) / "util.dll"
    image = Image.load(baseline)
    backend = EmulatorBackend.load(baseline)
    try:
        module = next(m for m in backend.images() if m.name == "util.dll")
        loaded = read_image(backend, module)
        # the header in memory names the base the image was mapped at, not the one it prefers
        assert loaded.header_image_base == module.base_va != image.image_base
        assert module.preferred_base == image.image_base
        wanted = bytes.fromhex(image.identity.code_sha256)
        assert code_sha256(backend, loaded, wanted).state == "verified"
        # without the preferred base only the header and the usual defaults are tried: none explains the code
        guessed = read_image(backend, dataclasses.replace(module, preferred_base=None))
        assert code_sha256(backend, guessed, wanted).state == "mismatch"
    finally:
        backend.close()


def test_default_calls_cover_exports_reaching_changed_code(cases: list[Case]) -> None:
    case = next(c for c in cases if c.name == "body_change")
    result = diff(case.baseline, case.patched)
    names = affected_exports(result.baseline, {e.baseline.rva for e in result.by_status("changed")})
    assert "scale" in names and "scale_then_xor" in names and "add" not in names
    package = build_package(result)
    report = verify(package, case.baseline, case.patched)
    assert report.agrees and len(report.calls) >= 2 * len(names)


def test_a_wrong_package_is_caught(cases: list[Case], tmp_path: Path) -> None:
    # the package for body_change, checked against a patched image it was not built from
    case = next(c for c in cases if c.name == "body_change")
    package_path = tmp_path / "fix.hpk"
    build_package(diff(case.baseline, case.patched)).save(package_path)
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "verify", str(package_path),
                          "--baseline", str(case.baseline), "--patched", str(case.baseline)],
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "differs" in run.stdout


def test_bad_inputs_exit_2(cases: list[Case], tmp_path: Path) -> None:
    case = next(c for c in cases if c.name == "body_change")
    package_path = tmp_path / "fix.hpk"
    build_package(diff(case.baseline, case.patched)).save(package_path)
    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"calls": [{"function": "no_such_export", "args": [1]}]}')
    run = subprocess.run([sys.executable, "-m", "hotpatch.cli", "verify", str(package_path),
                          "--baseline", str(case.baseline), "--patched", str(case.patched), "--inputs", str(inputs)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("hotpatch: error:")
