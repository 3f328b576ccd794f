"""The fixture cases build, and their DLLs compute what their ground truth says, under Wine."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from hotpatch.process.winehost import windows_path, wine_command, wine_env
from tests.fixtures.build_fixtures import ASLR_IMAGE_BASE, CASE_IMAGE_BASE, build_all, host_exe
from tests.fixtures.cases import CASES_DIR, Case, load_cases
from tests.support.hosts import run_to_end

# Collection needs only the names; outputs are resolved against the real build dir later.
CASE_NAMES = [case.name for case in load_cases(Path("unbuilt"))]
# Cases whose DLL the host loads away from its preferred base.
RELOCATED = {"aslr_reloc"}
REORDER_CALLS = ("walk:5", "walk:-17", "tagged:1", "summary:3")
HOST_TIMEOUT = 60


@dataclass(frozen=True)
class HostRun:
    """One host.exe run: its exit code and output, parsed by line kind."""

    returncode: int
    stdout: str
    stderr: str

    def lines(self, kind: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.stdout.splitlines() if line.split()[:1] == [kind]]

    def results(self) -> list[tuple[str, int]]:
        return [(name, int(value)) for name, value in self.lines("result")]

    def base(self) -> int:
        (base,) = self.lines("base")
        return int(base[0], 16)

    def check(self) -> HostRun:
        assert self.returncode == 0, f"host.exe failed ({self.returncode}):\n{self.stdout}{self.stderr}"
        return self


def run_host(prefix: Path, exe: Path, dll: Path, calls: Sequence[str], *options: str) -> HostRun:
    argv = [*wine_command(), str(exe), windows_path(dll), *options, *calls]
    proc = run_to_end(argv, wine_env(prefix), timeout=HOST_TIMEOUT)
    return HostRun(proc.returncode, proc.stdout, proc.stderr)


def coff_symbol_count(dll: Path) -> int:
    """NumberOfSymbols from the COFF file header: 0 once linked with -s."""
    data = dll.read_bytes()
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    assert data[pe_offset : pe_offset + 4] == b"PE\0\0"
    (count,) = struct.unpack_from("<I", data, pe_offset + 4 + 12)
    return count


def image_base(dll: Path) -> int:
    data = dll.read_bytes()
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    (magic,) = struct.unpack_from("<H", data, pe_offset + 24)
    assert magic == 0x20B, "not PE32+"
    (base,) = struct.unpack_from("<Q", data, pe_offset + 24 + 24)
    return base


def function_symbols(dll: Path) -> set[str]:
    out = subprocess.run(["x86_64-w64-mingw32-nm", str(dll)], capture_output=True, text=True, check=True).stdout
    return {parts[2] for parts in map(str.split, out.splitlines()) if len(parts) == 3 and parts[1] in "tT"}


# --------------------------------------------------------------------------
# Session fixtures: one build, one Wine prefix, one batch of host runs.
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fixtures_dir(built_fixtures: Path) -> Path:
    """The build directory (conftest's built_fixtures), as an absolute path."""
    return built_fixtures.resolve()


@pytest.fixture(scope="session")
def case_by_name(cases: list[Case]) -> dict[str, Case]:
    return {case.name: case for case in cases}


@pytest.fixture(scope="session")
def case_runs(fixtures_dir: Path, case_by_name: dict[str, Case], wine_prefix: Path) -> dict[tuple[str, str], HostRun]:
    """host.exe over every case DLL, run in parallel: Wine start-up dominates."""
    exe = host_exe(fixtures_dir)

    def run(key: tuple[str, str]) -> HostRun:
        case = case_by_name[key[0]]
        options = ["--print-base"]
        if case.name in RELOCATED:
            options += ["--reserve", hex(CASE_IMAGE_BASE)]
        # a start that Wine ends without any output is tried once more (tests/support/hosts.run_to_end)
        return run_host(wine_prefix, exe, case.dll(key[1]), [c.spec() for c in case.calls], *options)

    keys = [(name, variant) for name in case_by_name for variant in ("baseline", "patched")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(keys, pool.map(run, keys), strict=True))


# --------------------------------------------------------------------------
# Ground truth is well formed (no build needed).
# --------------------------------------------------------------------------


def test_every_case_directory_has_ground_truth() -> None:
    directories = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())
    assert directories == CASE_NAMES


@pytest.mark.parametrize("name", CASE_NAMES)
def test_ground_truth_is_consistent(name: str) -> None:
    (case,) = [c for c in load_cases(Path("unbuilt")) if c.name == name]
    assert case.calls, "a case needs calls"
    if case.verdict == "HOTPATCH":
        assert case.reasons == ()
        if case.changed or case.added:
            assert any(c.baseline != c.patched for c in case.calls), "no call shows the change"
    else:
        assert case.reasons, "NEW_BASELINE needs its reasons"
    assert not set(case.changed) & (set(case.added) | set(case.removed))
    called = {c.function for c in case.calls}
    assert not called & set(case.removed), "calls must exist in both DLLs"


# --------------------------------------------------------------------------
# Build outputs.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_builds_with_and_without_symbols(name: str, case_by_name: dict[str, Case]) -> None:
    case = case_by_name[name]
    for variant in ("baseline", "patched"):
        assert coff_symbol_count(case.dll(variant)) > 0
        assert coff_symbol_count(case.dll(variant, stripped=True)) == 0
        assert image_base(case.dll(variant)) == CASE_IMAGE_BASE
    baseline, patched = function_symbols(case.baseline), function_symbols(case.patched)
    assert set(case.changed) <= baseline & patched
    assert set(case.removed) <= baseline - patched
    assert set(case.added) <= patched - baseline


def test_build_is_incremental(fixtures_dir: Path) -> None:
    report = build_all(fixtures_dir)
    assert report.built == []
    assert report.up_to_date


def test_aslr_dlls_share_a_preferred_base(fixtures_dir: Path) -> None:
    assert image_base(fixtures_dir / "aslr" / "a.dll") == ASLR_IMAGE_BASE
    assert image_base(fixtures_dir / "aslr" / "b.dll") == ASLR_IMAGE_BASE


# --------------------------------------------------------------------------
# Under Wine.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["baseline", "patched"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_host_computes_ground_truth(
    name: str, variant: str, case_by_name: dict[str, Case], case_runs: dict[tuple[str, str], HostRun]
) -> None:
    case = case_by_name[name]
    run = case_runs[name, variant].check()
    expected = [(c.function, getattr(c, variant)) for c in case.calls]
    assert run.results() == expected
    if name in RELOCATED:
        assert run.base() != CASE_IMAGE_BASE, "the loader did not relocate the DLL"


def test_aslr_second_dll_is_relocated(fixtures_dir: Path, wine_prefix: Path) -> None:
    aslr = fixtures_dir / "aslr"
    run = run_host(
        wine_prefix,
        host_exe(fixtures_dir),
        aslr / "b.dll",
        ["module_tag", "through_table:5"],
        "--load",
        windows_path(aslr / "a.dll"),
        "--print-base",
    ).check()
    (loaded,) = run.lines("loaded")
    assert int(loaded[0], 16) == ASLR_IMAGE_BASE
    assert run.base() != ASLR_IMAGE_BASE
    # Both results go through absolute pointers that only base relocations fix.
    assert run.results() == [("module_tag", 2), ("through_table", 2005)]


def test_reordered_builds_compute_the_same(fixtures_dir: Path, wine_prefix: Path) -> None:
    reorder = fixtures_dir / "reorder"
    a_bytes, b_bytes = (reorder / "a.dll").read_bytes(), (reorder / "b.dll").read_bytes()
    assert a_bytes != b_bytes
    runs = [
        run_host(wine_prefix, host_exe(fixtures_dir), reorder / dll, REORDER_CALLS).check()
        for dll in ("a.dll", "b.dll")
    ]
    assert runs[0].results() == runs[1].results()
    assert len(runs[0].results()) == len(REORDER_CALLS)


def test_host_threads_report_observed_values(
    fixtures_dir: Path, wine_prefix: Path, case_by_name: dict[str, Case]
) -> None:
    case = case_by_name["body_change"]
    run = run_host(
        wine_prefix,
        host_exe(fixtures_dir),
        case.baseline,
        ["scale:10", "add:2,3"],
        "--threads",
        "3",
        "--iterations",
        "20000",
        "--interval-ms",
        "50",
    ).check()
    assert run.lines("running") == [["3"]]
    observed = run.lines("observed")
    assert observed, "no observed lines"
    # Every reported value is the one the function returns; nothing else shows up.
    assert {tuple(o) for o in observed} <= {("scale", "31"), ("add", "5"), ("scale",), ("add",)}
    assert ["scale", "31"] in observed
    assert run.lines("done") == [[str(2 + 3 * 20000 * 2)]]


def test_host_stops_when_stdin_closes(fixtures_dir: Path, wine_prefix: Path, case_by_name: dict[str, Case]) -> None:
    case = case_by_name["body_change"]
    argv = [
        *wine_command(),
        str(host_exe(fixtures_dir)),
        windows_path(case.baseline),
        "--threads",
        "2",
        "--seconds",
        "0",
        "--interval-ms",
        "50",
        "--until-stdin-closes",
        "add:1,1",
    ]
    proc = subprocess.Popen(argv, env=wine_env(wine_prefix), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:
            if line.startswith("observed"):
                break
        proc.stdin.close()
        # Wait before reading: a host that ignores the closed stdin must time out, not hang.
        assert proc.wait(timeout=HOST_TIMEOUT) == 0
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rest.splitlines()[-1].startswith("done ")


def test_host_reports_missing_export(fixtures_dir: Path, wine_prefix: Path, case_by_name: dict[str, Case]) -> None:
    run = run_host(wine_prefix, host_exe(fixtures_dir), case_by_name["removed_function"].patched, ["legacy_sum:1,2"])
    assert run.returncode == 1
    assert "GetProcAddress(legacy_sum)" in run.stderr
    assert "GetLastError=127" in run.stderr
