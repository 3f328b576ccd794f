"""The import contracts in .importlinter hold (import-linter), and a broken one fails the check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_project_keeps_its_import_contracts() -> None:
    run = _lint()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_a_broken_contract_fails_the_check(tmp_path: Path) -> None:
    # the emulator backend is built on the emulation package: forbidding that import must be caught
    config = tmp_path / "broken.ini"
    config.write_text("[importlinter]\nroot_package = hotpatch\n\n[importlinter:contract:broken]\n"
                      "name = apply does not use the emulator\ntype = forbidden\n"
                      "source_modules =\n    hotpatch.apply.emulator\nforbidden_modules =\n    hotpatch.emulation\n")
    run = _lint("--config", str(config))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "BROKEN" in run.stdout and "hotpatch.apply.emulator -> hotpatch.emulation" in run.stdout


def test_no_import_cycle_among_the_package_modules() -> None:
    # the layers contract holds the stages apart; this holds every module, inside a stage too
    # (type-checking imports count: a cycle hidden behind TYPE_CHECKING is still one)
    import grimp

    graph = grimp.build_graph("hotpatch", cache_dir=None)
    cycles = sorted((importer, imported) for importer in graph.modules
                    for imported in graph.find_modules_directly_imported_by(importer)
                    if graph.find_shortest_chain(importer=imported, imported=importer))
    assert cycles == []
