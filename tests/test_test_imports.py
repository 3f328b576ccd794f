"""Test modules share helpers through tests/support (and fixtures through conftest), never by importing
one another: an ast scan of every Python file under tests/ and benchmarks/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the packages under tests/ that hold shared code rather than tests: helpers, the C fixtures' builders
#: and cases, the corpus of real fixes
SHARED = ("tests.support", "tests.fixtures", "tests.corpus")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import statement brings in (``from X import Y`` counts as X.Y too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _forbidden(name: str) -> bool:
    # `tests` alone is the base of `from tests import support`; `from tests import test_x` is caught as tests.test_x
    top = name.split(".")[0]
    if top == "benchmarks":
        return True
    if top != "tests" or name == "tests":
        return False
    return not any(name == shared or name.startswith(shared + ".") for shared in SHARED)


def cross_test_imports(root: Path) -> list[str]:
    """``file:line imports name`` for each import of a test module (or a benchmark) under ``root``."""
    found = []
    for folder in ("tests", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            importer = _module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                names = _imported(node, importer, path.name == "__init__.py")
                bad = sorted({name for name in names if _forbidden(name)})
                found += [f"{path.relative_to(root)}:{node.lineno} imports {name}" for name in bad]
    return found


def test_no_test_module_imports_another() -> None:
    assert cross_test_imports(ROOT) == []


def test_the_scan_finds_each_kind_of_cross_import(tmp_path: Path) -> None:
    (tmp_path / "tests" / "support").mkdir(parents=True)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "from tests.test_b import Host\nimport tests.conftest\nfrom tests import fuzz_x, support\n"
        "from tests.support.hosts import Host as Fine\nfrom tests.fixtures.cases import Case\n"
        "def later():\n    from benchmarks.conftest import x\n")
    (tmp_path / "tests" / "support" / "helper.py").write_text("from ..test_b import y\nfrom . import hosts\n")
    (tmp_path / "benchmarks" / "test_bench.py").write_text("from tests.support.live import CALLS\n")
    assert cross_test_imports(tmp_path) == [
        "tests/support/helper.py:1 imports tests.test_b",
        "tests/support/helper.py:1 imports tests.test_b.y",
        "tests/test_a.py:1 imports tests.test_b",
        "tests/test_a.py:1 imports tests.test_b.Host",
        "tests/test_a.py:2 imports tests.conftest",
        "tests/test_a.py:3 imports tests.fuzz_x",
        "tests/test_a.py:7 imports benchmarks.conftest",
        "tests/test_a.py:7 imports benchmarks.conftest.x",
    ]
