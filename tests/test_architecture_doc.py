"""docs/ARCHITECTURE.md opens with the tree of hotpatch/, and every module of the package appears in it
under its own folder (a new module without a line there fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hotpatch"


def tree_block(doc: str) -> list[str]:
    """The indented block that starts at ``hotpatch/`` and ends at the first blank line."""
    lines = doc.splitlines()
    start = lines.index("    hotpatch/")
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start + 1 : end]


def sections(block: list[str]) -> dict[str, str]:
    """The text of the tree per top-level entry: "" for the package's own modules, "pe" for pe/ and its lines."""
    out: dict[str, str] = {"": ""}
    current = ""
    for line in block:
        if re.match(r"^ {6}\S", line):  # a top-level entry: a folder or one of the package's own modules
            name = line.split()[0]
            current = name.rstrip("/") if name.endswith("/") else ""
            out.setdefault(current, "")
        out[current] += line + "\n"
    return out


def missing_modules(doc: str, package: Path) -> list[str]:
    listed = sections(tree_block(doc))
    missing = []
    for path in sorted(package.rglob("*")):
        if path.suffix not in (".py", ".pyx") or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(package)
        if len(relative.parts) == 1:
            if not re.search(rf"^ {{6}}{re.escape(path.name)}\s", listed[""], re.MULTILINE):
                missing.append(str(relative))
        elif path.name != "__init__.py":
            words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", listed.get(relative.parts[0], "")))
            if path.stem not in words:
                missing.append(str(relative))
    return missing


def test_the_architecture_document_opens_with_the_tree() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert doc.startswith("# Architecture\n")
    assert doc.index("    hotpatch/") < doc.index("\n## ")
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders <= set(sections(tree_block(doc))), sorted(folders - set(sections(tree_block(doc))))


def test_every_module_of_the_package_appears_in_the_tree() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert missing_modules(doc, PACKAGE) == []


def test_a_module_missing_from_the_tree_is_named(tmp_path: Path) -> None:
    (tmp_path / "stage").mkdir()
    for name in ("__init__.py", "top.py", "stage/__init__.py", "stage/listed.py", "stage/forgotten.py",
                 "forgotten_top.py"):
        (tmp_path / name).write_text("")
    doc = ("# Architecture\n\n    hotpatch/\n      __init__.py      the API\n      top.py           a leaf\n"
           "      stage/           a stage\n        listed.py        one job; forgotten_top is not a word here\n\n")
    assert missing_modules(doc, tmp_path) == ["forgotten_top.py", "stage/forgotten.py"]
