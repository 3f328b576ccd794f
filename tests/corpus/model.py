"""The corpus as data: one library.toml per library, one <fix>.toml per fix, read into dataclasses.

A library names its Debian source package and version, the C files that make
its DLL and how to compile them; a fix names the Debian patches that make it
(applied in the order of the package's debian/patches/series, on top of every
earlier fix, the Ksplice way), the verdict expected from reading the patch and
why, and the probes of the library's host that reach the fixed code.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CORPUS_DIR", "Fix", "Library", "load_corpus"]

CORPUS_DIR = Path(__file__).resolve().parent
VERDICTS = ("HOTPATCH", "NEW_BASELINE")


@dataclass(frozen=True)
class Library:
    """A Debian source package built as one Windows DLL."""

    name: str  # directory name under tests/corpus
    package: str  # Debian source package
    version: str  # the Debian 12 version whose patch series is used
    dll: str  # file name of the DLL (the module name patches target)
    srcdir: str  # where the C files live, relative to the unpacked tree
    sources: tuple[str, ...]
    include: tuple[str, ...]  # -I directories relative to the unpacked tree
    defines: tuple[str, ...]
    libs: tuple[str, ...]
    image_base: int
    baseline_patches: tuple[str, ...]  # non-security patches of the series applied to every step
    generated: dict[str, str]  # files written into the tree before building (path -> text)
    copies: dict[str, str]  # files copied inside the tree before building (destination -> source)
    inputs: str  # module whose header() makes <name>_inputs.h for the probe DLL ("" for none)
    fixes: tuple[Fix, ...]

    @property
    def dir(self) -> Path:
        return CORPUS_DIR / self.name

    @property
    def probe_source(self) -> Path:
        return self.dir / "probe.c"


@dataclass(frozen=True)
class Fix:
    """One security fix: Debian patches that turn the previous step into this one."""

    library: str
    name: str
    cve: str
    patches: tuple[str, ...]
    source: str  # where the patch came from
    expected: str  # HOTPATCH or NEW_BASELINE, written from reading the patch
    why: str
    probes: tuple[str, ...]  # host probes that reach the fixed code (may be empty)
    notes: str
    verify: tuple[dict, ...]  # emulator calls for `hotpatch verify --inputs` (docs/VERIFY.md)
    verify_note: str  # why there are none, when there are none
    # False when the reason for a new baseline leaves no trace in the binaries (an ownership rule changes,
    # not a layout or a datum): a HOTPATCH verdict there is a known blind spot, listed in docs/CORPUS.md
    detectable: bool

    @property
    def id(self) -> str:
        return f"{self.library}/{self.name}"


def _fix(library: str, path: Path) -> Fix:
    doc = tomllib.loads(path.read_text())
    expected = doc["expected"]
    if expected not in VERDICTS:
        raise ValueError(f"{path}: expected must be one of {VERDICTS}, not {expected!r}")
    return Fix(
        library=library,
        name=path.stem,
        cve=doc["cve"],
        patches=tuple(doc["patches"]),
        source=doc["source"],
        expected=expected,
        why=doc["why"].strip(),
        probes=tuple(doc.get("probes", ())),
        notes=doc.get("notes", "").strip(),
        verify=tuple(doc.get("verify", ())),
        verify_note=doc.get("verify_note", "").strip(),
        detectable=bool(doc.get("detectable", True)),
    )


def load_library(directory: Path, series: list[str] | None = None) -> Library:
    """One library and its fixes; with ``series`` (the Debian patch order) the fixes are sorted by it."""
    doc = tomllib.loads((directory / "library.toml").read_text())
    fixes = [_fix(directory.name, p) for p in sorted(directory.glob("*.toml")) if p.name != "library.toml"]
    if series is not None:
        missing = [p for f in fixes for p in f.patches if p not in series]
        if missing:
            raise ValueError(f"{directory.name}: patches not in the Debian series: {missing}")
        fixes.sort(key=lambda f: series.index(f.patches[0]))
    return Library(
        name=directory.name,
        package=doc["package"],
        version=doc["version"],
        dll=doc["dll"],
        srcdir=doc.get("srcdir", "."),
        sources=tuple(doc["sources"]),
        include=tuple(doc.get("include", ())),
        defines=tuple(doc.get("defines", ())),
        libs=tuple(doc.get("libs", ())),
        image_base=int(doc["image_base"], 16),
        baseline_patches=tuple(doc.get("baseline_patches", ())),
        generated=dict(doc.get("generated", {})),
        copies=dict(doc.get("copies", {})),
        inputs=doc.get("inputs", ""),
        fixes=tuple(fixes),
    )


def load_corpus() -> list[Library]:
    """Every library of the corpus, fixes in file-name order (the build orders them by the series)."""
    return [load_library(d) for d in sorted(CORPUS_DIR.iterdir()) if (d / "library.toml").is_file()]
