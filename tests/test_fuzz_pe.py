"""PE mutation fuzz through the CLI (tests/fuzz_pe.py): exit 0 with clean stderr or exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import pe_fuzz

CASES = 3000
SUBPROCESS_SAMPLE = 12
MEMORY_LIMIT_MB = 4096


def test_mutants_cover_every_header_field_and_directory(built_fixtures: Path) -> None:
    seeds = pe_fuzz.load_seeds(built_fixtures, real=False)
    names = {f.name for s in seeds for f in s.fields} | {r.name for s in seeds for r in s.regions}
    for directory in pe_fuzz.DIRECTORIES:
        assert f"Directory.{directory}.RVA" in names and f"Directory.{directory}.Size" in names
    for field in ("Optional.SizeOfImage", "Optional.SectionAlignment", "COFF.NumberOfSections", "Section0.VirtualSize",
                  "e_lfanew"):
        assert field in names
    for region in ("EXPORT", "IMPORT", "EXCEPTION", "BASERELOC", "TLS", "UNWIND_INFO", "COFF_SYMBOLS",
                   "COFF_STRINGS"):
        assert region in names
    planned = sum(len(s.fields) + len(s.regions) for s in seeds)
    kinds = {what for m in pe_fuzz.make_mutants(seeds, planned, 1) for what in m.what}
    assert {f.name for s in seeds for f in s.fields} <= kinds  # each field mutated once before anything random


@pytest.mark.realbins
@pytest.mark.slow
def test_pe_mutants_end_in_exit_0_or_one_line_exit_2(built_fixtures: Path, tmp_path: Path) -> None:
    script = Path(__file__).parent / "fuzz_pe.py"
    argv = [sys.executable, str(script), "--cases", str(CASES), "--seed", "20261202", "--json",
            "--fixtures", str(built_fixtures), "--subprocess-sample", str(SUBPROCESS_SAMPLE),
            "--memory-limit-mb", str(MEMORY_LIMIT_MB), "--work", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert proc.stderr == ""
    report = json.loads(proc.stdout)
    print(report)
    assert report["failures"] == [] and proc.returncode == 0
    assert report["cases"] == CASES and report["subprocess_cases"] == SUBPROCESS_SAMPLE
    # both outcomes in earnest: mutants the model reads and mutants it refuses
    assert report["outcomes"]["exit 0"] > CASES // 10 and report["outcomes"]["exit 2"] > CASES // 10
    assert set(report["outcomes"]) == {"exit 0", "exit 2"}
    assert report["peak_rss_mb"] < 1024
